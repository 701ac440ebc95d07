package testbed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"slices"
)

// Do runs fn on an OS thread inside the host's namespace. Sockets and
// devices fn creates belong to the namespace and work from any goroutine
// afterwards; goroutines fn starts run outside it.
func (h *Host) Do(fn func() error) error {
	if err := h.bed.checkOpen(); err != nil {
		return err
	}
	return inNetns(h.NetNS, fn)
}

// Command is exec.CommandContext for a program run inside the host's
// namespace, through nsenter(1), which execs the program in its own
// process: cmd.Process is the program itself.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + h.NetNS, "--", name}, args...)...)
}

// Listen is net.ListenConfig.Listen inside the host's namespace.
func (h *Host) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	var l net.Listener
	err := h.Do(func() (err error) {
		l, err = (&net.ListenConfig{}).Listen(ctx, network, address)
		return err
	})
	return l, err
}

// ListenPacket is net.ListenConfig.ListenPacket inside the host's namespace.
func (h *Host) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	var c net.PacketConn
	err := h.Do(func() (err error) {
		c, err = (&net.ListenConfig{}).ListenPacket(ctx, network, address)
		return err
	})
	return c, err
}

// Dial is net.Dialer.DialContext from inside the host's namespace.
func (h *Host) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() (err error) {
		c, err = (&net.Dialer{}).DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Attach makes the existing interface ifname (a VM's tap) a port of the
// host's br-vm, and brings it up: the VM behind it is then on the LAN.
func (h *Host) Attach(ifname string) error {
	if err := h.bed.checkOpen(); err != nil {
		return err
	}
	if h.Bridge == "" {
		return fmt.Errorf("%w: %s has no VM bridge", ErrNoLink, h.Name)
	}
	nh, err := handleAt(h.NetNS)
	if err != nil {
		return err
	}
	defer nh.Close()
	l, err := nh.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", ifname, h.NSName, err)
	}
	br, err := nh.LinkByName(h.Bridge)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", h.Bridge, h.NSName, err)
	}
	if err := nh.LinkSetMaster(l, br); err != nil {
		return fmt.Errorf("%s into %s in %s: %w", ifname, h.Bridge, h.NSName, err)
	}
	if err := nh.LinkSetUp(l); err != nil {
		return fmt.Errorf("%s up in %s: %w", ifname, h.NSName, err)
	}
	return nil
}

// Cut silently drops all traffic of host h on network n: its port leaves
// the switch's bridge, while both ends of the cable stay up with carrier.
func (b *Bed) Cut(h *Host, n Net) error { return b.setLink(h, n, false) }

// Restore undoes Cut.
func (b *Bed) Restore(h *Host, n Net) error { return b.setLink(h, n, true) }

// CutReplication cuts every host off the replication network: the
// replication link between A and B fails; LAN and mgmt keep working.
func (b *Bed) CutReplication() error { return b.setAll(NetRepl, false) }

// RestoreReplication undoes CutReplication.
func (b *Bed) RestoreReplication() error { return b.setAll(NetRepl, true) }

// CutMgmt cuts every host off the management network (the second
// heartbeat path).
func (b *Bed) CutMgmt() error { return b.setAll(NetMgmt, false) }

// RestoreMgmt undoes CutMgmt.
func (b *Bed) RestoreMgmt() error { return b.setAll(NetMgmt, true) }

// IsolateHost cuts every link of h, as if the host had died; processes in
// it keep running (kill them too to model a real death).
func (b *Bed) IsolateHost(h *Host) error { return b.setHost(h, false) }

// Rejoin restores every link of h, including ones cut separately.
func (b *Bed) Rejoin(h *Host) error { return b.setHost(h, true) }

func (b *Bed) setAll(n Net, up bool) error {
	var errs []error
	for _, h := range b.Hosts {
		errs = append(errs, b.setLink(h, n, up))
	}
	return errors.Join(errs...)
}

func (b *Bed) setHost(h *Host, up bool) error {
	if h == nil || h.bed != b || len(h.nets) == 0 {
		return fmt.Errorf("%w: %s is not a host of this bed wired to the switch", ErrNoLink, hostName(h))
	}
	var errs []error
	for _, n := range h.nets {
		errs = append(errs, b.setLink(h, n, up))
	}
	return errors.Join(errs...)
}

func hostName(h *Host) string {
	if h == nil {
		return "<nil host>"
	}
	return h.Name
}

func (b *Bed) setLink(h *Host, n Net, up bool) error {
	if h == nil || h.bed != b || !slices.Contains(h.nets, n) {
		return fmt.Errorf("%w: %s is not on network %q of this bed", ErrNoLink, hostName(h), n)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.checkOpen(); err != nil {
		return err
	}
	sw, err := handleAt(b.LAN.NetNS)
	if err != nil {
		return err
	}
	defer sw.Close()
	port := portName(h, n)
	if up {
		return setPort(sw, port, string(n))
	}
	p, err := sw.LinkByName(port)
	if err != nil {
		return fmt.Errorf("find port %s: %w", port, err)
	}
	if err := sw.LinkSetNoMaster(p); err != nil {
		return fmt.Errorf("cut port %s: %w", port, err)
	}
	b.log.Debug("cut", "host", h.Name, "net", n)
	return nil
}
