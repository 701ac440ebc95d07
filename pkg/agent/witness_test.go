package agent

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/failover"
)

// fakeWitness answers from a script: held by holder until grantAfter
// questions were asked, then granted.
type fakeWitness struct {
	mu         sync.Mutex
	holder     string
	grantAfter int
	asked      int
	released   []string
	err        error
}

func (w *fakeWitness) Acquire(ctx context.Context, vm string, renew bool) (failover.Lease, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.asked++
	if w.err != nil {
		return failover.Lease{}, w.err
	}
	if w.asked > w.grantAfter {
		return failover.Lease{Granted: true, Holder: "me", TTL: 2 * time.Second, Sent: time.Now()}, nil
	}
	return failover.Lease{Holder: w.holder, TTL: time.Second, Sent: time.Now()}, nil
}

func (w *fakeWitness) Release(ctx context.Context, vm string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.released = append(w.released, vm)
	return nil
}

// TestWaitingArbiter: "held" is asked again until the lease lapses
// (Promote) or the wait is over (DoNotPromote stands).
func TestWaitingArbiter(t *testing.T) {
	ctx := context.Background()
	fw := &fakeWitness{holder: "host-a", grantAfter: 3}
	w := &waitingArbiter{a: failover.WitnessArbiter{Lease: fw}, wait: 10 * time.Second}
	d, err := w.Decide(ctx, failover.Evidence{VM: "web"})
	if d != failover.Promote || err != nil || w.asked != 4 {
		t.Fatalf("lease lapsing after 3 questions: %v, %v after %d questions; want promote after 4", d, err, w.asked)
	}
	fw = &fakeWitness{holder: "host-a", grantAfter: 1 << 30}
	w = &waitingArbiter{a: failover.WitnessArbiter{Lease: fw}, wait: 600 * time.Millisecond}
	t0 := time.Now()
	d, _ = w.Decide(ctx, failover.Evidence{VM: "web"})
	if d != failover.DoNotPromote || w.asked < 2 {
		t.Fatalf("lease held throughout: %v after %d questions; want do-not-promote after asking again", d, w.asked)
	}
	if el := time.Since(t0); el > 5*time.Second {
		t.Fatalf("the wait of 600ms took %v", el)
	}
}

// TestProbeArbiterVMDead: when the primary reports its VM dead, the LAN is
// not probed (there is no address to probe here either), and the witness
// alone decides; without a witness the report suffices.
func TestProbeArbiterVMDead(t *testing.T) {
	ctx := context.Background()
	q := ArbiterQuery{VM: "web", PrimaryVMDead: "QEMU exited"}
	ok, why, err := ProbeArbiter{}.MayPromote(ctx, q)
	if !ok || err != nil || !strings.Contains(why, "reports its VM dead") {
		t.Fatalf("without a witness: %v %q %v", ok, why, err)
	}
	fw := &fakeWitness{holder: "host-a", grantAfter: 2}
	ok, why, err = ProbeArbiter{Witness: failover.WitnessArbiter{Lease: fw}, WitnessWait: 5 * time.Second}.MayPromote(ctx, q)
	if !ok || err != nil || !strings.Contains(why, "asked 3 times") {
		t.Fatalf("with a witness granting on the third question: %v %q %v", ok, why, err)
	}
	fw = &fakeWitness{err: errors.New("no route")}
	ok, why, _ = ProbeArbiter{Witness: failover.WitnessArbiter{Lease: fw}, WitnessWait: 300 * time.Millisecond}.MayPromote(ctx, q)
	if ok || !strings.Contains(why, "no route") {
		t.Fatalf("with the witness unreachable: %v %q", ok, why)
	}
}

// TestStartGuardRefuses: a pairing needs the lease; a witness that says
// another node holds it, or cannot be reached, refuses with a clear error
// and no guard runs.
func TestStartGuardRefuses(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		w    *fakeWitness
		want string
	}{
		{&fakeWitness{holder: "host-b", grantAfter: 1 << 30}, `"host-b" holds the lease of web`},
		{&fakeWitness{holder: "", grantAfter: 1 << 30}, "witness restarted"},
		{&fakeWitness{err: failover.ErrUnreachable}, "ftctl witness"},
	} {
		g := &guest{a: &Agent{cfg: Config{Witness: c.w}, log: slog.New(slog.DiscardHandler)}, name: "web"}
		err := g.startGuard(ctx)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("startGuard: %v, want an error saying %q", err, c.want)
		}
		if g.guardStop != nil {
			t.Errorf("a guard runs after the refusal %v", err)
		}
	}
	w := &fakeWitness{}
	g := &guest{a: &Agent{cfg: Config{Witness: w}, log: slog.New(slog.DiscardHandler)}, name: "web"}
	if err := g.startGuard(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // a few renewals
	g.stopGuard(true)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.asked < 2 || len(w.released) != 1 {
		t.Fatalf("guard asked %d times and released %v; want renewals and one release", w.asked, w.released)
	}
}

// TestRepairLoop: a degraded guest retries pairing with its peer, backing
// off, and records each failure; unpairing stops the retries and leaves the
// guest unprotected.
func TestRepairLoop(t *testing.T) {
	dir := t.TempDir()
	a, err := New(Config{Name: "a", StateDir: dir + "/s", RunDir: dir + "/r", RAMDir: dir + "/m",
		RepairMin: 20 * time.Millisecond, RepairMax: 80 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	// No credentials: every attempt fails at once, before any QEMU work.
	g := &guest{a: a, name: "web", dev: &devices{}, state: StateDegraded, peer: "127.0.0.1:1"}
	g.startRepair(g.peer)
	g.startRepair(g.peer) // a second start while one runs is a no-op
	deadline := time.Now().Add(10 * time.Second)
	for {
		g.mu.Lock()
		tries, lastErr, next := g.repairTries, g.repairErr, g.repairNext
		g.mu.Unlock()
		if tries >= 5 && lastErr != "" {
			if !strings.Contains(lastErr, "no credentials") {
				t.Fatalf("attempt error: %q", lastErr)
			}
			if wait := time.Until(next); wait > 80*time.Millisecond {
				t.Fatalf("next attempt in %v, beyond RepairMax", wait)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d attempts (last error %q)", tries, lastErr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := g.unpair(); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	st, tries := g.state, g.repairTries
	g.mu.Unlock()
	if st != StateUnprotected {
		t.Fatalf("after unpair: %s", st)
	}
	time.Sleep(300 * time.Millisecond)
	g.mu.Lock()
	after := g.repairTries
	g.mu.Unlock()
	if after > tries+1 { // one attempt may have been under way
		t.Fatalf("attempts went on after unpair: %d → %d", tries, after)
	}
	if err := g.unpair(); err == nil {
		t.Fatal("unpairing an unpaired guest succeeded")
	}
}
