package testbed

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"testing"
)

func TestOptionsRefused(t *testing.T) {
	for _, o := range []Options{
		{Prefix: "Bad"}, {Prefix: "a-b"}, {Prefix: "toolongxx"}, {Prefix: "1ab"},
		{Hosts: 1}, {Hosts: MaxHosts + 1}, {Hosts: -2},
	} {
		if _, err := New(context.Background(), o); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("New(%+v) = %v, want ErrInvalidOptions", o, err)
		}
	}
	if _, err := CleanupStale(context.Background(), "x-y"); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("CleanupStale(bad prefix) = %v", err)
	}
}

func TestNeedRoot(t *testing.T) {
	old := geteuid
	geteuid = func() int { return 1000 }
	defer func() { geteuid = old }()
	if _, err := New(context.Background(), Options{}); !errors.Is(err, ErrNeedRoot) {
		t.Errorf("New as non-root = %v, want ErrNeedRoot", err)
	}
	if _, err := CleanupStale(context.Background(), DefaultPrefix); !errors.Is(err, ErrNeedRoot) {
		t.Errorf("CleanupStale as non-root = %v, want ErrNeedRoot", err)
	}
}

func TestAddressPlan(t *testing.T) {
	seen := map[netip.Prefix]int{}
	for s := range NumSlots {
		for k := range netsPerSlot {
			p := slotNet(s, k)
			if !netip.MustParsePrefix("10.213.0.0/16").Contains(p.Addr()) {
				t.Fatalf("slot %d net %d: %v outside 10.213.0.0/16", s, k, p)
			}
			if prev, dup := seen[p]; dup {
				t.Fatalf("slot %d reuses %v of slot %d", s, p, prev)
			}
			seen[p] = s
		}
	}
	b := &Bed{Slot: 7, LANNet: slotNet(7, 0)}
	macs := map[string]bool{}
	addrs := map[netip.Prefix]bool{}
	for i := range MaxVMs {
		a, err := b.VMAddr(i)
		if err != nil {
			t.Fatal(err)
		}
		m, err := b.VMMAC(i)
		if err != nil {
			t.Fatal(err)
		}
		if !b.LANNet.Contains(a.Addr()) || a.Bits() != b.LANNet.Bits() || addrs[a] || macs[m.String()] {
			t.Fatalf("VM %d: %v %v (LAN %v) outside the LAN or reused", i, a, m, b.LANNet)
		}
		if a.Addr() == withOctet(b.LANNet, clientOctet) || a.Addr() == withOctet(b.LANNet, hostOctetBase) {
			t.Fatalf("VM %d address %v is a host's", i, a)
		}
		if m[0]&1 != 0 {
			t.Fatalf("VM %d MAC %v is multicast", i, m)
		}
		addrs[a], macs[m.String()] = true, true
	}
	for _, i := range []int{-1, MaxVMs} {
		if _, err := b.VMAddr(i); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("VMAddr(%d) = %v", i, err)
		}
		if _, err := b.VMMAC(i); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("VMMAC(%d) = %v", i, err)
		}
	}
}

func TestNsNames(t *testing.T) {
	for _, c := range []struct {
		name string
		slot int
		ok   bool
	}{
		{"ftb-0-a", 0, true}, {"ftb-84-client", 84, true}, {"ftb-12-vm3", 12, true},
		{"ftb-85-a", 0, false}, {"ftb-01-a", 0, false}, {"ftb-1", 0, false}, {"ftb-1-", 0, false},
		{"ftbx-1-a", 0, false}, {"ft-1-a", 0, false}, {"ftb--1-a", 0, false}, {"ftb-x-a", 0, false},
	} {
		slot, ok := parseNsName("ftb", c.name)
		if ok != c.ok || (ok && slot != c.slot) {
			t.Errorf("parseNsName(%q) = %d, %v; want %d, %v", c.name, slot, ok, c.slot, c.ok)
		}
		if c.ok && nsName("ftb", c.slot, c.name[len("ftb-")+len(strconv.Itoa(c.slot))+1:]) != c.name {
			t.Errorf("nsName does not round-trip %q", c.name)
		}
	}
}

func TestGratuitousARPFrame(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 0xd5, 1, 50}
	ip := netip.MustParseAddr("10.213.3.50")
	f := garp(mac, ip)
	if len(f) != 60 {
		t.Fatalf("frame length %d, want 60", len(f))
	}
	want := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0xd5, 1, 50, 0x08, 0x06,
		0, 1, 0x08, 0, 6, 4, 0, 1,
		0x52, 0x54, 0, 0xd5, 1, 50, 10, 213, 3, 50,
		0, 0, 0, 0, 0, 0, 10, 213, 3, 50,
	}
	if !bytes.Equal(f[:len(want)], want) || !bytes.Equal(f[len(want):], make([]byte, 60-len(want))) {
		t.Errorf("gratuitous ARP\n got %x\nwant %x", f, want)
	}
}
