// Package vm owns the description of a guest (Spec), its translation into a
// QEMU command line, and the life of the QEMU process that runs it: start,
// QMP connection, serial console capture, stop, kill and clean-up of the
// guest-RAM file. Guest RAM always lives in a memory-backend-file with
// share=on, because every checkpoint path in ftctl reads or writes that file
// directly; a Machine started in standby mode maps a replica RAM file it does
// not own and waits for an incoming migration.
package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
)

// ErrInvalidSpec is wrapped by every validation error; the message names the
// offending field.
var ErrInvalidSpec = errors.New("invalid VM spec")

// Accelerator choices for Spec.Accel.
const (
	AccelAuto = "auto" // KVM when a probe shows it really runs a guest, else TCG
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Spec describes one guest. The same Spec must be used for a primary and its
// standby: QEMU's migration stream only loads into an identically shaped
// machine, and every device id here is derived from the Spec alone.
type Spec struct {
	Name      string `json:"name"`
	MemoryMiB int    `json:"memory_mib"`
	VCPUs     int    `json:"vcpus,omitempty"`

	// Direct kernel boot (the built-in guest) ...
	Kernel  string `json:"kernel,omitempty"`
	Initrd  string `json:"initrd,omitempty"`
	Cmdline string `json:"cmdline,omitempty"`
	// ... or boot from a disk image (attached as the first virtio disk).
	Image string `json:"image,omitempty"`

	Disks []Disk `json:"disks,omitempty"`
	NICs  []NIC  `json:"nics,omitempty"`

	Accel   string `json:"accel,omitempty"`   // auto (default), kvm, tcg
	Machine string `json:"machine,omitempty"` // default "pc"
	CPU     string `json:"cpu,omitempty"`     // default: QEMU's default model (migratable)
	QEMU    string `json:"qemu,omitempty"`    // binary; default qemu-system-x86_64

	// ExtraArgs are appended verbatim; an escape hatch, not validated.
	ExtraArgs []string `json:"extra_args,omitempty"`
}

// Disk is a virtio-blk disk backed by a local file or by an NBD export (the
// way ftctl's agent sees every write).
type Disk struct {
	Path     string `json:"path,omitempty"`   // local image file
	Format   string `json:"format,omitempty"` // raw (default) or qcow2, for Path
	NBD      *NBD   `json:"nbd,omitempty"`    // instead of Path
	ReadOnly bool   `json:"read_only,omitempty"`
}

// NBD names an NBD export on a unix socket.
type NBD struct {
	Socket string `json:"socket"`
	Export string `json:"export,omitempty"`
}

// NIC is a virtio-net card. Stream connects it to a unix socket (QEMU
// `-netdev stream`, frames prefixed by a 4-byte big-endian length) on which
// ftctl's agent buffers output; User gives QEMU's user-mode network with
// optional loopback-only port forwards, for running a guest by hand.
type NIC struct {
	MAC    string   `json:"mac,omitempty"`
	Stream string   `json:"stream,omitempty"`
	User   bool     `json:"user,omitempty"`
	Fwd    []string `json:"fwd,omitempty"` // "HOSTPORT:GUESTPORT" (tcp, host side 127.0.0.1)
}

// LoadSpec reads a JSON spec file, rejecting unknown fields so that a typo
// in a field name is an error rather than a silently ignored setting.
func LoadSpec(path string) (Spec, error) {
	f, err := os.Open(path)
	if err != nil {
		return Spec{}, fmt.Errorf("read spec: %w", err)
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	var s Spec
	if err := dec.Decode(&s); err != nil {
		return Spec{}, fmt.Errorf("%w: %s: %v", ErrInvalidSpec, path, err)
	}
	return s, nil
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func invalid(field, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrInvalidSpec, field, fmt.Sprintf(format, args...))
}

// WithDefaults returns a copy with empty optional fields filled in.
func (s Spec) WithDefaults() Spec {
	if s.VCPUs == 0 {
		s.VCPUs = 1
	}
	if s.Accel == "" {
		s.Accel = AccelAuto
	}
	if s.Machine == "" {
		s.Machine = "pc"
	}
	if s.QEMU == "" {
		s.QEMU = "qemu-system-x86_64"
	}
	s.Disks = append([]Disk(nil), s.Disks...)
	for i := range s.Disks {
		if s.Disks[i].Path != "" && s.Disks[i].Format == "" {
			s.Disks[i].Format = "raw"
		}
	}
	s.NICs = append([]NIC(nil), s.NICs...)
	for i := range s.NICs {
		if s.NICs[i].MAC == "" {
			s.NICs[i].MAC = defaultMAC(s.Name, i)
		}
	}
	return s
}

// defaultMAC derives a stable locally administered MAC from the VM name so a
// primary and its standby agree without the user choosing one.
func defaultMAC(name string, i int) string {
	var h uint32 = 2166136261
	for _, c := range []byte(name) {
		h = (h ^ uint32(c)) * 16777619
	}
	return fmt.Sprintf("52:54:%02x:%02x:%02x:%02x", byte(h>>24), byte(h>>16), byte(h>>8), byte(h)+byte(i))
}

// Validate checks the spec and the files it names. Errors wrap
// ErrInvalidSpec and name the field.
func (s Spec) Validate() error {
	if !nameRE.MatchString(s.Name) {
		return invalid("name", "%q must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", s.Name)
	}
	if s.MemoryMiB <= 0 {
		return invalid("memory_mib", "must be > 0 (got %d)", s.MemoryMiB)
	}
	if s.MemoryMiB%2 != 0 {
		return invalid("memory_mib", "must be a multiple of 2 MiB (got %d)", s.MemoryMiB)
	}
	if s.VCPUs < 0 || s.VCPUs > 255 {
		return invalid("vcpus", "must be between 1 and 255 (got %d)", s.VCPUs)
	}
	switch s.Accel {
	case "", AccelAuto, AccelKVM, AccelTCG:
	default:
		return invalid("accel", "unknown accelerator %q (want auto, kvm or tcg)", s.Accel)
	}
	switch {
	case s.Kernel == "" && s.Image == "":
		return invalid("kernel", "either kernel (direct boot) or image must be set")
	case s.Kernel != "" && s.Image != "":
		return invalid("image", "set kernel or image, not both")
	}
	if s.Kernel != "" {
		if err := regularFile(s.Kernel); err != nil {
			return invalid("kernel", "%v", err)
		}
		if s.Initrd != "" {
			if err := regularFile(s.Initrd); err != nil {
				return invalid("initrd", "%v", err)
			}
		}
	} else {
		if s.Initrd != "" || s.Cmdline != "" {
			return invalid("initrd", "initrd and cmdline need kernel")
		}
		if err := regularFile(s.Image); err != nil {
			return invalid("image", "%v", err)
		}
	}
	for i, d := range s.Disks {
		f := fmt.Sprintf("disks[%d]", i)
		switch {
		case d.Path == "" && d.NBD == nil:
			return invalid(f, "needs path or nbd")
		case d.Path != "" && d.NBD != nil:
			return invalid(f, "set path or nbd, not both")
		case d.NBD != nil:
			if d.NBD.Socket == "" {
				return invalid(f+".nbd.socket", "must be set")
			}
			if d.Format != "" && d.Format != "raw" {
				return invalid(f+".format", "an NBD export is always raw (got %q)", d.Format)
			}
		default:
			if d.Format != "" && d.Format != "raw" && d.Format != "qcow2" {
				return invalid(f+".format", "unknown format %q (want raw or qcow2)", d.Format)
			}
			if err := regularFile(d.Path); err != nil {
				return invalid(f+".path", "%v", err)
			}
		}
	}
	for i, n := range s.NICs {
		f := fmt.Sprintf("nics[%d]", i)
		if n.MAC != "" {
			if _, err := net.ParseMAC(n.MAC); err != nil {
				return invalid(f+".mac", "%v", err)
			}
		}
		if (n.Stream == "") == !n.User {
			return invalid(f, "set exactly one of stream (agent socket) or user")
		}
		if len(n.Fwd) > 0 && !n.User {
			return invalid(f+".fwd", "port forwards need user networking")
		}
		for _, fw := range n.Fwd {
			if !regexp.MustCompile(`^[0-9]{1,5}:[0-9]{1,5}$`).MatchString(fw) {
				return invalid(f+".fwd", "%q is not HOSTPORT:GUESTPORT", fw)
			}
		}
	}
	return nil
}

func regularFile(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", p)
	}
	return nil
}

// quote escapes a value for QEMU's option syntax, where ',' must be doubled.
func quote(v string) string { return strings.ReplaceAll(v, ",", ",,") }
