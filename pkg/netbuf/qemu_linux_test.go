package netbuf

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/vm"
)

// recordingPort remembers every frame written through it and when the
// write began: the earliest moment the frame could have reached the tap.
type recordingPort struct {
	Port
	mu     sync.Mutex
	writes []recordedWrite
}

type recordedWrite struct {
	at    time.Time
	frame []byte
}

func (r *recordingPort) WriteFrame(ctx context.Context, f []byte) error {
	at := time.Now()
	err := r.Port.WriteFrame(ctx, f)
	if err == nil {
		r.mu.Lock()
		r.writes = append(r.writes, recordedWrite{at, append([]byte(nil), f...)})
		r.mu.Unlock()
	}
	return err
}

func (r *recordingPort) snapshot() []recordedWrite {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]recordedWrite(nil), r.writes...)
}

// epochClock plays the lockstep coordinator without a secondary: it pauses
// the guest, seals an epoch, resumes it, and later "acknowledges" it.
type epochClock struct {
	b *Buffer
	m *vm.Machine

	mu       sync.Mutex
	next     uint64
	sealed   []sealRecord         // in epoch order
	released map[uint64]time.Time // epoch -> when Release was called

	stopLoop context.CancelFunc
	loopDone chan struct{}
}

type sealRecord struct {
	epoch  uint64
	frames int
}

// checkpoint stops the guest, seals the next epoch and resumes the guest.
func (c *epochClock) checkpoint(ctx context.Context) (uint64, error) {
	q := c.m.QMP()
	if err := q.Stop(ctx); err != nil {
		return 0, fmt.Errorf("stop: %w", err)
	}
	c.mu.Lock()
	c.next++
	n := c.next
	frames, _ := c.b.Seal(n)
	c.sealed = append(c.sealed, sealRecord{n, frames})
	c.mu.Unlock()
	if err := q.Cont(ctx); err != nil {
		return 0, fmt.Errorf("cont: %w", err)
	}
	return n, nil
}

// release records the time and releases every epoch up to n.
func (c *epochClock) release(n uint64) {
	c.mu.Lock()
	now := time.Now()
	for _, s := range c.sealed {
		if _, ok := c.released[s.epoch]; !ok && s.epoch <= n {
			c.released[s.epoch] = now
		}
	}
	c.mu.Unlock()
	c.b.Release(n)
}

// start runs checkpoint+release every period until stop is called.
func (c *epochClock) start(t *testing.T, ctx context.Context, period, ackDelay time.Duration) {
	ctx, cancel := context.WithCancel(ctx)
	c.stopLoop = cancel
	c.loopDone = make(chan struct{})
	go func() {
		defer close(c.loopDone)
		tick := time.NewTicker(period)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			n, err := c.checkpoint(ctx)
			if err != nil {
				if ctx.Err() == nil {
					t.Errorf("epoch clock: %v", err)
				}
				return
			}
			time.Sleep(ackDelay) // the secondary's ACK takes a while
			c.release(n)
		}
	}()
}

func (c *epochClock) stop() {
	if c.stopLoop != nil {
		c.stopLoop()
		<-c.loopDone
		c.stopLoop = nil
	}
}

// TestQEMUOutputCommit runs the built-in guest's TCP service behind the
// buffer and a real tap in a private namespace, with the test as epoch
// clock, and proves that no guest frame reached the tap before the Release
// of its epoch.
func TestQEMUOutputCommit(t *testing.T) {
	requireTap(t)
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, 90*time.Second)
	ns := newNetns(t)
	h := ns.handle(t)

	tap, err := OpenTap("ftnbq0", TapOptions{NetNS: ns.path, Addrs: []netip.Prefix{netip.MustParsePrefix("10.213.1.1/24")}})
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	rec := &recordingPort{Port: tap}
	sock := filepath.Join(t.TempDir(), "nic.sock")
	b, err := New(sock, rec, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	serveErr := make(chan error, 1)
	go func() { serveErr <- b.Serve(ctx) }()

	m, err := vm.Start(ctx, vm.Spec{
		Name: "netbuf-e2e", MemoryMiB: 128, Accel: vm.AccelTCG,
		Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline: img.Cmdline + " ftguest.run=tcp ftguest.ip=10.213.1.2/24",
		NICs:    []vm.NIC{{Stream: sock}},
	}, vm.Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	guestMAC, err := net.ParseMAC(m.Spec().NICs[0].MAC)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.WaitSerial(ctx, func(s []byte) bool { return bytes.Contains(s, []byte("ftguest ready run=tcp")) }); err != nil {
		t.Fatal(err)
	}
	if st := b.Stats(); st.Connections != 1 {
		t.Fatalf("QEMU did not connect to the buffer: %+v", st)
	}
	clock := &epochClock{b: b, m: m, released: map[uint64]time.Time{}}
	defer clock.stop()
	rxStart := ns.linkStats(t, h, "ftnbq0").RxPackets

	// Phase 1: epochs are sealed but never acknowledged. The client's ARP
	// request and SYN reach the guest (input passes at once); the guest's
	// answers are held, so the connection cannot complete.
	type dialResult struct {
		c   net.Conn
		err error
	}
	dialed := make(chan dialResult, 1)
	go func() {
		var c net.Conn
		err := ns.do(func() error {
			var err error
			d := net.Dialer{Timeout: 60 * time.Second}
			c, err = d.DialContext(ctx, "tcp", "10.213.1.2:7000")
			return err
		})
		dialed <- dialResult{c, err}
	}()
	// Seal epochs for a while, at least until the guest has answered
	// something (a loaded machine may take a moment to run the guest).
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < 8 || b.Stats().HeldFrames == 0; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("the guest never answered the client: %+v", b.Stats())
		}
		time.Sleep(150 * time.Millisecond)
		if _, err := clock.checkpoint(ctx); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case r := <-dialed:
		t.Fatalf("connect finished (err %v) while no epoch was acknowledged", r.err)
	default:
	}
	st := b.Stats()
	if st.HeldFrames == 0 || st.SentFrames != 0 {
		t.Fatalf("withheld phase: %d frames held, %d sent; want >0 held, none sent", st.HeldFrames, st.SentFrames)
	}
	if rx := ns.linkStats(t, h, "ftnbq0").RxPackets; rx != rxStart {
		t.Fatalf("the tap received %d frames while no epoch was acknowledged", rx-rxStart)
	}
	t.Logf("withheld phase: %d guest frames held, none on the tap, connect pending", st.HeldFrames)

	// Phase 2: acknowledge epochs; held answers go out and the exchange
	// completes, delayed by the epochs.
	clock.start(t, ctx, 40*time.Millisecond, 10*time.Millisecond)
	var conn net.Conn
	select {
	case r := <-dialed:
		if r.err != nil {
			t.Fatalf("connect after releases: %v", r.err)
		}
		conn = r.c
	case <-ctx.Done():
		t.Fatal("connect never completed")
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	exchange := func(line string, want string) time.Duration {
		t.Helper()
		start := time.Now()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := fmt.Fprintf(conn, "%s\n", line); err != nil {
			t.Fatal(err)
		}
		got, err := r.ReadString('\n')
		if err != nil || got != want {
			t.Fatalf("reply %q (err %v), want %q", got, err, want)
		}
		return time.Since(start)
	}
	rtt := exchange("hello", "seq=1 hello\n")
	t.Logf("first request answered in %v through 40 ms epochs", rtt.Round(time.Millisecond))

	// Phase 3: stop acknowledging again. The request reaches the guest,
	// whose reply is held: the client sees nothing.
	clock.stop()
	waitStats(t, b, "released frames to reach the tap", func(s Stats) bool { return s.QueuedFrames == 0 })
	rxHeld := ns.linkStats(t, h, "ftnbq0").RxPackets
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := fmt.Fprintf(conn, "second\n"); err != nil {
		t.Fatal(err)
	}
	waitStats(t, b, "the guest's answer to be held", func(s Stats) bool { return s.HeldFrames > 0 })
	conn.SetReadDeadline(time.Now().Add(800 * time.Millisecond))
	if got, err := r.ReadString('\n'); err == nil || !errors.Is(err, os.ErrDeadlineExceeded) || got != "" {
		t.Fatalf("client read %q (err %v) while the reply's epoch was not acknowledged", got, err)
	}
	if rx := ns.linkStats(t, h, "ftnbq0").RxPackets; rx != rxHeld {
		t.Fatalf("the tap received %d frames while no epoch was acknowledged", rx-rxHeld)
	}
	n, err := clock.checkpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	clock.release(n)
	clock.start(t, ctx, 40*time.Millisecond, 10*time.Millisecond)
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if got, err := r.ReadString('\n'); err != nil || got != "seq=2 second\n" {
		t.Fatalf("reply after release %q (err %v), want %q", got, err, "seq=2 second\n")
	}
	exchange("third", "seq=3 third\n")
	conn.Close()

	// Stop the world in order, then check the capture.
	clock.stop()
	m.Kill()
	waitStats(t, b, "released frames to reach the tap", func(s Stats) bool { return s.QueuedFrames == 0 })
	final := b.Stats()
	rxEnd := ns.linkStats(t, h, "ftnbq0").RxPackets
	writes := rec.snapshot()
	b.Close()
	if err := <-serveErr; err != nil {
		t.Fatalf("Serve: %v", err)
	}

	if final.HostWriteErrors != 0 || final.StreamErrors != 0 {
		t.Fatalf("errors during the run: %+v", final)
	}
	if uint64(len(writes)) != final.SentFrames || rxEnd-rxStart != final.SentFrames {
		t.Fatalf("recorded %d writes, buffer sent %d, tap received %d: they must agree", len(writes), final.SentFrames, rxEnd-rxStart)
	}
	// Frames leave in order, so the k-th frame written belongs to the
	// epoch whose cumulative Seal count first exceeds k.
	clock.mu.Lock()
	sealed := append([]sealRecord(nil), clock.sealed...)
	released := clock.released
	clock.mu.Unlock()
	k := 0
	for _, s := range sealed {
		for i := 0; i < s.frames && k < len(writes); i, k = i+1, k+1 {
			w := writes[k]
			rel, ok := released[s.epoch]
			if !ok {
				t.Fatalf("frame %d of epoch %d reached the tap, but epoch %d was never released", k, s.epoch, s.epoch)
			}
			if w.at.Before(rel) {
				t.Fatalf("frame %d of epoch %d reached the tap %v before its Release", k, s.epoch, rel.Sub(w.at))
			}
			if !bytes.Equal(w.frame[6:12], guestMAC) {
				t.Fatalf("frame %d on the tap has source %v, not the guest's %v", k, net.HardwareAddr(w.frame[6:12]), guestMAC)
			}
		}
	}
	if k != len(writes) {
		t.Fatalf("%d frames reached the tap but only %d were ever sealed", len(writes), k)
	}
	if len(writes) < 6 {
		t.Fatalf("only %d guest frames reached the tap; a TCP exchange needs more", len(writes))
	}
	t.Logf("%d guest frames in %d epochs, each on the tap only after its Release; longest hold %v",
		len(writes), len(sealed), final.MaxHold.Round(time.Millisecond))
}
