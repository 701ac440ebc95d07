package netbuf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TapOptions configure OpenTap.
type TapOptions struct {
	// NetNS is the path of the network namespace to create the tap in, e.g.
	// /var/run/netns/NAME or /proc/PID/ns/net (a namespace held only by a
	// handle is reachable as /proc/self/fd/N). Empty: the caller's.
	NetNS string
	// MTU, if not zero, is set on the tap (68..65521; larger frames would
	// not fit MaxFrameSize).
	MTU int
	// Addrs are assigned to the tap, e.g. 10.213.1.1/24.
	Addrs []netip.Prefix
}

// Tap is a Port on a Linux tap device (IFF_TAP|IFF_NO_PI): frames written to
// it arrive at the host's network stack as if received from a wire, and
// frames the host sends through it are read. A tap created by OpenTap is
// not persistent: it disappears on Close.
type Tap struct {
	name  string
	index int
	f     *os.File

	rmu  sync.Mutex // one reader; guards rbuf
	rbuf []byte

	closeOnce sync.Once
	closed    atomic.Bool
}

// maxTapMTU keeps a frame (MTU plus an Ethernet and a VLAN header) within
// MaxFrameSize.
const maxTapMTU = MaxFrameSize - 18

// OpenTap creates the tap device name, or attaches to an existing
// persistent tap of that name, with IFF_TAP|IFF_NO_PI, in the namespace
// TapOptions.NetNS; then sets its MTU and addresses and brings it up.
func OpenTap(name string, o TapOptions) (*Tap, error) {
	if err := validIfName(name); err != nil {
		return nil, err
	}
	if o.MTU != 0 && (o.MTU < 68 || o.MTU > maxTapMTU) {
		return nil, fmt.Errorf("%w: tap MTU %d outside [68, %d]", ErrInvalidOptions, o.MTU, maxTapMTU)
	}
	for _, p := range o.Addrs {
		if !p.IsValid() {
			return nil, fmt.Errorf("%w: tap address %v is not a valid prefix", ErrInvalidOptions, p)
		}
	}
	type result struct {
		t   *Tap
		err error
	}
	rc := make(chan result, 1)
	// /dev/net/tun creates the device in the namespace of the thread that
	// opens it, and the netlink calls below work in that thread's namespace
	// too. The thread is locked and never unlocked, so when the goroutine
	// ends Go discards it instead of letting other goroutines run in the
	// switched namespace. The resulting fd works from any thread.
	go func() {
		runtime.LockOSThread()
		t, err := openTapHere(name, o)
		rc <- result{t, err}
	}()
	r := <-rc
	return r.t, r.err
}

func openTapHere(name string, o TapOptions) (*Tap, error) {
	if o.NetNS != "" {
		ns, err := netns.GetFromPath(o.NetNS)
		if err != nil {
			return nil, fmt.Errorf("%w: tap netns %s: %v", ErrInvalidOptions, o.NetNS, err)
		}
		err = netns.Set(ns)
		ns.Close()
		if err != nil {
			return nil, fmt.Errorf("enter netns %s: %w", o.NetNS, err)
		}
	}
	link := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI,
		// One queue, and keep the fd: it is the port.
		Queues: 1,
		// Not persistent: the device goes when the agent does, so a dead
		// agent leaves no tap that could pass unbuffered traffic.
		NonPersist: true,
	}
	if err := netlink.LinkAdd(link); err != nil {
		return nil, fmt.Errorf("create tap %s: %w", name, err)
	}
	if len(link.Fds) != 1 {
		for _, f := range link.Fds {
			f.Close()
		}
		return nil, fmt.Errorf("create tap %s: got %d queues, want 1", name, len(link.Fds))
	}
	t := &Tap{name: link.Name, f: link.Fds[0]}
	fail := func(err error) (*Tap, error) {
		t.f.Close()
		return nil, err
	}
	l, err := netlink.LinkByName(t.name)
	if err != nil {
		return fail(fmt.Errorf("look up tap %s: %w", t.name, err))
	}
	t.index = l.Attrs().Index
	if o.MTU != 0 {
		if err := netlink.LinkSetMTU(l, o.MTU); err != nil {
			return fail(fmt.Errorf("set MTU %d on tap %s: %w", o.MTU, t.name, err))
		}
	}
	for _, p := range o.Addrs {
		a := &netlink.Addr{IPNet: prefixToIPNet(p)}
		if err := netlink.AddrReplace(l, a); err != nil {
			return fail(fmt.Errorf("add address %v to tap %s: %w", p, t.name, err))
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fail(fmt.Errorf("bring tap %s up: %w", t.name, err))
	}
	return t, nil
}

func validIfName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: tap name is empty", ErrInvalidOptions)
	case len(name) >= unix.IFNAMSIZ:
		return fmt.Errorf("%w: tap name %q is longer than %d bytes", ErrInvalidOptions, name, unix.IFNAMSIZ-1)
	case name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n%"):
		return fmt.Errorf("%w: tap name %q is not a valid interface name", ErrInvalidOptions, name)
	}
	return nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Name is the tap's interface name.
func (t *Tap) Name() string { return t.name }

// Index is the tap's interface index in its namespace.
func (t *Tap) Index() int { return t.index }

// ReadFrame reads the next frame the host sent through the tap.
func (t *Tap) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	t.rmu.Lock()
	defer t.rmu.Unlock()
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	// A read into a buffer smaller than the frame would truncate it
	// silently; read into one that always fits, and say so.
	dst := buf
	if len(buf) < MaxFrameSize {
		if t.rbuf == nil {
			t.rbuf = make([]byte, MaxFrameSize)
		}
		dst = t.rbuf
	}
	n, err := t.readCtx(ctx, dst)
	if err != nil {
		return 0, err
	}
	if len(buf) < MaxFrameSize {
		if n > len(buf) {
			return 0, fmt.Errorf("%w: %d-byte frame, %d-byte buffer", ErrShortBuffer, n, len(buf))
		}
		copy(buf, dst[:n])
	}
	return n, nil
}

// readCtx reads with ctx turned into a read deadline.
func (t *Tap) readCtx(ctx context.Context, dst []byte) (int, error) {
	if err := t.f.SetReadDeadline(time.Time{}); err != nil {
		return 0, t.mapErr(err)
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		t.f.SetReadDeadline(time.Unix(1, 0))
	})
	n, err := t.f.Read(dst)
	if !stop() {
		// The deadline is being set: let it finish before the next call
		// clears it, or it would cut that call short.
		<-fired
	}
	if err != nil {
		if ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, ctx.Err()
		}
		return 0, t.mapErr(err)
	}
	return n, nil
}

// WriteFrame sends frame into the host's network stack through the tap.
func (t *Tap) WriteFrame(ctx context.Context, frame []byte) error {
	if err := checkFrameSize(len(frame)); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if t.closed.Load() {
		return t.mapErr(os.ErrClosed)
	}
	if _, err := t.f.Write(frame); err != nil {
		return t.mapErr(err)
	}
	return nil
}

func (t *Tap) mapErr(err error) error {
	// Deadline calls on a closed file report internal/poll's own error,
	// which is not os.ErrClosed; the flag covers every path.
	if t.closed.Load() || errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("%w: tap %s", ErrClosed, t.name)
	}
	return fmt.Errorf("tap %s: %w", t.name, err)
}

// Close closes the tap's file descriptor; a tap OpenTap created disappears.
func (t *Tap) Close() error {
	var err error
	t.closeOnce.Do(func() {
		t.closed.Store(true)
		err = t.f.Close()
	})
	return err
}
