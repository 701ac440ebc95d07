// Package lockstep owns the checkpoint protocol between a primary and a
// secondary agent: when a checkpoint starts (the trigger policy), what the
// primary captures while the guest is paused, how an epoch travels, and how
// the secondary commits it atomically and acknowledges it, which is when
// the guest's held network output may leave.
//
// # One epoch
//
// On the primary, for epoch N:
//
//	trigger (guest output, or max interval) → QMP stop
//	  dirty pages (memsync tracker) → memcpy into a send buffer
//	  device state (QMP migrate, x-ignore-shared) → bytes
//	  block log: MarkEpoch (stop drained all I/O, so every write of N is in)
//	  output buffer: Seal(N)
//	QMP cont — the guest runs on speculatively
//	encode pages (XOR + compression) and the device state (a delta
//	  against the previous checkpoint's, see devstate.go)
//	send: manifest, memory, device state, END
//	ACK(N) → release the guest output of epochs <= N
//
// Block write events are not part of the epoch frames: they stream to the
// secondary as they happen (Forever), each carrying its block epoch, and the
// manifest of epoch N names the block epoch that N closed. Sending is
// overlapped with the next epoch's execution, bounded by MaxInflight
// unacknowledged epochs; beyond that the primary keeps the guest paused
// until an acknowledgement arrives (back-pressure by pausing longer, never
// by dropping).
//
// # Commit on the secondary
//
// The secondary stages the pages (memsync.Replica) and the block events
// (replay.Replayer) of N as they arrive. When END(N) arrives and the epoch's
// digest verifies, it commits in an order that survives a crash at any
// point: (1) the epoch's metadata and device state (rebuilt from its delta
// and verified against the primary's checksum) are written durably;
// (2) the replica RAM commits N (its redo journal makes this the commit
// point); (3) the replayer applies the block epochs up to the one N closed;
// (4) ACK(N). Reopening after a crash between (2) and (3) finishes (3) from
// the metadata, because staged block epochs are durable. A torn epoch (a
// digest mismatch, a missing frame, a connection lost before END) is
// discarded whole: the replica stays on N-1. The stored device state is
// the base of the next epoch's delta, also after a restart.
//
// # Initial synchronisation
//
// Before the first checkpoint the primary copies RAM while the guest runs
// (memsync.PreCopy), each batch as a "sync" epoch without device state, and
// the disk through the block stream (initsync). The first checkpoint epoch
// completes both; only an epoch with device state is a point the secondary
// can resume from.
package lockstep
