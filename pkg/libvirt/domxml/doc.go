// Package domxml owns ftctl's reading and rewriting of libvirt domain XML:
// Check lists what a domain needs before ftctl can protect it (file-backed
// shared guest RAM, disks served by the agent over NBD, NICs whose output
// the agent buffers, a QMP path for the agent) and why; Prepare makes those
// changes and returns the new XML with a diff. Standby turns a prepared
// definition into its standby's on the peer host (sockets and RAM file
// there, -incoming defer), and Promoted turns that into the definition of
// the VM after it took over.
//
// Guest RAM. Prepare leaves libvirt's <memoryBacking> alone and adds
// through <qemu:commandline>
//
//	-object memory-backend-file,id=ftmem,size=<memory>M,mem-path=<SocketDir>/guest.ram,share=on
//	-machine memory-backend=ftmem
//
// which QEMU merges over libvirt's own -machine option: the guest runs on
// that file, libvirt's pc.ram backend stays allocated but untouched.
// libvirt has no element that names a backend's file (it picks
// memory_backing_dir/<id>-<name>/pc.ram at start), and the standby must
// map the replica file itself. QEMU refuses -machine memory-backend with
// libvirt's per-NUMA-cell backends, so NUMA domains are refused.
//
// Metadata. ftctl's <metadata><ftctl:protection> element records the
// replaced devices (qmp, memory, disk, nic children), the hook's peer and
// policy, and the failure arbiter's LAN probe: one
// <ftctl:probe addrs='IP,IP' tcp='PORT,PORT'/> with comma-separated lists
// (see Probe), which Standby and Promoted keep, so the VM is probed the
// same way from whichever host is secondary.
//
// Reading uses encoding/xml into the few structs protection depends on
// (Domain). Rewriting works on a generic tree (Document) that keeps each
// node's source bytes, so whatever this package does not understand -
// unknown elements, other applications' metadata, comments, attribute
// quoting, indentation - comes out exactly as it went in.
package domxml
