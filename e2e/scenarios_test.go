package e2e

import (
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/pkg/agent"
)

// protectedVM is the common start of the scenarios: the VM runs on A,
// the client has talked to it on a long-lived and a short connection,
// and it is protected on B.
func protectedVM(t *testing.T) (*cluster, *vmClient) {
	t.Helper()
	c := newCluster(t, 4*time.Minute)
	c.startVM(c.a)
	vc := newVMClient(t, c)
	if err := vc.connectLong(c.ctx); err != nil {
		t.Fatalf("connect to the VM's service: %v", err)
	}
	if _, err := vc.onLong(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	c.pair(c.a, c.b, false)
	// Traffic through the output-commit buffer: every reply waits for its
	// checkpoint to be committed on B.
	for i := 0; i < 3; i++ {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection while protected: %v", err)
		}
		if _, err := vc.short(c.ctx, 30*time.Second); err != nil {
			t.Fatalf("new connection while protected: %v", err)
		}
	}
	return c, vc
}

// checkResumedCounter checks the counter of a promoted copy against what
// the dead primary had printed: the copy starts at a value the primary
// reached (no gap) and counts on by one; it reports how many values the
// copy printed again (those the primary printed after its last committed
// checkpoint).
func checkResumedCounter(t *testing.T, before, after []byte) (repeated uint64) {
	t.Helper()
	pv, av := counterlog.Values(before), counterlog.Values(after)
	if len(pv) == 0 || len(av) == 0 {
		t.Fatalf("counter lines: primary %d, promoted copy %d", len(pv), len(av))
	}
	if _, err := counterlog.Check(pv); err != nil {
		t.Fatalf("primary's counter: %v", err)
	}
	if _, err := counterlog.Check(av); err != nil {
		t.Fatalf("promoted copy's counter: %v", err)
	}
	first, last := av[0], pv[len(pv)-1]
	if first > last+1 {
		t.Fatalf("the promoted copy resumed at counter %d, but the primary had only reached %d: a gap", first, last)
	}
	if first != pv[0] && !slices.Contains(pv, first-1) {
		t.Fatalf("the promoted copy resumed at %d, a value the primary never followed (it printed %d..%d)", first, pv[0], last)
	}
	return last + 1 - first
}

// TestPrimaryHostDies: host A vanishes from every network and its agent
// and QEMU are SIGKILLed. B's agent notices the silent link, finds the VM
// silent on the LAN, and promotes its standby: the counter continues from
// the last committed checkpoint, and the client reaches the VM's address
// again.
func TestPrimaryHostDies(t *testing.T) {
	c, vc := protectedVM(t)
	// Let a few checkpoints commit with the guest busy.
	c.a.waitSerial(vmName, false, 30*time.Second, "more counter lines", func(b []byte) bool {
		return len(counterlog.Values(b)) >= 3
	})
	st, err := c.a.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if st.PID == 0 || st.State != agent.StateProtected {
		t.Fatalf("before the kill A shows %+v", st)
	}
	killT := time.Now()
	if err := c.bed.IsolateHost(c.bed.A); err != nil {
		t.Fatal(err)
	}
	c.a.kill()
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill A's QEMU %d: %v", st.PID, err)
	}
	sb := c.b.waitState(vmName, agent.StatePromoted, time.Minute, agent.StateStopped)
	epoch, promote := promotion(t, sb)
	decided := sb.Since.Add(-promote)
	silent, _ := logTime(c.b.log, killT, "replication link silent")
	t.Logf("B promoted: %s", sb.Reason)
	t.Logf("detection (kill → B decides): %v; link declared dead after %v; promotion (decision → running): %v",
		decided.Sub(killT).Round(time.Millisecond), silent.Sub(killT).Round(time.Millisecond), promote)
	if epoch < st.Epoch {
		t.Fatalf("B resumed epoch %d, but A had epoch %d acknowledged before it died", epoch, st.Epoch)
	}
	if sb.Role != agent.RolePrimary || sb.PID == 0 {
		t.Fatalf("promoted VM on B: %+v", sb)
	}

	before := c.a.serial(vmName, false)
	after := c.b.waitSerial(vmName, true, time.Minute, "5 counter lines", func(b []byte) bool {
		return len(counterlog.Values(b)) >= 5
	})
	rep := checkResumedCounter(t, before, after)
	t.Logf("counter: A printed up to %d, B resumed at %d (%d printed again, after A's last commit)",
		counterlog.Last(before), counterlog.Values(after)[0], rep)

	seq, took, err := vc.shortUntil(c.ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("a new connection got seq=%d, %v after the kill", seq, time.Since(killT).Round(time.Millisecond))
	_ = took
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Logf("the long-lived TCP connection did not survive the failover: %v", err)
	} else {
		t.Logf("the long-lived TCP connection survived the failover")
	}
	vc.checkLedger(t)
}
