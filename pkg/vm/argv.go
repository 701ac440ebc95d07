package vm

import (
	"fmt"
	"strconv"
	"strings"
)

// argvOptions are the per-process parts of a command line: where RAM, the
// serial log and the QMP socket live, and whether this is a standby.
type argvOptions struct {
	accel     string // resolved: kvm or tcg
	ramFile   string
	serialLog string
	qmpFD     int // listening socket inherited by QEMU
	standby   bool
}

// DiskNodeName is the block node name of disk i; stable across primary and
// standby so that a migration stream finds its devices.
func DiskNodeName(i int) string { return "disk" + strconv.Itoa(i) }

// NICNetdevID is the netdev id of NIC i.
func NICNetdevID(i int) string { return "net" + strconv.Itoa(i) }

// argv turns a validated, defaulted spec into QEMU's arguments (without the
// binary). Every id is derived from the spec, never from the run, so the
// primary's device state loads into the standby.
func (s Spec) argv(o argvOptions) []string {
	a := []string{
		"-name", "guest=" + quote(s.Name),
		"-nodefaults", "-no-user-config", "-vga", "none", "-display", "none",
		"-accel", o.accel,
		"-machine", quote(s.Machine) + ",memory-backend=mem",
		"-m", strconv.Itoa(s.MemoryMiB),
		"-smp", strconv.Itoa(s.VCPUs),
		// share=on is what lets ftctl read guest RAM from the file and what
		// makes x-ignore-shared leave RAM out of the migration stream.
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=on", s.MemoryMiB, quote(o.ramFile)),
		"-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", o.qmpFD),
		"-mon", "chardev=qmp,mode=control",
		"-chardev", "file,id=serial0,path=" + quote(o.serialLog),
		"-serial", "chardev:serial0",
		// A guest that panics or reboots must not silently restart from
		// scratch: that would look like a live VM with lost state.
		"-no-reboot",
		// An entropy source: without it a freshly booted guest's RNG takes
		// about a second to initialise under TCG, and anything waiting on
		// getrandom (the test guest's disk writer) waits with it.
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-pci,id=rng0-dev,rng=rng0",
	}
	if s.CPU != "" {
		a = append(a, "-cpu", s.CPU)
	}
	if s.Kernel != "" {
		a = append(a, "-kernel", s.Kernel)
		if s.Initrd != "" {
			a = append(a, "-initrd", s.Initrd)
		}
		if s.Cmdline != "" {
			a = append(a, "-append", s.Cmdline)
		}
	}
	disks := s.Disks
	if s.Image != "" {
		disks = append([]Disk{{Path: s.Image, Format: "qcow2"}}, disks...)
		if !strings.HasSuffix(s.Image, ".qcow2") {
			disks[0].Format = "raw"
		}
	}
	for i, d := range disks {
		node := DiskNodeName(i)
		ro := "off"
		if d.ReadOnly {
			ro = "on"
		}
		if d.NBD != nil {
			bd := fmt.Sprintf("driver=nbd,node-name=%s,server.type=unix,server.path=%s,read-only=%s", node, quote(d.NBD.Socket), ro)
			if d.NBD.Export != "" {
				bd += ",export=" + quote(d.NBD.Export)
			}
			a = append(a, "-blockdev", bd)
		} else {
			a = append(a,
				"-blockdev", fmt.Sprintf("driver=file,node-name=%s-file,filename=%s,read-only=%s", node, quote(d.Path), ro),
				"-blockdev", fmt.Sprintf("driver=%s,node-name=%s,file=%s-file,read-only=%s", d.Format, node, node, ro))
		}
		dev := fmt.Sprintf("virtio-blk-pci,id=%s-dev,drive=%s", node, node)
		if i == 0 && s.Image != "" {
			dev += ",bootindex=0"
		}
		a = append(a, "-device", dev)
	}
	for i, n := range s.NICs {
		id := NICNetdevID(i)
		switch {
		case n.Stream != "":
			a = append(a, "-netdev", fmt.Sprintf("stream,id=%s,server=off,addr.type=unix,addr.path=%s", id, quote(n.Stream)))
		case n.User:
			nd := "user,id=" + id
			for _, f := range n.Fwd {
				hp, gp, _ := strings.Cut(f, ":")
				nd += fmt.Sprintf(",hostfwd=tcp:127.0.0.1:%s-:%s", hp, gp)
			}
			a = append(a, "-netdev", nd)
		}
		a = append(a, "-device", fmt.Sprintf("virtio-net-pci,id=%s-dev,netdev=%s,mac=%s", id, id, n.MAC))
	}
	if o.standby {
		// -S keeps the restored guest paused after the incoming migration,
		// so promotion decides when it runs (and emits output).
		a = append(a, "-incoming", "defer", "-S")
	}
	return append(a, s.ExtraArgs...)
}
