// Package agent owns ftctl's per-host daemon: the VMs this host runs as
// primary (their QEMU, the NBD export of each disk, the output-commit buffer
// of each NIC), the VMs it protects for a peer (replica RAM and disk, a
// standby QEMU waiting with -incoming defer), the control API on a local
// unix socket, the peer listener for replication links, and each VM's state
// machine:
//
//	unprotected → syncing → protected → degraded (secondary lost) → …
//	                                  ↘ handed over (planned switchover)
//	secondary: standby → promoted (the VM now runs here, unprotected)
//
// A pairing is one authenticated link (pkg/lockstep/wire) opened by the
// primary's agent: a control message asks the peer to prepare a replica and
// a standby, then the link carries lockstep epochs. When the link dies the
// primary goes on alone (degraded, output released); the secondary asks
// its arbiter whether the primary is really gone before it promotes.
package agent
