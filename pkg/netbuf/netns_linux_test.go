package netbuf

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// requireTap skips unless the test can create namespaces and taps.
func requireTap(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and taps")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("needs /dev/net/tun:", err)
	}
}

var nsSeq atomic.Uint64

// testNetns is a network namespace the test created and deletes.
type testNetns struct {
	name string
	path string
}

// newNetns creates a named network namespace with its loopback up, deleted
// when the test ends. All test traffic stays inside it.
func newNetns(t testing.TB) *testNetns {
	t.Helper()
	requireTap(t)
	name := fmt.Sprintf("ftnb-%d-%d", os.Getpid(), nsSeq.Add(1))
	errc := make(chan error, 1)
	go func() {
		// NewNamed moves this thread into the new namespace: keep the
		// thread locked so it is discarded when the goroutine ends.
		runtime.LockOSThread()
		ns, err := netns.NewNamed(name)
		if err == nil {
			ns.Close()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	n := &testNetns{name: name, path: filepath.Join("/var/run/netns", name)}
	t.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	if _, err := os.Stat(n.path); err != nil {
		t.Fatalf("netns %s has no file at %s: %v", name, n.path, err)
	}
	h := n.handle(t)
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("loopback up in %s: %v", name, err)
	}
	return n
}

// handle returns a netlink handle working in the namespace.
func (n *testNetns) handle(t testing.TB) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(n.path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Delete)
	return h
}

// do runs fn on a thread inside the namespace; sockets fn creates belong to
// the namespace and keep working from any thread afterwards.
func (n *testNetns) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := netns.GetFromPath(n.path)
		if err != nil {
			errc <- err
			return
		}
		err = netns.Set(ns)
		ns.Close()
		if err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// linkStats reads an interface's counters inside the namespace.
func (n *testNetns) linkStats(t testing.TB, h *netlink.Handle, name string) *netlink.LinkStatistics {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().Statistics == nil {
		t.Fatalf("no statistics for %s", name)
	}
	return l.Attrs().Statistics
}

// packetPeer is a raw AF_PACKET socket on one interface: it sends frames
// into the interface's transmit path and sees what the interface receives.
type packetPeer struct {
	fd      int
	ifindex int
}

func newPacketPeer(t testing.TB, n *testNetns, ifindex int) *packetPeer {
	t.Helper()
	p := &packetPeer{fd: -1, ifindex: ifindex}
	err := n.do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex}); err != nil {
			unix.Close(fd)
			return err
		}
		p.fd = fd
		return nil
	})
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(p.fd) })
	return p
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (p *packetPeer) inject(ctx context.Context, f []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return unix.Sendto(p.fd, f, 0, &unix.SockaddrLinklayer{Protocol: htons(testEtherType), Ifindex: p.ifindex, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}})
}

// capture returns the next received test frame (not our own sends).
func (p *packetPeer) capture(ctx context.Context) ([]byte, error) {
	buf := make([]byte, MaxFrameSize)
	for {
		f, from, err := p.recv(ctx, buf)
		if err != nil {
			return nil, err
		}
		if from.Pkttype != unix.PACKET_OUTGOING && isTestFrame(f) {
			return append([]byte(nil), f...), nil
		}
	}
}

// recv waits (polling so that ctx is honoured) for one packet.
func (p *packetPeer) recv(ctx context.Context, buf []byte) ([]byte, *unix.SockaddrLinklayer, error) {
	for {
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		wait := 50 * time.Millisecond
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			wait = max(time.Until(dl), time.Millisecond)
		}
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(wait/time.Millisecond))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return nil, nil, err
		}
		if n == 0 {
			continue
		}
		m, from, err := unix.Recvfrom(p.fd, buf, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		ll, _ := from.(*unix.SockaddrLinklayer)
		if ll == nil {
			ll = &unix.SockaddrLinklayer{}
		}
		return buf[:m], ll, nil
	}
}
