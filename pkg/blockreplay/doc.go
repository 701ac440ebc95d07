// Package blockreplay owns ftctl's disk replication, the "Forever"
// mechanism: the primary's disk is served to QEMU over NBD by the agent
// (sub-package nbd), every completed write becomes an epoch-tagged event
// (eventlog), the secondary stages those events and applies an epoch only
// when it commits (replay), and a running guest's disk is copied to a new
// secondary without pausing it (initsync).
//
// This root package assembles those parts into the two roles an agent
// plays: serving an image with every write logged (Export), which is also
// how a promoted secondary serves its replica.
package blockreplay
