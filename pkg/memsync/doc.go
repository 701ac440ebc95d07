// Package memsync owns the memory half of a checkpoint: finding which guest
// pages changed (trackers), copying them out while the guest is paused
// (capture), encoding them compactly for the wire (page codecs), applying
// them atomically to the secondary's replica RAM file (replica), and the
// first full synchronisation while the guest runs (pre-copy).
//
// Guest RAM is a memory-backend-file with share=on, so the agent maps the
// same file (Region) and sees the guest's writes.
//
// # Trackers
//
// A Tracker reports the pages written since the previous Begin or Dirty
// call. Two implementations exist and New picks one with a run-time probe:
//
//   - soft-dirty: clears the QEMU process's soft-dirty bits through
//     /proc/PID/clear_refs and reads bit 55 of /proc/PID/pagemap, only over
//     the guest-RAM mapping found in /proc/PID/maps: 8 bytes per 4 KiB page,
//     so the scan reads RAM/512 bytes. It costs no extra memory. The kernel
//     must have CONFIG_MEM_SOFT_DIRTY; ProbeSoftDirty detects kernels where
//     the clear is a silent no-op.
//   - shadow: keeps a copy of the whole RAM (memory cost: one RAM size) and
//     compares every page with it in parallel, updating the copy for the
//     pages that differ. Works on any kernel and accelerator and reports
//     exactly the pages whose content changed.
//
// First epoch: a tracker only knows about writes after its first Begin.
// Soft-dirty cannot see content that was in the file before (pages that
// QEMU never touched read as not present, i.e. not dirty), so everything is
// dirty until the first full sync: PreCopy sends every non-zero page after
// Begin, and only then do dirty sets describe the difference to the replica.
//
// Soft-dirty limits: if guest RAM is backed by transparent huge pages the
// bits are per 2 MiB and the set is a superset. The bits belong to the QEMU
// process's page tables, so
// writes through other mappings of the file (the agent's, a second process)
// or write(2) to it are not seen; guest RAM must not be reclaimed or swapped
// (a dropped page table entry loses its bit), so run QEMU with its RAM
// locked or without swap. Reading pagemap and clearing are two steps, so
// Dirty must run while the VM is stopped; PreCopy takes a Pause hook for it.
//
// Memory: the encoder keeps a Base, the version of every page the secondary
// has (one RAM size, untouched zero pages cost nothing resident); with the
// shadow tracker the primary thus holds two extra copies of guest RAM, with
// soft-dirty one. The replica side holds only the staged pages of one epoch.
//
// # Capture and encoding
//
// During the pause only the dirty scan and a memcpy of the dirty pages into a
// send buffer happen (Capture). After cont, an Encoder turns the Snapshot
// into a frame: a zero page is a flag; any other page is XORed with the
// version the secondary already has (a "last sent" Base on the primary, the
// replica file on the secondary) and the delta is compressed; a page whose
// delta is all zero is left out. See codec.go for the measured choice of the
// default codec.
//
// # Replica
//
// Replica stages decoded pages per epoch and writes them to the replica RAM
// file only on Commit, through a redo journal so that a crash at any point
// leaves the file at the previous or the new epoch, never between.
package memsync
