// Package domxml owns ftctl's reading and rewriting of libvirt domain XML:
// Check lists what a domain needs before ftctl can protect it (file-backed
// shared guest RAM, disks served by the agent over NBD, NICs whose output
// the agent buffers, a QMP path for the agent) and why; Prepare makes those
// changes and returns the new XML with a diff.
//
// Reading uses encoding/xml into the few structs protection depends on
// (Domain). Rewriting works on a generic tree (Document) that keeps each
// node's source bytes, so whatever this package does not understand -
// unknown elements, other applications' metadata, comments, attribute
// quoting, indentation - comes out exactly as it went in.
package domxml
