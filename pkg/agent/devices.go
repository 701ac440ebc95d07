package agent

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/vishvananda/netlink"

	"github.com/ftctl/ftctl/pkg/blockreplay"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/netbuf"
	"github.com/ftctl/ftctl/pkg/vm"
)

// devices are the agent's ends of a VM's disks and NICs: an NBD export per
// disk (every write logged) and an output-commit buffer per NIC, bridged
// through a tap. The same shape serves a primary and a standby, so both
// QEMUs get identical device models.
type devices struct {
	disks []*diskExport
	nics  []*nicPort
	spec  vm.Spec // what QEMU is given: disks as NBD, NICs as streams
	once  sync.Once
}

type diskExport struct {
	ex     *blockreplay.Export
	sink   *switchSink
	sock   string
	cancel context.CancelFunc
	done   chan struct{}
}

type nicPort struct {
	buf    *netbuf.Buffer
	tap    *netbuf.Tap
	cancel context.CancelFunc
	done   chan struct{}
}

func tapName(agent, vmName string, i int) string {
	h := fnv.New32a()
	h.Write([]byte(agent + "/" + vmName))
	return fmt.Sprintf("ft%06xn%d", h.Sum32()&0xffffff, i)
}

// openDevices serves images (one per disk of spec) and creates the NICs'
// buffers and taps, their sockets in dir. NICs start in passthrough:
// nothing is protected yet.
func (a *Agent) openDevices(name string, spec vm.Spec, dir string, images []string) (d *devices, err error) {
	return a.openDevicesAt(name, spec, dir, images, nil)
}

// deviceSockets names each device's socket explicitly (a libvirt domain's
// metadata says where its QEMU looks), instead of dir/nbdN.sock and
// dir/nicN.sock.
type deviceSockets struct {
	disks  []string
	export string // NBD export name; "" is "disk"
	nics   []string
}

// openDevicesAt is openDevices with the sockets at (nil: in dir).
func (a *Agent) openDevicesAt(name string, spec vm.Spec, dir string, images []string, at *deviceSockets) (d *devices, err error) {
	if len(images) != len(spec.Disks) {
		return nil, fmt.Errorf("%w: %d images for %d disks", ErrBadRequest, len(images), len(spec.Disks))
	}
	if at != nil && (len(at.disks) != len(images) || len(at.nics) != len(spec.NICs)) {
		return nil, fmt.Errorf("%w: %d disk and %d NIC sockets for %d disks and %d NICs", ErrBadRequest, len(at.disks), len(at.nics), len(images), len(spec.NICs))
	}
	if at == nil {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
	}
	sockAt := func(kind string, i int, named []string) (string, error) {
		if at == nil {
			return filepath.Join(dir, fmt.Sprintf("%s%d.sock", kind, i)), nil
		}
		p := named[i]
		if !filepath.IsAbs(p) {
			return "", fmt.Errorf("%w: %s %d: socket path %q is not absolute", ErrBadRequest, kind, i, p)
		}
		return p, os.MkdirAll(filepath.Dir(p), 0o700)
	}
	export := "disk"
	if at != nil && at.export != "" {
		export = at.export
	}
	d = &devices{spec: spec}
	defer func() {
		if err != nil {
			d.close()
		}
	}()
	d.spec.Disks = nil
	for i, img := range images {
		sink := &switchSink{}
		sock, err := sockAt("nbd", i, at.diskList())
		if err != nil {
			return d, fmt.Errorf("disk %d: %w", i, err)
		}
		ex, err := blockreplay.OpenExport(blockreplay.ExportConfig{Path: img, Name: export, Sink: sink})
		if err != nil {
			return d, fmt.Errorf("disk %d: %w", i, err)
		}
		os.Remove(sock)
		ln, err := net.Listen("unix", sock)
		if err != nil {
			ex.Close()
			return d, fmt.Errorf("disk %d: %w", i, err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		de := &diskExport{ex: ex, sink: sink, sock: sock, cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(de.done)
			if err := ex.Serve(ctx, ln); err != nil && ctx.Err() == nil {
				a.log.Error("NBD export stopped", "vm", name, "disk", i, "err", err)
			}
		}()
		d.disks = append(d.disks, de)
		d.spec.Disks = append(d.spec.Disks, vm.Disk{NBD: &vm.NBD{Socket: sock, Export: export}, ReadOnly: spec.Disks[i].ReadOnly})
	}
	d.spec.NICs = nil
	for i, n := range spec.NICs {
		var tap *netbuf.Tap
		tap, err = netbuf.OpenTap(tapName(a.cfg.Name, name, i), netbuf.TapOptions{})
		if err != nil {
			return d, fmt.Errorf("nic %d: %w", i, err)
		}
		if a.cfg.Bridge != "" {
			if err := joinBridge(tap.Name(), a.cfg.Bridge); err != nil {
				tap.Close()
				return d, fmt.Errorf("nic %d: %w", i, err)
			}
		}
		sock, err := sockAt("nic", i, at.nicList())
		if err != nil {
			tap.Close()
			return d, fmt.Errorf("nic %d: %w", i, err)
		}
		os.Remove(sock)
		buf, err := netbuf.New(sock, tap, netbuf.Options{Logger: a.log.With("vm", name, "nic", i)})
		if err != nil {
			tap.Close()
			return d, fmt.Errorf("nic %d: %w", i, err)
		}
		buf.SetPassthrough(true)
		ctx, cancel := context.WithCancel(context.Background())
		np := &nicPort{buf: buf, tap: tap, cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(np.done)
			if err := buf.Serve(ctx); err != nil {
				a.log.Error("NIC buffer stopped", "vm", name, "nic", i, "err", err)
			}
		}()
		d.nics = append(d.nics, np)
		n.Stream, n.User, n.Fwd = sock, false, nil
		d.spec.NICs = append(d.spec.NICs, n)
	}
	return d, nil
}

func (s *deviceSockets) diskList() []string {
	if s == nil {
		return nil
	}
	return s.disks
}

func (s *deviceSockets) nicList() []string {
	if s == nil {
		return nil
	}
	return s.nics
}

func joinBridge(link, bridge string) error {
	l, err := netlink.LinkByName(link)
	if err != nil {
		return err
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", bridge, err)
	}
	return netlink.LinkSetMaster(l, br)
}

// passthrough switches every NIC between protected (held until commit) and
// unprotected (frames go out at once; held frames are released).
func (d *devices) passthrough(on bool) {
	for _, n := range d.nics {
		n.buf.SetPassthrough(on)
	}
}

// stream points the disk's event log at dest (nil: discard). Call it with
// the VM paused.
func (d *devices) stream(dest eventlog.Sink) {
	for _, de := range d.disks {
		de.sink.set(dest)
	}
}

func (d *devices) close() { d.once.Do(d.doClose) }

func (d *devices) doClose() {
	var errs []error
	for _, de := range d.disks {
		de.cancel()
		<-de.done
		errs = append(errs, de.ex.Close())
	}
	for _, n := range d.nics {
		n.cancel()
		<-n.done
		errs = append(errs, n.buf.Close(), n.tap.Close())
	}
	_ = errors.Join(errs...)
}

// output adapts the NICs' buffers to the coordinator's single Output.
type output struct{ nics []*nicPort }

func (o output) Seal(n uint64) (frames int, bytes int64) {
	for _, p := range o.nics {
		f, b := p.buf.Seal(n)
		frames += f
		bytes += b
	}
	return frames, bytes
}

func (o output) Release(n uint64) {
	for _, p := range o.nics {
		p.buf.Release(n)
	}
}

func (o output) SetPassthrough(on bool) {
	for _, p := range o.nics {
		p.buf.SetPassthrough(on)
	}
}

// Outbound merges the NICs' output signals.
func (o output) Outbound() <-chan struct{} {
	if len(o.nics) == 1 {
		return o.nics[0].buf.Outbound()
	}
	ch := make(chan struct{}, 1)
	for _, p := range o.nics {
		go func(in <-chan struct{}) {
			for range in {
				select {
				case ch <- struct{}{}:
				default:
				}
			}
		}(p.buf.Outbound())
	}
	return ch
}
