package failover

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/failover/fakeclock"
)

// scriptedLeaser answers renewals as the test says.
type scriptedLeaser struct {
	mu    sync.Mutex
	lease Lease
	err   error
	calls atomic.Int64
}

func (s *scriptedLeaser) set(l Lease, err error) {
	s.mu.Lock()
	s.lease, s.err = l, err
	s.mu.Unlock()
}

func (s *scriptedLeaser) Acquire(ctx context.Context, vm string, renew bool) (Lease, error) {
	s.calls.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lease, s.err
}

type recordingFence struct {
	mu      sync.Mutex
	reasons []string
	at      []time.Time
	clock   Clock
}

func (f *recordingFence) Fence(ctx context.Context, reason string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reasons = append(f.reasons, reason)
	f.at = append(f.at, f.clock.Now())
	return nil
}

func (f *recordingFence) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.reasons)
}

func TestGuardFencesWhenRenewalsFail(t *testing.T) {
	clk := fakeclock.New(t0)
	l := &scriptedLeaser{}
	l.set(Lease{Granted: true, Holder: "host-a", TTL: 2 * time.Second}, nil)
	fence := &recordingFence{clock: clk}
	g, err := NewPrimaryGuard(GuardConfig{VM: "vm1", Lease: l, Fence: fence, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- g.Run(context.Background()) }()
	waitFor(t, 5*time.Second, "guard ticker", func() bool { return clk.Tickers() == 1 })
	if v := g.ValidUntil(); !v.Equal(t0.Add(2*time.Second - DefaultGuardMargin)) {
		t.Fatalf("valid until %v after start, want TTL less the margin", v.Sub(t0))
	}
	// Renewals keep it valid for as long as they succeed.
	for range 20 {
		n := l.calls.Load()
		clk.Advance(200 * time.Millisecond)
		waitFor(t, 5*time.Second, "renewal", func() bool { return l.calls.Load() > n })
	}
	if fence.count() != 0 {
		t.Fatalf("fenced while renewals succeed: %v", fence.reasons)
	}
	// The witness becomes unreachable: fenced once the lease (less the
	// margin) has run out, not before.
	waitFor(t, 5*time.Second, "last renewal applied", func() bool {
		return g.ValidUntil().After(clk.Now().Add(2*time.Second - DefaultGuardMargin - 300*time.Millisecond))
	})
	l.set(Lease{}, ErrUnreachable)
	valid := g.ValidUntil()
	for clk.Now().Before(valid) {
		n := l.calls.Load()
		clk.Advance(200 * time.Millisecond)
		waitFor(t, 5*time.Second, "renewal attempt or fence", func() bool { return l.calls.Load() > n || fence.count() > 0 })
	}
	waitFor(t, 5*time.Second, "fence", func() bool { return fence.count() > 0 })
	err = <-done
	if !errors.Is(err, ErrFenced) {
		t.Fatalf("Run: %v, want ErrFenced", err)
	}
	if fence.at[0].Before(valid) {
		t.Fatalf("fenced at %v, before the lease ran out at %v", fence.at[0], valid)
	}
	if fence.count() != 1 || !strings.Contains(g.Fenced(), "not renewed") {
		t.Fatalf("fences %v", fence.reasons)
	}
}

func TestGuardFencesWhenAnotherHolds(t *testing.T) {
	clk := fakeclock.New(t0)
	l := &scriptedLeaser{}
	l.set(Lease{Granted: true, Holder: "host-a", TTL: 2 * time.Second}, nil)
	fence := &recordingFence{clock: clk}
	g, _ := NewPrimaryGuard(GuardConfig{VM: "vm1", Lease: l, Fence: fence, Clock: clk})
	done := make(chan error, 1)
	go func() { done <- g.Run(context.Background()) }()
	waitFor(t, 5*time.Second, "guard ticker", func() bool { return clk.Tickers() == 1 })
	l.set(Lease{Holder: "host-b", TTL: time.Second}, nil)
	clk.Advance(200 * time.Millisecond)
	if err := <-done; !errors.Is(err, ErrFenced) || !strings.Contains(err.Error(), "host-b") {
		t.Fatalf("Run: %v, want ErrFenced naming host-b", err)
	}
	if !fence.at[0].Before(g.ValidUntil()) {
		t.Fatal("a lost lease should fence at once, not when the old lease ends")
	}
}

// A guard started from a lease its caller already holds does not end
// unfenced when its very first renewal fails: the held lease runs out and
// the guard fences, as for any later failure.
func TestGuardFromHeldLeaseFencesWhenFirstRenewalFails(t *testing.T) {
	clk := fakeclock.New(t0)
	l := &scriptedLeaser{}
	l.set(Lease{}, ErrUnreachable)
	fence := &recordingFence{clock: clk}
	held := Lease{Granted: true, Holder: "host-a", TTL: 2 * time.Second, Sent: t0}
	g, err := NewPrimaryGuard(GuardConfig{VM: "vm1", Lease: l, Fence: fence, Clock: clk, Held: &held})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- g.Run(context.Background()) }()
	waitFor(t, 5*time.Second, "guard ticker", func() bool { return clk.Tickers() == 1 })
	if l.calls.Load() != 0 {
		t.Fatalf("the guard asked the witness again at start (%d calls) although it was given a held lease", l.calls.Load())
	}
	valid := g.ValidUntil()
	if !valid.Equal(t0.Add(2*time.Second - DefaultGuardMargin)) {
		t.Fatalf("valid until %v after start, want the held lease's TTL less the margin", valid.Sub(t0))
	}
	for clk.Now().Before(valid) {
		n := l.calls.Load()
		clk.Advance(200 * time.Millisecond)
		waitFor(t, 5*time.Second, "renewal attempt or fence", func() bool { return l.calls.Load() > n || fence.count() > 0 })
	}
	if err := <-done; !errors.Is(err, ErrFenced) {
		t.Fatalf("Run: %v, want ErrFenced once the held lease ran out", err)
	}
	if fence.count() != 1 || fence.at[0].Before(valid) {
		t.Fatalf("fences %v at %v; the held lease was valid until %v", fence.reasons, fence.at, valid)
	}
}

func TestGuardStart(t *testing.T) {
	clk := fakeclock.New(t0)
	fence := &recordingFence{clock: clk}
	l := &scriptedLeaser{}
	l.set(Lease{}, ErrUnreachable)
	g, _ := NewPrimaryGuard(GuardConfig{VM: "vm1", Lease: l, Fence: fence, Clock: clk})
	if err := g.Run(context.Background()); !errors.Is(err, ErrUnreachable) || errors.Is(err, ErrFenced) {
		t.Fatalf("unreachable at start: %v, want ErrUnreachable without fencing", err)
	}
	l.set(Lease{Holder: "host-b", TTL: time.Second}, nil)
	g, _ = NewPrimaryGuard(GuardConfig{VM: "vm1", Lease: l, Fence: fence, Clock: clk})
	if err := g.Run(context.Background()); !errors.Is(err, ErrFenced) {
		t.Fatalf("held by another at start: %v, want ErrFenced", err)
	}
	if fence.count() != 1 {
		t.Fatalf("fences %v", fence.reasons)
	}
	l.set(Lease{Granted: true, Holder: "host-a", TTL: 900 * time.Millisecond}, nil)
	g, _ = NewPrimaryGuard(GuardConfig{VM: "vm1", Lease: l, Fence: fence, Clock: clk})
	if err := g.Run(context.Background()); !errors.Is(err, ErrConfig) {
		t.Fatalf("lease TTL below margin+period: %v, want ErrConfig", err)
	}
	if fence.count() != 1 {
		t.Fatalf("a misconfigured guard fenced: %v", fence.reasons)
	}
	for _, cfg := range []GuardConfig{
		{VM: "vm1", Lease: l},
		{VM: "", Lease: l, Fence: fence},
		{VM: "vm1", Lease: l, Fence: fence, RenewEvery: time.Second, Margin: time.Second},
	} {
		if _, err := NewPrimaryGuard(cfg); !errors.Is(err, ErrConfig) {
			t.Errorf("NewPrimaryGuard(%+v): %v, want ErrConfig", cfg, err)
		}
	}
}

// tcpRelay forwards TCP connections to a target until cut, when it drops
// every connection and refuses new ones.
type tcpRelay struct {
	ln     net.Listener
	mu     sync.Mutex
	conns  []net.Conn
	cut    bool
	target string
}

func newTCPRelay(t *testing.T, target string) *tcpRelay {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &tcpRelay{ln: ln, target: target}
	t.Cleanup(func() { r.Cut(); ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			r.mu.Lock()
			if err != nil || r.cut {
				r.mu.Unlock()
				c.Close()
				if up != nil {
					up.Close()
				}
				continue
			}
			r.conns = append(r.conns, c, up)
			r.mu.Unlock()
			go pipe(c, up)
			go pipe(up, c)
		}
	}()
	return r
}

func pipe(dst, src net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (r *tcpRelay) Cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cut = true
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
}

// TestGuardFencesBeforeSecondaryPromotes runs the real protocol with the
// real clock: the primary reaches the witness through a relay that the
// test cuts; the secondary asks the witness until it may promote. The
// primary must have fenced before the witness granted the secondary.
func TestGuardFencesBeforeSecondaryPromotes(t *testing.T) {
	const ttl = 600 * time.Millisecond
	w := startWitness(t, WitnessConfig{LeaseTTL: ttl, Grace: time.Nanosecond})
	relay := newTCPRelay(t, w.Addr().String())
	a := witnessClient(t, relay.ln.Addr().String(), "host-a")
	b := witnessClient(t, w.Addr().String(), "host-b")

	var fencedAt atomic.Int64
	fence := FenceFunc(func(ctx context.Context, reason string) error {
		fencedAt.Store(time.Now().UnixNano())
		return nil
	})
	g, err := NewPrimaryGuard(GuardConfig{VM: "vm1", Lease: a, Fence: fence, RenewEvery: 50 * time.Millisecond, Margin: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- g.Run(context.Background()) }()
	waitFor(t, 5*time.Second, "primary holds the lease", func() bool { h, _ := w.Holder("vm1"); return h == "host-a" })

	// While the primary renews, the secondary may not promote.
	for range 5 {
		if d, err := (WitnessArbiter{Lease: b}).Decide(context.Background(), Evidence{VM: "vm1"}); d != DoNotPromote || err != nil {
			t.Fatalf("while the primary renews: %v, %v", d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	relay.Cut()
	var grantedAt int64
	deadline := time.Now().Add(10 * time.Second)
	for grantedAt == 0 {
		if time.Now().After(deadline) {
			t.Fatal("secondary never got the lease")
		}
		d, err := (WitnessArbiter{Lease: b}).Decide(context.Background(), Evidence{VM: "vm1"})
		if err != nil {
			t.Fatal(err)
		}
		if d == Promote {
			grantedAt = time.Now().UnixNano()
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := <-done; !errors.Is(err, ErrFenced) {
		t.Fatalf("guard: %v, want ErrFenced", err)
	}
	f := fencedAt.Load()
	if f == 0 || f >= grantedAt {
		t.Fatalf("primary fenced at %d, secondary granted at %d: overlap", f, grantedAt)
	}
	t.Logf("primary fenced %v before the secondary was granted", time.Duration(grantedAt-f))
}

// TestArbiterScenarios runs the chain the secondary uses (LAN probe, then
// witness) against a real LAN made of namespaces and a real witness.
func TestArbiterScenarios(t *testing.T) {
	l := newLAN(t)
	vmUp := netip.MustParseAddr(lanIPB)      // "the primary's VM": answers ARP
	vmDown := netip.MustParseAddr(lanAbsent) // nobody answers
	probe := func(a netip.Addr) Probe {
		p, err := NewARPProbe(ARPProbeConfig{Addr: a, Interface: "fa", Netns: l.nsA, Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	w := startWitness(t, WitnessConfig{LeaseTTL: time.Minute, Grace: time.Nanosecond})
	a := witnessClient(t, w.Addr().String(), "host-a")
	b := witnessClient(t, w.Addr().String(), "host-b")
	ctx := context.Background()
	lost := Evidence{VM: "vm1", Detector: Event{State: Lost, Reason: "test"}}

	// Link cut only: the VM answers, B stays secondary, and the witness
	// is not even asked (A's lease, if it lapsed, is not taken).
	var asked []int
	chain := Chain{Arbiters: []Arbiter{ProbeArbiter{Probe: probe(vmUp)}, WitnessArbiter{Lease: b}},
		Report: func(i int, d Decision, err error) { asked = append(asked, i) }}
	if d, err := chain.Decide(ctx, lost); d != DoNotPromote || err != nil {
		t.Fatalf("link cut only: %v, %v", d, err)
	}
	if len(asked) != 1 {
		t.Fatalf("arbiters asked %v, want only the probe", asked)
	}
	if h, _ := w.Holder("vm1"); h != "" {
		t.Fatalf("witness lease taken by %q on a link cut", h)
	}

	// Primary alive and renewing, VM silent on the LAN (say, B lost its LAN
	// port): the witness keeps B from promoting.
	if _, err := a.Acquire(ctx, "vm1", true); err != nil {
		t.Fatal(err)
	}
	chain = Chain{Arbiters: []Arbiter{ProbeArbiter{Probe: probe(vmDown)}, WitnessArbiter{Lease: b}}}
	if d, err := chain.Decide(ctx, lost); d != DoNotPromote || err != nil {
		t.Fatalf("probe silent, primary holds lease: %v, %v", d, err)
	}

	// Primary dead: no answer, lease free -> promote.
	if err := a.Release(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if d, err := chain.Decide(ctx, lost); d != Promote || err != nil {
		t.Fatalf("primary dead: %v, %v", d, err)
	}
	if h, _ := w.Holder("vm1"); h != "host-b" {
		t.Fatalf("after promotion the witness says %q", h)
	}

	// Witness unreachable, probe silent: the safe default.
	gone := witnessClient(t, "127.0.0.1:1", "host-b")
	var errs []error
	chain = Chain{Arbiters: []Arbiter{ProbeArbiter{Probe: probe(vmDown)}, WitnessArbiter{Lease: gone}},
		Report: func(i int, d Decision, err error) { errs = append(errs, err) }}
	if d, err := chain.Decide(ctx, lost); d != DoNotPromote || err != nil {
		t.Fatalf("nothing can decide: %v, %v; want do-not-promote", d, err)
	}
	if len(errs) != 2 || errs[0] != nil || !errors.Is(errs[1], ErrUnreachable) {
		t.Fatalf("reported %v, want the probe's silence and the witness's ErrUnreachable", errs)
	}
	// ...unless the operator chose availability over safety.
	chain.Fallback = Promote
	if d, _ := chain.Decide(ctx, lost); d != Promote {
		t.Fatalf("explicit Promote fallback: %v", d)
	}

	// Probing after promotion is refused: the answer could be our own VM.
	running := lost
	running.LocalRunning = true
	chain = Chain{Arbiters: []Arbiter{ProbeArbiter{Probe: probe(vmUp)}, ArbiterFunc(func(context.Context, Evidence) (Decision, error) {
		t.Error("chain went on after an unsafe probe")
		return Promote, nil
	})}}
	if d, err := chain.Decide(ctx, running); d != DoNotPromote || !errors.Is(err, ErrUnsafe) {
		t.Fatalf("probe after promotion: %v, %v; want do-not-promote, ErrUnsafe", d, err)
	}

	// SilenceMeansDead: the probe alone decides.
	if d, err := (ProbeArbiter{Probe: probe(vmDown), SilenceMeansDead: true}).Decide(ctx, lost); d != Promote || err != nil {
		t.Fatalf("SilenceMeansDead: %v, %v", d, err)
	}
	if _, err := (Chain{Fallback: 9}).Decide(ctx, lost); !errors.Is(err, ErrConfig) {
		t.Fatalf("bad fallback: %v", err)
	}
}
