package failover

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

// requireRoot skips unless the test may create network namespaces.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and veth pairs")
	}
}

var nsSeq atomic.Uint64

// newNetns creates a named network namespace with loopback up; it is
// deleted when the test ends. It returns the namespace's path.
func newNetns(t testing.TB) string {
	t.Helper()
	requireRoot(t)
	name := fmt.Sprintf("ftfo-%d-%d", os.Getpid(), nsSeq.Add(1))
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := netns.NewNamed(name)
		if err == nil {
			ns.Close()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	path := filepath.Join("/var/run/netns", name)
	h := nsHandle(t, path)
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("loopback up in %s: %v", name, err)
	}
	return path
}

func nsHandle(t testing.TB, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// lan is two namespaces joined by a veth pair: "a" (10.213.7.1/24 on
// interface fa) and "b" (10.213.7.2/24 on interface fb).
type lan struct {
	nsA, nsB string
	hA, hB   *netlink.Handle
}

const (
	lanIPA    = "10.213.7.1"
	lanIPB    = "10.213.7.2"
	lanAbsent = "10.213.7.9" // on the subnet, owned by nobody
)

func newLAN(t testing.TB) *lan {
	t.Helper()
	l := &lan{nsA: newNetns(t), nsB: newNetns(t)}
	l.hA, l.hB = nsHandle(t, l.nsA), nsHandle(t, l.nsB)
	nsB, err := netns.GetFromPath(l.nsB)
	if err != nil {
		t.Fatal(err)
	}
	defer nsB.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "fa"},
		PeerName:      "fb",
		PeerNamespace: netlink.NsFd(int(nsB)),
	}
	if err := l.hA.LinkAdd(veth); err != nil {
		t.Fatalf("veth add: %v", err)
	}
	for _, side := range []struct {
		h    *netlink.Handle
		name string
		ip   string
	}{{l.hA, "fa", lanIPA}, {l.hB, "fb", lanIPB}} {
		link, err := side.h.LinkByName(side.name)
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr(side.ip + "/24")
		if err := side.h.AddrAdd(link, addr); err != nil {
			t.Fatalf("addr %s on %s: %v", side.ip, side.name, err)
		}
		if err := side.h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// setLink brings interface name in the namespace of h up or down.
func setLink(t testing.TB, h *netlink.Handle, name string, up bool) {
	t.Helper()
	link, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if up {
		err = h.LinkSetUp(link)
	} else {
		err = h.LinkSetDown(link)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// listenUDPIn opens a UDP socket on addr inside the namespace at path.
func listenUDPIn(t testing.TB, path, addr string) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	err := InNetns(path, func() error {
		var err error
		c, err = net.ListenPacket("udp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen udp %s in %s: %v", addr, path, err)
	}
	return c
}

// waitFor polls cond every 5 ms for up to d (a generous bound for a loaded
// machine, not a speed assertion).
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
