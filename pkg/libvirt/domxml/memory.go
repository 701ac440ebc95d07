package domxml

import (
	"fmt"
	"math"
	"math/bits"
	"path/filepath"
	"strconv"
	"strings"
)

// MemoryID is the QEMU object id of the memory backend Prepare adds. The
// id names the RAM block in the migration stream, so primary and standby
// must use the same one, and it must not be libvirt's own pc.ram.
const MemoryID = "ftmem"

// RAMFileName is the base name of the guest RAM file Prepare puts in the
// socket directory.
const RAMFileName = "guest.ram"

// memoryUnits are libvirt's units for <memory unit=...>, which libvirt
// compares without regard to case; none means KiB.
var memoryUnits = map[string]uint64{
	"b": 1, "byte": 1, "bytes": 1,
	"": 1 << 10, "k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
	"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
	"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
	"p": 1 << 50, "pib": 1 << 50, "pb": 1e15,
	"e": 1 << 60, "eib": 1 << 60, "eb": 1e18,
}

// MemoryMiB is the guest's boot RAM from <memory> in MiB, rounded up to a
// whole MiB as libvirt does for x86 before it passes -m to QEMU: the
// memory backend Prepare adds must have exactly that size, or QEMU
// refuses to start. A missing <memory>, an unknown unit, or a value that
// is not a positive integer is an error wrapping ErrBadXML.
func (d *Domain) MemoryMiB() (int, error) {
	if d.Memory == nil {
		return 0, fmt.Errorf("%w: domain %s has no <memory>", ErrBadXML, d.Name)
	}
	scale, ok := memoryUnits[strings.ToLower(d.Memory.Unit)]
	if !ok {
		return 0, fmt.Errorf("%w: <memory unit=%q>: unknown unit (libvirt knows b, KiB, KB, MiB, MB, GiB, GB, TiB, TB, ...)", ErrBadXML, d.Memory.Unit)
	}
	v := strings.TrimSpace(d.Memory.Value)
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%w: <memory>%.40q</memory> is not a positive whole number", ErrBadXML, v)
	}
	hi, lo := bits.Mul64(n, scale)
	if hi != 0 {
		return 0, fmt.Errorf("%w: <memory unit=%q>%d</memory> overflows", ErrBadXML, d.Memory.Unit, n)
	}
	mib := lo>>20 + min(lo&(1<<20-1), 1)
	if mib > math.MaxInt32 {
		return 0, fmt.Errorf("%w: <memory> of %d MiB is beyond what ftctl handles", ErrBadXML, mib)
	}
	return int(mib), nil
}

// memoryObjectArg is the -object argument of the ftmem backend.
func memoryObjectArg(sizeMiB int, file string) string {
	return fmt.Sprintf("memory-backend-file,id=%s,size=%dM,mem-path=%s,share=on", MemoryID, sizeMiB, file)
}

const memoryMachineArg = "memory-backend=" + MemoryID

// isMemoryObjectArg reports whether a qemu:arg value defines ftmem.
func isMemoryObjectArg(v string) bool {
	return strings.HasPrefix(v, "memory-backend-file,id="+MemoryID+",")
}

// memPathOK checks a path QEMU will get inside a comma-separated option.
func memPathOK(what, p string) error {
	if p == "" || !filepath.IsAbs(p) {
		return fmt.Errorf("%w: %s %q is not an absolute path", ErrBadOptions, what, p)
	}
	if strings.ContainsAny(p, ",'\"\n") {
		return fmt.Errorf("%w: %s %q contains a comma, quote or newline (QEMU option syntax)", ErrBadOptions, what, p)
	}
	return nil
}

// checkMemory decides whether guest RAM must move to (or be resized in)
// the ftmem backend.
func (p *preparePlan) checkMemory(prot Protection) error {
	size, err := p.dom.MemoryMiB()
	if err != nil {
		return err
	}
	p.memSize = size
	const why = "the agent maps guest RAM from a file it knows to find and copy dirty pages, and the standby on the peer must map its replica file itself; " +
		"libvirt names the file of its own backend only once QEMU runs (memory_backing_dir/<id>-<name>/pc.ram) and has no element naming a backend's file, " +
		"so ftctl adds a memory-backend-file of its own via <qemu:commandline>: the guest runs on it and libvirt's pc.ram stays allocated but untouched"
	if p.dom.CPU != nil && len(p.dom.CPU.Cells) > 0 {
		p.add(Blocker, "memory", fmt.Sprintf("%d NUMA cell(s)", len(p.dom.CPU.Cells)),
			"ftctl puts guest RAM in one file (-machine memory-backend), which QEMU refuses together with the per-cell backends libvirt makes for NUMA (-numa memdev)",
			"remove <numa> from <cpu>")
		return nil
	}
	if p.dom.MaxMemory != nil {
		p.add(Warning, "memory", "<maxMemory> (memory hotplug)", "hot-plugged DIMMs get backends of their own, outside the RAM file the agent replicates", "do not hot-plug memory into a protected domain")
	}
	if mb := p.dom.MemoryBacking; mb != nil && mb.Hugepages != nil {
		p.add(Warning, "memory", "hugepages", "the hugepages back libvirt's own RAM backend, which the guest no longer uses; ftctl's RAM file is on ordinary pages", "")
	}
	file := filepath.Join(p.opts.SocketDir, RAMFileName)
	if prot.Memory != nil && prot.Memory.File != "" {
		// Like a disk's socket: a recorded file stays where it is.
		file = prot.Memory.File
	}
	if err := memPathOK("RAM file", file); err != nil {
		return fmt.Errorf("%w: %w", ErrBadXML, err)
	}
	p.memFile = file
	have := ""
	if p.dom.Commandline != nil {
		for _, a := range p.dom.Commandline.Args {
			if isMemoryObjectArg(a.Value) {
				have = a.Value
			}
		}
	}
	rec := prot.Memory
	switch {
	case rec != nil && rec.ID == MemoryID && rec.File == file && rec.SizeMiB == size &&
		have == memoryObjectArg(size, file) && p.dom.hasArg(memoryMachineArg):
		p.add(Info, "memory", fmt.Sprintf("guest RAM (%d MiB) in %s", size, file), "", "")
		return nil
	case rec == nil:
		p.add(Change, "memory", "guest RAM in libvirt's own memory backend", why,
			fmt.Sprintf("put it in %s: -object %s -machine %s via <qemu:commandline>", file, memoryObjectArg(size, file), memoryMachineArg))
	case rec.SizeMiB != size || (have != "" && have != memoryObjectArg(size, file)):
		p.add(Change, "memory", fmt.Sprintf("RAM file backend does not match <memory> of %d MiB (recorded %d MiB, argument %q)", size, rec.SizeMiB, have),
			"QEMU refuses to start when the backend's size differs from the machine's RAM", fmt.Sprintf("resize the %s backend to %d MiB", MemoryID, size))
	default:
		p.add(Change, "memory", "ftctl's RAM file record without its <qemu:commandline> arguments", why,
			fmt.Sprintf("add -object %s -machine %s", memoryObjectArg(size, file), memoryMachineArg))
	}
	p.memory = true
	return nil
}

// fixMemory replaces any ftmem arguments with the planned ones and returns
// them for appending; the record is written by Prepare.
func (p *preparePlan) fixMemory(root *Node) []string {
	_, cl := commandline(root)
	if cl != nil {
		args := cl.Elements()
		for i, a := range args {
			v := a.A("value")
			if isMemoryObjectArg(v) || v == memoryMachineArg {
				cl.Remove(a)
				if i > 0 && (args[i-1].A("value") == "-object" || args[i-1].A("value") == "-machine") {
					cl.Remove(args[i-1])
				}
			}
		}
	}
	return []string{"-object", memoryObjectArg(p.memSize, p.memFile), "-machine", memoryMachineArg}
}
