package testbed

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// FakeVM stands in for VM i where a real guest is not needed: a namespace
// whose eth0 has the VM's address and MAC, cabled by a veth to a host's
// br-vm (the port is "fvm<i>" in the host). It can move to another host
// the way a failover moves a VM. Its embedded Host runs programs and
// sockets "inside the VM".
type FakeVM struct {
	*Host
	// Index is i; Addr is VMAddr(i) and MAC is VMMAC(i).
	Index int
	Addr  netip.Prefix
	MAC   net.HardwareAddr

	mu sync.Mutex
	on *Host
}

const fakeVMIf = "eth0"

func fakeVMPort(i int) string { return fmt.Sprintf("fvm%d", i) }

// AddFakeVM creates fake VM i (0 <= i < MaxVMs) running on host on.
func (b *Bed) AddFakeVM(ctx context.Context, i int, on *Host) (*FakeVM, error) {
	addr, err := b.VMAddr(i)
	if err != nil {
		return nil, err
	}
	mac, _ := b.VMMAC(i)
	if on == nil || on.bed != b || on.Bridge == "" {
		return nil, fmt.Errorf("%w: fake VM %d must run on a KVM host of this bed, not %s", ErrInvalidOptions, i, hostName(on))
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.checkOpen(); err != nil {
		return nil, err
	}
	if _, dup := b.vms[i]; dup {
		return nil, fmt.Errorf("%w: fake VM %d exists already", ErrInvalidOptions, i)
	}
	v := &FakeVM{Host: b.newHost(fmt.Sprintf("vm%d", i)), Index: i, Addr: addr, MAC: mac}
	v.LANAddr = addr.Addr()
	if err := createNetns(v.NSName); err != nil {
		return nil, err
	}
	b.netns = append(b.netns, v.NSName)
	if err := v.wire(on); err != nil {
		// removeNetns deletes the veth, whose peer may be in on already.
		if rerr := removeNetns(v.NSName, true); rerr == nil {
			b.netns = slices.DeleteFunc(b.netns, func(n string) bool { return n == v.NSName })
		}
		return nil, fmt.Errorf("fake VM %d: %w", i, err)
	}
	v.on = on
	b.vms[i] = v
	b.log.Debug("fake VM added", "vm", i, "addr", addr, "host", on.Name)
	return v, nil
}

func (v *FakeVM) wire(on *Host) error {
	vh, err := handleAt(v.NetNS)
	if err != nil {
		return err
	}
	defer vh.Close()
	hostNS, err := netns.GetFromPath(on.NetNS)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", on.NetNS, err)
	}
	defer hostNS.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: fakeVMIf, HardwareAddr: v.MAC, Group: linkGroup},
		PeerName:      fakeVMPort(v.Index),
		PeerNamespace: netlink.NsFd(hostNS),
	}
	if err := vh.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s/%s: %w", fakeVMIf, veth.PeerName, err)
	}
	l, err := vh.LinkByName(fakeVMIf)
	if err != nil {
		return err
	}
	if err := vh.AddrAdd(l, &netlink.Addr{IPNet: ipNet(v.Addr.Addr(), v.Addr.Bits())}); err != nil {
		return fmt.Errorf("address %v on %s: %w", v.Addr, fakeVMIf, err)
	}
	if err := vh.LinkSetUp(l); err != nil {
		return err
	}
	return on.Attach(veth.PeerName)
}

// On is the host the fake VM currently runs on.
func (v *FakeVM) On() *Host {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.on
}

// MoveTo moves the fake VM's cable from its current host's br-vm to h's,
// then announces it (Announce) so the LAN's switch learns the new port, as
// QEMU's announce-self does after a failover. Until the announcement, the
// switch still forwards the VM's traffic to the old host.
func (v *FakeVM) MoveTo(ctx context.Context, h *Host) error {
	b := v.bed
	if h == nil || h.bed != b || h.Bridge == "" {
		return fmt.Errorf("%w: fake VM %d can only move to a KVM host of this bed, not %s", ErrInvalidOptions, v.Index, hostName(h))
	}
	if err := b.checkOpen(); err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.on == h {
		return nil
	}
	from, err := handleAt(v.on.NetNS)
	if err != nil {
		return err
	}
	defer from.Close()
	port := fakeVMPort(v.Index)
	l, err := from.LinkByName(port)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", port, v.on.NSName, err)
	}
	to, err := netns.GetFromPath(h.NetNS)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", h.NetNS, err)
	}
	err = from.LinkSetNsFd(l, int(to))
	to.Close()
	if err != nil {
		return fmt.Errorf("move %s from %s to %s: %w", port, v.on.NSName, h.NSName, err)
	}
	v.on = h
	if err := h.Attach(port); err != nil {
		return err
	}
	b.log.Debug("fake VM moved", "vm", v.Index, "host", h.Name)
	// Frames sent before the kernel has processed the new carrier are
	// dropped (the device has no active queue yet): wait for both ends.
	if err := waitOperUp(ctx, h, port); err != nil {
		return err
	}
	if err := waitOperUp(ctx, v.Host, fakeVMIf); err != nil {
		return err
	}
	return v.Announce(ctx)
}

// operUpTimeout bounds the wait for a link that just got carrier.
const operUpTimeout = 5 * time.Second

// waitOperUp polls until link name in h reports operational state up.
func waitOperUp(ctx context.Context, h *Host, name string) error {
	nh, err := handleAt(h.NetNS)
	if err != nil {
		return err
	}
	defer nh.Close()
	ctx, cancel := context.WithTimeout(ctx, operUpTimeout)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		l, err := nh.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s in %s: %w", name, h.NSName, err)
		}
		if l.Attrs().OperState == netlink.OperUp {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s in %s not up (state %v): %w", name, h.NSName, l.Attrs().OperState, ctx.Err())
		case <-tick.C:
		}
	}
}

// announceGaps are the pauses between the rounds of Announce, like the
// rounds of QEMU's announce-self: one frame can be lost, several rarely are.
var announceGaps = []time.Duration{0, 20 * time.Millisecond, 50 * time.Millisecond}

// Announce broadcasts gratuitous ARPs from the fake VM's eth0 in a few
// rounds, which tells the switch where its MAC now is and the LAN's hosts
// which MAC has its address.
func (v *FakeVM) Announce(ctx context.Context) error {
	var fd, ifindex int
	err := v.Do(func() error {
		ifi, err := net.InterfaceByName(fakeVMIf)
		if err != nil {
			return err
		}
		ifindex = ifi.Index
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("fake VM %d: announce: %w", v.Index, err)
	}
	defer unix.Close(fd)
	bcast := [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifindex, Halen: 6, Addr: bcast}
	frame := garp(v.MAC, v.Addr.Addr())
	for _, gap := range announceGaps {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(gap):
		}
		if err := unix.Sendto(fd, frame, 0, to); err != nil {
			return fmt.Errorf("fake VM %d: send gratuitous ARP: %w", v.Index, err)
		}
	}
	return nil
}

// garp builds an Ethernet frame with an ARP request for the sender's own
// address (sender and target address equal).
func garp(mac net.HardwareAddr, ip netip.Addr) []byte {
	f := make([]byte, 0, 60)
	f = append(f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	f = append(f, mac...)
	f = binary.BigEndian.AppendUint16(f, unix.ETH_P_ARP)
	f = binary.BigEndian.AppendUint16(f, 1)      // hardware: Ethernet
	f = binary.BigEndian.AppendUint16(f, 0x0800) // protocol: IPv4
	f = append(f, 6, 4)
	f = binary.BigEndian.AppendUint16(f, 1) // request
	a := ip.As4()
	f = append(f, mac...)
	f = append(f, a[:]...)
	f = append(f, 0, 0, 0, 0, 0, 0)
	f = append(f, a[:]...)
	for len(f) < 60 { // minimum Ethernet frame without FCS
		f = append(f, 0)
	}
	return f
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
