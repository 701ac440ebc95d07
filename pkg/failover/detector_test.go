package failover

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/failover/fakeclock"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func newTestDetector(t *testing.T, cfg Config) (*Detector, *fakeclock.Clock) {
	t.Helper()
	clk := fakeclock.New(t0)
	cfg.Clock = clk
	d, err := NewDetector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d, clk
}

// step advances the clock by dt, feeding heartbeats on the given paths
// first, and returns the detector's evaluation.
func step(d *Detector, clk *fakeclock.Clock, dt time.Duration, heard ...Path) Event {
	for _, p := range heard {
		d.Heard(context.Background(), p)
	}
	clk.Advance(dt)
	d.evaluate()
	return d.State()
}

func TestDetectorHealthy(t *testing.T) {
	d, clk := newTestDetector(t, Config{})
	for i := range 50 {
		if ev := step(d, clk, 100*time.Millisecond, PathRepl, PathMgmt); ev.State != Alive {
			t.Fatalf("step %d with both paths heard: %v", i, ev)
		}
	}
}

func TestDetectorReplSilentMgmtAlive(t *testing.T) {
	d, clk := newTestDetector(t, Config{})
	var seen []State
	for range 40 { // 4 s, four times the timeout
		ev := step(d, clk, 100*time.Millisecond, PathMgmt)
		if len(seen) == 0 || seen[len(seen)-1] != ev.State {
			seen = append(seen, ev.State)
		}
		if ev.State == Lost {
			t.Fatalf("Lost while the management path is alive: %v", ev)
		}
	}
	if ev := d.State(); ev.State != Suspect || !slices.Equal(ev.Paths, []Path{PathRepl}) {
		t.Fatalf("end state %v paths %v, want suspect [repl]", ev, ev.Paths)
	}
	if !slices.Equal(seen, []State{Alive, Suspect}) {
		t.Fatalf("states %v, want [alive suspect]", seen)
	}
}

func TestDetectorBothSilentThenRecovery(t *testing.T) {
	d, clk := newTestDetector(t, Config{})
	var suspectAt, lostAt time.Duration
	for i := 1; i <= 20; i++ {
		ev := step(d, clk, 100*time.Millisecond)
		el := time.Duration(i) * 100 * time.Millisecond
		if ev.State == Suspect && suspectAt == 0 {
			suspectAt = el
			if !slices.Equal(ev.Paths, []Path{PathRepl, PathMgmt}) {
				t.Fatalf("suspect paths %v, want both", ev.Paths)
			}
		}
		if ev.State == Lost && lostAt == 0 {
			lostAt = el
		}
	}
	cfg := d.Config()
	if suspectAt <= cfg.SuspectAfter || suspectAt > cfg.SuspectAfter+cfg.Interval {
		t.Fatalf("suspect after %v of silence, want just past %v", suspectAt, cfg.SuspectAfter)
	}
	if lostAt <= cfg.Timeout || lostAt > cfg.Timeout+cfg.Interval {
		t.Fatalf("lost after %v of silence, want just past %v", lostAt, cfg.Timeout)
	}
	// One path comes back: no longer lost, the other is still late.
	if ev := step(d, clk, 0, PathRepl); ev.State != Suspect || !slices.Equal(ev.Paths, []Path{PathMgmt}) {
		t.Fatalf("after repl recovers: %v %v, want suspect [mgmt]", ev, ev.Paths)
	}
	if ev := step(d, clk, 10*time.Millisecond, PathMgmt); ev.State != Alive {
		t.Fatalf("after both recover: %v, want alive", ev)
	}
}

func TestDetectorRunEmitsChanges(t *testing.T) {
	d, clk := newTestDetector(t, Config{Paths: []Path{PathRepl}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitFor(t, 5*time.Second, "detector ticker", func() bool { return clk.Tickers() == 1 })

	next := func(want State) Event {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case ev := <-d.Events():
				if ev.State != want {
					t.Fatalf("event %v, want %v", ev, want)
				}
				return ev
			case <-time.After(2 * time.Millisecond):
				clk.Advance(100 * time.Millisecond)
			case <-deadline:
				t.Fatalf("no %v event", want)
			}
		}
	}
	ev := next(Suspect)
	if ev.At.Sub(t0) <= 300*time.Millisecond {
		t.Fatalf("suspect at %v after start, before SuspectAfter", ev.At.Sub(t0))
	}
	ev = next(Lost)
	if ev.At.Sub(t0) <= time.Second {
		t.Fatalf("lost at %v after start, before Timeout", ev.At.Sub(t0))
	}
	// Recovery is reported at once, without waiting for a tick.
	d.Heard(ctx, PathRepl)
	select {
	case ev := <-d.Events():
		if ev.State != Alive {
			t.Fatalf("after heartbeat: %v, want alive", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event after the path recovered")
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v", err)
	}
	if _, ok := <-d.Events(); ok {
		t.Fatal("Events not closed after Run returned")
	}
}

func TestDetectorLiveness(t *testing.T) {
	var failure atomic.Pointer[error]
	check := func(ctx context.Context) error {
		if p := failure.Load(); p != nil {
			return *p
		}
		return nil
	}
	fail := func(err error) { failure.Store(&err) }
	d, clk := newTestDetector(t, Config{Paths: []Path{}, Liveness: check})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.Run(ctx)
	waitFor(t, 5*time.Second, "detector ticker", func() bool { return clk.Tickers() == 1 })

	await := func(want State) Event {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case ev := <-d.Events():
				if ev.State == want {
					return ev
				}
			case <-time.After(2 * time.Millisecond):
				clk.Advance(50 * time.Millisecond)
			case <-deadline:
				t.Fatalf("no %v event; state %v", want, d.State())
			}
		}
	}
	fail(errors.New("query-status: deadline exceeded"))
	sus := await(Suspect)
	if sus.Liveness == nil {
		t.Fatal("suspect event without the liveness error")
	}
	lost := await(Lost)
	// The failure is recorded at most one clock step (50 ms) before the
	// suspect event is stamped.
	if gap := lost.At.Sub(sus.At); gap < time.Second-50*time.Millisecond {
		t.Fatalf("lost %v after the first failure, before Timeout", gap)
	}
	failure.Store(nil)
	await(Alive)
	// A dead process is lost at the next poll, not after Timeout.
	fail(fmt.Errorf("qemu exited: %w", ErrDead))
	ev := await(Lost)
	if !errors.Is(ev.Liveness, ErrDead) {
		t.Fatalf("lost event liveness %v, want ErrDead", ev.Liveness)
	}
}

func TestDetectorLivenessOverrun(t *testing.T) {
	// A check that ignores its deadline counts as failing.
	check := func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(time.Millisecond)
		return nil
	}
	d, err := NewDetector(Config{Paths: []Path{}, Liveness: check, Interval: 10 * time.Millisecond, Timeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.Run(ctx)
	select {
	case ev := <-d.Events():
		if ev.State != Suspect || ev.Liveness == nil {
			t.Fatalf("first event %v, want suspect with a liveness error", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("overrunning check never reported")
	}
}

func TestDetectorConfigErrors(t *testing.T) {
	bad := []Config{
		{Interval: time.Second, Timeout: time.Second},
		{Timeout: -1},
		{SuspectAfter: 2 * time.Second, Timeout: time.Second},
		{Paths: []Path{}},
		{Paths: []Path{PathRepl, PathRepl}},
		{Paths: []Path{7}},
	}
	for _, c := range bad {
		if _, err := NewDetector(c); !errors.Is(err, ErrConfig) {
			t.Errorf("NewDetector(%+v): %v, want ErrConfig", c, err)
		}
	}
	d, _ := NewDetector(Config{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	d.Run(ctx)
	if err := d.Run(ctx); !errors.Is(err, ErrConfig) {
		t.Errorf("second Run: %v, want ErrConfig", err)
	}
}
