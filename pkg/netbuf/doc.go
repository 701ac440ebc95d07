// Package netbuf owns the output-commit buffer of a protected guest's NIC:
// the agent end of QEMU's `-netdev stream` socket, and the host-side port
// (a tap device, or any Port) the guest's traffic is bridged to.
//
// Frames from the guest are held, tagged with the epoch that produced them,
// until the lockstep coordinator says that epoch is committed on the
// secondary (Release); frames from the world pass to the guest at once. This
// is invariant 1 of DESIGN.md: no packet leaves the primary side before the
// epoch that produced it is committed. The coordinator calls Seal while the
// guest is paused at a checkpoint; a frame whose epoch is uncertain (still in
// the socket when Seal runs) is attributed to the later epoch, which only
// delays it.
//
// Memory is bounded by Options.MaxHeldBytes. When the bound is reached the
// buffer neither drops nor releases early: it stops reading QEMU's socket, so
// QEMU queues the guest's packets, the virtio TX ring fills, and the guest's
// network stack backs off, exactly as behind a slow link.
//
// The stream format is QEMU's: each frame is preceded by its length as a
// 4-byte big-endian integer. A length QEMU itself would never send (below an
// Ethernet header, or above QEMU's NET_BUFSIZE) is a protocol error: the
// connection is dropped, held frames are kept, and a new connection (a
// restarted or restored QEMU) is accepted.
package netbuf
