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
// primary goes on alone (degraded, output released) and pairs with its
// last peer again by itself, backing off from 1 s to 30 s; the secondary
// asks its arbiter whether the primary is really gone before it promotes.
//
// Failure detection (see health.go): besides the replication link, agents
// started with a management address exchange authenticated UDP heartbeats
// over a second network, watched by a failover.Detector per pairing; a
// peer agent heard there after the link ended is alive, so only the link
// broke and the secondary does not promote. The primary polls each VM's
// QEMU over QMP: a hang is reported, and while protected the hung QEMU is
// killed; whenever a protected VM dies the primary tells the secondary
// (vm-lost) so it promotes at once. With a witness (ftctl witness), the
// primary holds each paired VM's lease and fences the VM when it cannot
// renew it, and the secondary's arbiter asks the witness when the LAN probe
// cannot decide.
//
// With Config.ShimCommand (ftctl agent runs shims unless --shims=false),
// each VM this host runs as primary — started by StartVM, or a libvirt
// domain from PrepareDomain on — and each replica it keeps for a peer,
// lives in a shim process of its own (shim.go) that survives the agent:
// an agent restart, even kill -9, on either host neither stops a guest,
// nor cuts its disk and NIC, nor interrupts its protection, and the
// restarted agent finds the shims again from the VM records on disk. A
// protect request reaching such an agent is redirected to the VM's replica
// shim, which has a peer listener of its own; the primary remembers where
// (shimroute.go). Without shims everything lives in the agent process: a
// libvirt domain outlives it (libvirtd is QEMU's parent) but not its
// devices, and a restarted agent lists such a domain as lost (lost.go).
package agent
