package e2e

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/checker"
	ftc "github.com/ftctl/ftctl/pkg/cluster"
	"github.com/ftctl/ftctl/pkg/guestimage"
)

// defaultKills is how many failovers TestRandomizedKills makes in CI;
// FTCTL_KILLS overrides it (`make soak` runs 200), FTCTL_KILL_SEED
// replays a run.
const defaultKills = 20

func envInt(t *testing.T, name string, def int64) int64 {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		t.Fatalf("%s=%q: want a non-negative integer", name, s)
	}
	return v
}

// killWorld is the randomized kill test's state: the VM, where it runs,
// and the client checker of its current incarnation.
type killWorld struct {
	t   *testing.T
	ctx context.Context
	c   *ftc.Cluster
	img guestimage.Image
	rng *rand.Rand

	v      *ftc.VM
	chk    *checker.Checker
	cancel context.CancelFunc
	done   chan error
	// incarnations counts VMs started: 1 + VMs lost during an initial sync.
	incarnations int
	// repairs counts pairings that ended degraded although both hosts
	// lived (a link declared silent under load) and were started again.
	repairs int
}

// repair pairs the VM with sec again after a pairing that failed while
// both hosts lived: the primary went degraded, which loses nothing (it
// runs on alone, output released), so the test pairs again, a bounded
// number of times, and reports how often.
func (w *killWorld) repair(round int, sec *ftc.Agent, why error) {
	w.t.Helper()
	st, err := w.v.Status(w.ctx)
	if err != nil || st.State != agent.StateDegraded {
		w.t.Fatalf("round %d: pairing with %s failed: %v (now %s %q, %v)", round, sec.Name, why, st.State, st.Reason, err)
	}
	w.repairs++
	if w.repairs > 10 {
		w.t.Fatalf("round %d: %d pairings ended degraded with both hosts alive; last: %v", round, w.repairs, why)
	}
	w.t.Logf("round %d: the pairing with %s ended degraded with both hosts alive (%s); pairing again", round, sec.Name, st.Reason)
	if err := w.v.StartPair(w.ctx, sec); err != nil {
		w.t.Fatal(err)
	}
}

// startVM boots a fresh VM on p and a checker against it.
func (w *killWorld) startVM(p *ftc.Agent) {
	w.t.Helper()
	w.stopChecker()
	v, err := w.c.StartVM(w.ctx, p, ftc.GuestOptions{Image: w.img, Accel: "tcg"})
	if err != nil {
		w.t.Fatal(err)
	}
	w.v = v
	w.incarnations++
	chk, err := v.NewChecker(checker.Config{Interval: 20 * time.Millisecond, Timeout: 10 * time.Second, ShortConns: 2})
	if err != nil {
		w.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(w.ctx)
	w.chk, w.cancel, w.done = chk, cancel, make(chan error, 1)
	go func() { w.done <- chk.Run(ctx) }()
}

// stopChecker ends the current checker and returns its verdict.
func (w *killWorld) stopChecker() error {
	if w.chk == nil {
		return nil
	}
	w.cancel()
	err := <-w.done
	w.chk = nil
	return err
}

// waitLongAck waits until the checker's long-lived connection has an
// acknowledged request, so a failover has a connection to carry.
func (w *killWorld) waitLongAck() {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
	defer cancel()
	for w.chk.Snapshot().LongAcked == 0 {
		select {
		case <-ctx.Done():
			w.t.Fatalf("the checker got no reply on its long-lived connection: %s", w.chk.Snapshot())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// outcome is what the survivor did after the primary was killed.
type outcome int

const (
	promoted outcome = iota
	lost             // killed before the first checkpoint committed
)

// awaitOutcome waits for the survivor s to promote the VM or to say that
// it has nothing to resume (the primary died during the initial sync).
func (w *killWorld) awaitOutcome(s *ftc.Agent) (outcome, agent.VMStatus) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(w.ctx, time.Minute)
	defer cancel()
	var last agent.VMStatus
	for {
		st, err := s.Status(ctx, w.v.Name)
		if err == nil {
			last = st
			switch {
			case st.State == agent.StatePromoted:
				return promoted, st
			case strings.Contains(st.Reason, "nothing to resume"):
				return lost, st
			case strings.Contains(st.Reason, "not promoting"), st.State == agent.StateStopped:
				w.t.Fatalf("%s did not take over: %s %q", s.Name, st.State, st.Reason)
			}
		}
		select {
		case <-ctx.Done():
			w.t.Fatalf("%s neither promoted nor gave up within a minute: last %s %q (%v)", s.Name, last.State, last.Reason, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestRandomizedKills repeatedly kills the protected VM's primary at a
// random moment — its QEMU, its agent, or both; with its host cut off from
// every network or not — lets the secondary take over, checks the client,
// the counter and the disk, and protects the VM again on a fresh agent on
// the dead host, until FTCTL_KILLS failovers (default 20) have happened.
//
// Moments: a kill lands at a random millisecond of a protected run of
// 0.2–1.5 s (the guest checkpoints every 20–50 ms and each pause lasts
// 10–30 ms under TCG, so many kills land inside a checkpoint), or, in one
// round of five, at a random millisecond of the initial sync of a new
// pairing. A primary killed during the initial sync leaves the secondary
// without any committed checkpoint: the VM dies with its host, as an
// unprotected VM would. The test expects exactly that — the survivor says
// it has nothing to resume, runs no copy of the VM, and accepts the VM
// again — then starts a new VM there and goes on (such rounds do not count
// as failovers).
//
// After every failover: the client checker's long-lived connection
// survived and every acknowledged request is still held by the server;
// the promoted copy's counter continues from a value the dead primary had
// reached; its disk chain is unbroken and holds every record the guest
// reported.
func TestRandomizedKills(t *testing.T) {
	requireEnv(t)
	n := int(envInt(t, "FTCTL_KILLS", defaultKills))
	seed := uint64(envInt(t, "FTCTL_KILL_SEED", time.Now().UnixNano()&(1<<62-1)))
	t.Logf("%d failovers, seed %d (FTCTL_KILL_SEED=%d replays the choices)", n, seed, seed)
	ctx := testenv.Deadline(t, 3*time.Minute+time.Duration(n)*30*time.Second)
	img := testenv.Guest(t)
	c, err := ftc.New(ctx, ftc.Options{Binary: ftctlBinary(t), Prefix: "ftk"})
	if err != nil {
		t.Fatal(err)
	}
	w := &killWorld{t: t, ctx: ctx, c: c, img: img, rng: rand.New(rand.NewPCG(seed, 0x6b696c6c))}
	t.Cleanup(func() {
		w.stopChecker()
		if t.Failed() {
			for _, p := range c.Agents() {
				t.Logf("---- log of agent %s (%s) ----\n%s", p.Name, p.Dir, p.LogTail(8000))
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})

	start := time.Now()
	w.startVM(c.A)
	if err := w.v.StartPair(ctx, c.B); err != nil {
		t.Fatal(err)
	}
	var (
		failovers, lostVMs int
		downtimes          []time.Duration
		kinds              = map[string]int{}
	)
	for round := 1; failovers < n; round++ {
		if round > 2*n+5 {
			t.Fatalf("%d rounds for %d failovers: too many VMs lost during initial syncs", round, failovers)
		}
		prim := w.v.On
		sec := c.Peer(prim)
		kill := ftc.Kill(w.rng.IntN(3))
		isolate := w.rng.IntN(2) == 0
		w.waitLongAck()
		if w.rng.IntN(5) == 0 {
			// During the initial sync that StartPair began (or just after).
			time.Sleep(time.Duration(w.rng.IntN(1500)) * time.Millisecond)
		} else {
			if err := w.v.WaitProtected(ctx, sec, 2*time.Minute); err != nil {
				w.repair(round, sec, err)
				continue
			}
			time.Sleep(time.Duration(200+w.rng.IntN(1300)) * time.Millisecond)
		}
		st, err := w.v.Status(ctx)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if st.State != agent.StateProtected && st.State != agent.StateSyncing {
			w.repair(round, sec, fmt.Errorf("%s is %s: %s", w.v.Name, st.State, st.Reason))
			continue
		}
		if err := w.chk.Snapshot().Err(); err != nil {
			t.Fatalf("round %d: the checker saw a violation before the kill: %v", round, err)
		}
		// A few more milliseconds, so the kill is not always right after
		// a status call.
		time.Sleep(time.Duration(w.rng.IntN(40)) * time.Millisecond)
		kd, err := w.v.KillPrimary(ctx, kill, isolate, st)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		res, sst := w.awaitOutcome(sec)
		desc := fmt.Sprintf("round %d: killed %s on %s (isolated %v) while %s, at epoch %d", round, kill, prim.Name, isolate, st.State, st.Epoch)

		if res == lost {
			if st.State != agent.StateSyncing {
				t.Fatalf("%s: %s had nothing to resume although %s was %s: %s", desc, sec.Name, prim.Name, st.State, sst.Reason)
			}
			if sst.State != agent.StateStandby || sst.RunState != "inmigrate" {
				t.Fatalf("%s: after losing the primary in its initial sync, %s shows %s/%q; want a standby that never ran", desc, sec.Name, sst.State, sst.RunState)
			}
			if cl := counterlog.Values(sec.Serial(w.v.Name, true)); len(cl) != 0 {
				t.Fatalf("%s: %s's standby printed %d counter lines: a copy ran", desc, sec.Name, len(cl))
			}
			lostVMs++
			kinds["lost in sync"]++
			t.Logf("%s: VM lost with its host (no committed checkpoint: %s); starting a new one on %s", desc, sst.Reason, sec.Name)
			if err := w.v.Forget(ctx, sec); err != nil {
				t.Fatal(err)
			}
			w.startVM(sec)
			np, err := c.Restart(ctx, prim)
			if err != nil {
				t.Fatal(err)
			}
			if err := w.v.StartPair(ctx, np); err != nil {
				t.Fatal(err)
			}
			continue
		}

		prom, err := ftc.ParsePromotion(sst)
		if err != nil {
			t.Fatalf("%s: %v", desc, err)
		}
		w.v.On, w.v.Replica = sec, true
		if prom.Epoch < st.Epoch {
			t.Fatalf("%s: %s resumed epoch %d, but the primary had %d acknowledged", desc, sec.Name, prom.Epoch, st.Epoch)
		}
		vctx, vcancel := context.WithTimeout(ctx, time.Minute)
		fo, err := w.chk.Verify(vctx, kd.At)
		vcancel()
		if err != nil {
			t.Fatalf("%s: client across the failover: %v\n%s", desc, err, w.chk.Snapshot())
		}
		target := counterlog.Last(kd.Serial) + 3
		after, err := w.v.WaitSerial(ctx, time.Minute, "counter lines", func(b []byte) bool { return counterlog.Last(b) >= target })
		if err != nil {
			t.Fatalf("%s: %v", desc, err)
		}
		rep, err := ftc.CheckResumedCounter(kd.Serial, after)
		if err != nil {
			t.Fatalf("%s: %v", desc, err)
		}
		dr, err := w.v.VerifyDisk(ctx)
		if err != nil {
			t.Fatalf("%s: %v", desc, err)
		}
		failovers++
		kinds[fmt.Sprintf("%s/%s", kill, st.State)]++
		downtimes = append(downtimes, fo.Downtime)
		t.Logf("%s → %s resumed epoch %d in %v; client downtime %v, %d in flight answered; counter %d→%d (%d again); disk chain to seq %d",
			desc, sec.Name, prom.Epoch, prom.Duration, fo.Downtime.Round(time.Millisecond), fo.InFlight,
			counterlog.Last(kd.Serial), counterlog.Values(after)[0], rep, dr.LastSeq)

		np, err := c.Restart(ctx, prim)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.v.StartPair(ctx, np); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.v.WaitProtected(ctx, c.Peer(w.v.On), 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	r := w.chk.Snapshot()
	if err := w.stopChecker(); err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("checker: %v", err)
	}
	if r.AckedLost != 0 {
		t.Fatalf("acknowledged requests lost: %d", r.AckedLost)
	}
	var worst time.Duration
	for _, d := range downtimes {
		worst = max(worst, d)
	}
	t.Logf("%d failovers and %d VMs lost during an initial sync in %v; kinds %v; worst client downtime %v; %d pairings repeated after a spurious degrade; last incarnation: %d requests acknowledged, 0 lost",
		failovers, lostVMs, time.Since(start).Round(time.Second), kinds, worst.Round(time.Millisecond), w.repairs, r.Acked)
}
