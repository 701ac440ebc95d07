package netbuf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var tapSeq int

func nextTapName() string {
	tapSeq++
	return fmt.Sprintf("ftnbt%d", tapSeq)
}

func TestTapConformance(t *testing.T) {
	ns := newNetns(t)
	testPortConformance(t, func(t *testing.T) (Port, portPeer) {
		tap, err := OpenTap(nextTapName(), TapOptions{NetNS: ns.path})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tap.Close() })
		return tap, newPacketPeer(t, ns, tap.Index())
	})
}

func TestOpenTapConfiguresTheLink(t *testing.T) {
	ns := newNetns(t)
	pfx := netip.MustParsePrefix("10.213.7.1/24")
	tap, err := OpenTap("ftnbcfg", TapOptions{NetNS: ns.path, MTU: 1400, Addrs: []netip.Prefix{pfx}})
	if err != nil {
		t.Fatal(err)
	}
	h := ns.handle(t)
	l, err := h.LinkByName("ftnbcfg")
	if err != nil {
		t.Fatalf("tap not in its namespace: %v", err)
	}
	a := l.Attrs()
	if a.Index != tap.Index() || a.MTU != 1400 || a.Flags&net.FlagUp == 0 {
		t.Fatalf("link index %d mtu %d flags %v; want index %d, mtu 1400, up", a.Index, a.MTU, a.Flags, tap.Index())
	}
	if tt, ok := l.(*netlink.Tuntap); !ok || tt.Mode != netlink.TUNTAP_MODE_TAP || tt.Flags&netlink.TUNTAP_NO_PI == 0 {
		t.Fatalf("link is %T %+v, want a tap without packet information", l, l)
	}
	addrs, err := h.AddrList(l, unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 1 || addrs[0].IPNet.String() != pfx.String() {
		t.Fatalf("addresses %v, want %v", addrs, pfx)
	}
	// Nothing leaked into the test's own namespace.
	if _, err := netlink.LinkByName("ftnbcfg"); err == nil {
		t.Fatal("the tap also appears in the caller's namespace")
	}
	tap.Close()
	if _, err := h.LinkByName("ftnbcfg"); err == nil {
		t.Fatal("a tap OpenTap created outlived Close")
	}
}

func TestOpenTapAttachesToPersistentTap(t *testing.T) {
	ns := newNetns(t)
	err := ns.do(func() error {
		return netlink.LinkAdd(&netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: "ftnbpers"},
			Mode:      netlink.TUNTAP_MODE_TAP,
			Flags:     netlink.TUNTAP_NO_PI,
		})
	})
	if err != nil {
		t.Fatalf("create a persistent tap: %v", err)
	}
	h := ns.handle(t)
	before, err := h.LinkByName("ftnbpers")
	if err != nil {
		t.Fatal(err)
	}
	tap, err := OpenTap("ftnbpers", TapOptions{NetNS: ns.path})
	if err != nil {
		t.Fatalf("attach to a persistent tap: %v", err)
	}
	if tap.Index() != before.Attrs().Index || tap.Name() != "ftnbpers" {
		t.Fatalf("attached to index %d %q, want %d", tap.Index(), tap.Name(), before.Attrs().Index)
	}
	tap.Close()
	if _, err := h.LinkByName("ftnbpers"); err != nil {
		t.Fatalf("closing an attached persistent tap removed it: %v", err)
	}
	// A device that is not a tap cannot be attached to.
	if tap, err := OpenTap("lo", TapOptions{NetNS: ns.path}); err == nil {
		tap.Close()
		t.Fatal("OpenTap attached to the loopback device")
	}
}

func TestOpenTapRejectsBadOptions(t *testing.T) {
	cases := []struct {
		name string
		tap  string
		o    TapOptions
	}{
		{"empty name", "", TapOptions{}},
		{"long name", "abcdefghijklmnop", TapOptions{}},
		{"slash in name", "a/b", TapOptions{}},
		{"dot", ".", TapOptions{}},
		{"template", "tap%d", TapOptions{}},
		{"MTU too small", "ftnbx", TapOptions{MTU: 10}},
		{"MTU too large", "ftnbx", TapOptions{MTU: 70000}},
		{"zero prefix", "ftnbx", TapOptions{Addrs: []netip.Prefix{{}}}},
		{"missing netns", "ftnbx", TapOptions{NetNS: "/nonexistent/netns"}},
	}
	for _, c := range cases {
		tap, err := OpenTap(c.tap, c.o)
		if !errors.Is(err, ErrInvalidOptions) {
			if tap != nil {
				tap.Close()
			}
			t.Errorf("%s: err %v, want ErrInvalidOptions", c.name, err)
		}
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun for the remaining case")
	}
}
