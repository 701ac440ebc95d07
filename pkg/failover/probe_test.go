package failover

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"
)

func freeClosedPort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return uint16(port)
}

func TestTCPProbeLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	open := uint16(ln.Addr().(*net.TCPAddr).Port)
	closed := freeClosedPort(t)
	lo := netip.MustParseAddr("127.0.0.1")

	p, err := NewTCPProbe(TCPProbeConfig{Addr: lo, Ports: []uint16{closed, open}, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r, err := p.Probe(context.Background())
	if err != nil || !r.Alive {
		t.Fatalf("listener on port %d: got %+v, %v; want alive", open, r, err)
	}

	p, _ = NewTCPProbe(TCPProbeConfig{Addr: lo, Ports: []uint16{closed}, Timeout: 2 * time.Second})
	r, err = p.Probe(context.Background())
	if err != nil || r.Alive {
		t.Fatalf("closed port %d: got %+v, %v; want silent", closed, r, err)
	}
	p, _ = NewTCPProbe(TCPProbeConfig{Addr: lo, Ports: []uint16{closed}, RefusedIsAlive: true})
	if r, err = p.Probe(context.Background()); err != nil || !r.Alive {
		t.Fatalf("closed port with RefusedIsAlive: got %+v, %v; want alive", r, err)
	}
}

func TestTCPProbeUnreachableInNetns(t *testing.T) {
	l := newLAN(t)
	// A listener in namespace b; the probe runs in namespace a.
	var ln net.Listener
	if err := InNetns(l.nsB, func() (err error) { ln, err = net.Listen("tcp", lanIPB+":0"); return }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)

	p, _ := NewTCPProbe(TCPProbeConfig{Addr: netip.MustParseAddr(lanIPB), Ports: []uint16{port}, Netns: l.nsA, Timeout: 3 * time.Second})
	if r, err := p.Probe(context.Background()); err != nil || !r.Alive {
		t.Fatalf("listener across the veth: got %+v, %v; want alive", r, err)
	}
	// From the host's namespace the address is not routed (or lands
	// somewhere else): the probe must have run in nsA to succeed above.
	timeout := 300 * time.Millisecond
	p, _ = NewTCPProbe(TCPProbeConfig{Addr: netip.MustParseAddr(lanAbsent), Ports: []uint16{port}, Netns: l.nsA, Timeout: timeout})
	start := time.Now()
	r, err := p.Probe(context.Background())
	if err != nil || r.Alive {
		t.Fatalf("absent address: got %+v, %v; want silent", r, err)
	}
	if el := time.Since(start); el < timeout {
		t.Fatalf("absent address declared silent after %v, before its timeout %v", el, timeout)
	}
	// No route at all: the probe cannot run, which is not silence.
	p, _ = NewTCPProbe(TCPProbeConfig{Addr: netip.MustParseAddr("10.214.0.1"), Ports: []uint16{80}, Netns: l.nsA})
	if _, err := p.Probe(context.Background()); !errors.Is(err, ErrProbe) {
		t.Fatalf("unrouted address: err %v, want ErrProbe", err)
	}
}

func TestICMPProbe(t *testing.T) {
	l := newLAN(t)
	// Allow ping sockets for root inside namespace a only (the sysctl is
	// per namespace), so both socket kinds are exercised.
	if err := InNetns(l.nsA, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte("0 0"), 0)
	}); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []ICMPMode{ICMPDatagram, ICMPRaw} {
		t.Run(strconv.Itoa(int(mode)), func(t *testing.T) {
			p, err := NewICMPProbe(ICMPProbeConfig{Addr: netip.MustParseAddr(lanIPB), Netns: l.nsA, Mode: mode, Timeout: 3 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			if r, err := p.Probe(context.Background()); err != nil || !r.Alive {
				t.Fatalf("peer in namespace: got %+v, %v; want alive", r, err)
			}
			p, _ = NewICMPProbe(ICMPProbeConfig{Addr: netip.MustParseAddr(lanAbsent), Netns: l.nsA, Mode: mode, Timeout: 300 * time.Millisecond})
			if r, err := p.Probe(context.Background()); err != nil || r.Alive {
				t.Fatalf("absent address: got %+v, %v; want silent", r, err)
			}
		})
	}
	// Loopback of the test's own namespace with the automatic choice.
	p, _ := NewICMPProbe(ICMPProbeConfig{Addr: netip.MustParseAddr("127.0.0.1"), Netns: l.nsB, Timeout: 3 * time.Second})
	if r, err := p.Probe(context.Background()); err != nil || !r.Alive {
		t.Fatalf("127.0.0.1: got %+v, %v; want alive", r, err)
	}
	// Namespace b forbids ping sockets (the default range "1 0").
	p, _ = NewICMPProbe(ICMPProbeConfig{Addr: netip.MustParseAddr("127.0.0.1"), Netns: l.nsB, Mode: ICMPDatagram})
	if _, err := p.Probe(context.Background()); !errors.Is(err, ErrProbe) {
		t.Fatalf("ping socket where forbidden: err %v, want ErrProbe", err)
	}
}

func TestARPProbe(t *testing.T) {
	l := newLAN(t)
	var macB net.HardwareAddr
	InNetns(l.nsB, func() error {
		ifi, err := net.InterfaceByName("fb")
		if err == nil {
			macB = ifi.HardwareAddr
		}
		return err
	})
	cfg := ARPProbeConfig{Addr: netip.MustParseAddr(lanIPB), Interface: "fa", Netns: l.nsA, Timeout: 3 * time.Second}
	p, err := NewARPProbe(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := p.Probe(context.Background())
	if err != nil || !r.Alive {
		t.Fatalf("peer end of the veth: got %+v, %v; want alive", r, err)
	}
	t.Logf("ARP answer: %s after %v", r.Detail, r.RTT)

	cfg.MAC = macB
	p, _ = NewARPProbe(cfg)
	if r, err := p.Probe(context.Background()); err != nil || !r.Alive {
		t.Fatalf("with the right MAC: got %+v, %v; want alive", r, err)
	}
	cfg.MAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	cfg.Timeout = 300 * time.Millisecond
	p, _ = NewARPProbe(cfg)
	if r, err := p.Probe(context.Background()); err != nil || r.Alive {
		t.Fatalf("answer from another MAC: got %+v, %v; want silent", r, err)
	}

	p, _ = NewARPProbe(ARPProbeConfig{Addr: netip.MustParseAddr(lanAbsent), Interface: "fa", Netns: l.nsA, Timeout: 300 * time.Millisecond})
	if r, err := p.Probe(context.Background()); err != nil || r.Alive {
		t.Fatalf("absent address: got %+v, %v; want silent", r, err)
	}

	p, _ = NewARPProbe(ARPProbeConfig{Addr: netip.MustParseAddr(lanIPB), Interface: "nosuch0", Netns: l.nsA})
	if _, err := p.Probe(context.Background()); !errors.Is(err, ErrProbe) {
		t.Fatalf("missing interface: err %v, want ErrProbe", err)
	}
	setLink(t, l.hA, "fa", false)
	p, _ = NewARPProbe(ARPProbeConfig{Addr: netip.MustParseAddr(lanIPB), Interface: "fa", Netns: l.nsA})
	if _, err := p.Probe(context.Background()); !errors.Is(err, ErrProbe) {
		t.Fatalf("interface down: err %v, want ErrProbe", err)
	}
}

func TestMultiProbe(t *testing.T) {
	l := newLAN(t)
	arp := func(ip string) Probe {
		p, err := NewARPProbe(ARPProbeConfig{Addr: netip.MustParseAddr(ip), Interface: "fa", Netns: l.nsA, Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	broken, _ := NewARPProbe(ARPProbeConfig{Addr: netip.MustParseAddr(lanIPB), Interface: "nosuch0", Netns: l.nsA})
	tcp, _ := NewTCPProbe(TCPProbeConfig{Addr: netip.MustParseAddr(lanAbsent), Ports: []uint16{22}, Netns: l.nsA, Timeout: 300 * time.Millisecond})

	if r, err := (MultiProbe{tcp, arp(lanIPB)}).Probe(context.Background()); err != nil || !r.Alive {
		t.Fatalf("one of two answers: got %+v, %v; want alive", r, err)
	}
	if r, err := (MultiProbe{broken, arp(lanIPB)}).Probe(context.Background()); err != nil || !r.Alive {
		t.Fatalf("broken + answering: got %+v, %v; want alive", r, err)
	}
	if r, err := (MultiProbe{tcp, arp(lanAbsent)}).Probe(context.Background()); err != nil || r.Alive {
		t.Fatalf("both silent: got %+v, %v; want silent", r, err)
	}
	if _, err := (MultiProbe{broken, arp(lanAbsent)}).Probe(context.Background()); !errors.Is(err, ErrProbe) {
		t.Fatalf("broken + silent: err %v, want ErrProbe (never silent on a probe that did not run)", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := (MultiProbe{arp(lanAbsent)}).Probe(ctx); !errors.Is(err, ErrProbe) || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: err %v, want ErrProbe wrapping context.Canceled", err)
	}
}

func TestProbeConfigErrors(t *testing.T) {
	cases := []struct {
		name string
		err  error
	}{
		{"tcp no addr", func() error { _, err := NewTCPProbe(TCPProbeConfig{Ports: []uint16{1}}); return err }()},
		{"tcp no ports", func() error {
			_, err := NewTCPProbe(TCPProbeConfig{Addr: netip.MustParseAddr("127.0.0.1")})
			return err
		}()},
		{"icmp v6", func() error { _, err := NewICMPProbe(ICMPProbeConfig{Addr: netip.MustParseAddr("::1")}); return err }()},
		{"arp no iface", func() error { _, err := NewARPProbe(ARPProbeConfig{Addr: netip.MustParseAddr("10.0.0.1")}); return err }()},
		{"arp bad mac", func() error {
			_, err := NewARPProbe(ARPProbeConfig{Addr: netip.MustParseAddr("10.0.0.1"), Interface: "x", MAC: net.HardwareAddr{1, 2}})
			return err
		}()},
		{"negative timeout", func() error {
			_, err := NewICMPProbe(ICMPProbeConfig{Addr: netip.MustParseAddr("10.0.0.1"), Timeout: -1})
			return err
		}()},
		{"empty multi", func() error { _, err := MultiProbe{}.Probe(context.Background()); return err }()},
	}
	for _, c := range cases {
		if !errors.Is(c.err, ErrConfig) {
			t.Errorf("%s: err %v, want ErrConfig", c.name, c.err)
		}
	}
}
