package agent_test

import (
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

// windowArbiter promotes on the VM's silence heard for window: what the
// probe arbiter does with --promote-on-silence.
type windowArbiter struct {
	yesArbiter
	window time.Duration
}

func (w windowArbiter) SilenceWindow(agent.ProbeSpec) time.Duration { return w.window }

// TestLateDegradeFences: a primary that notices the loss of its secondary
// only after the secondary's LAN probe may have stopped listening must not
// let the VM's held output out (the secondary could have found the VM
// silent and promoted it): it pauses the guest and shows it fenced, with
// what to do. `ftctl resume` lets it go on; pairing it meanwhile is
// refused. A primary that notices in time degrades as before.
func TestLateDegradeFences(t *testing.T) {
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, 4*time.Minute)
	ca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	const window = 300 * time.Millisecond
	A := newHostWith(t, ca, "host-a", func(c *agent.Config) { c.PeerTimeout, c.NoRepair = time.Second, true })
	B := newHostWith(t, ca, "host-b", func(c *agent.Config) {
		c.PeerTimeout = time.Second
		c.Arbiter = windowArbiter{window: window}
	})
	spec := guestSpec(t, img, "ftguest.run=counter ftguest.interval=50ms")
	if _, err := A.c.Start(ctx, agent.StartRequest{Spec: spec}); err != nil {
		t.Fatal(err)
	}

	// The secondary goes (its standby dies, so its agent drops the
	// replica and the link ends): A learns of it at once, but acts
	// only after the secondary's timeout plus its probe window.
	protect := func() agent.VMStatus {
		t.Helper()
		if _, err := A.c.Pair(ctx, "web", B.a.PeerAddr()); err != nil {
			t.Fatal(err)
		}
		A.waitState(t, ctx, "web", agent.StateProtected)
		return B.waitState(t, ctx, "web", agent.StateStandby)
	}
	killStandby := func(sb agent.VMStatus) {
		t.Helper()
		if err := syscall.Kill(sb.PID, syscall.SIGKILL); err != nil {
			t.Fatalf("kill B's standby %d: %v", sb.PID, err)
		}
	}
	agent.SetDegradeDelay(A.a, time.Second+window)
	killStandby(protect())
	var fenced agent.VMStatus
	for fenced.State != agent.StateFenced {
		if fenced, err = A.c.Get(ctx, "web"); err != nil {
			t.Fatal(err)
		}
		if fenced.State == agent.StateDegraded {
			t.Fatalf("A degraded (letting the held output out) although it noticed too late: %s", fenced.Reason)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("A never fenced: %+v", fenced)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Logf("fenced: %s", fenced.Reason)
	for _, want := range []string{"may have taken over", "ftctl stop web", "ftctl resume web"} {
		if !strings.Contains(fenced.Reason, want) {
			t.Errorf("the fenced reason does not say %q: %s", want, fenced.Reason)
		}
	}
	if fenced.RunState != "paused" {
		t.Fatalf("fenced guest's QEMU is %q, want paused", fenced.RunState)
	}
	held, _ := A.a.Serial("web")
	time.Sleep(500 * time.Millisecond)
	if now, _ := A.a.Serial("web"); counterlog.Last(now) != counterlog.Last(held) {
		t.Fatalf("the fenced guest ran on: counter %d → %d", counterlog.Last(held), counterlog.Last(now))
	}
	if _, err := A.c.Pair(ctx, "web", B.a.PeerAddr()); !errors.Is(err, agent.ErrState) {
		t.Fatalf("pairing a fenced VM: %v, want ErrState", err)
	}

	// The operator knows B did not take over.
	if err := A.c.Resume(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	st, _ := A.c.Get(ctx, "web")
	if st.State != agent.StateDegraded || st.RunState != "running" {
		t.Fatalf("after resume: %s (%s), QEMU %q", st.State, st.Reason, st.RunState)
	}
	A.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.Last(b) > counterlog.Last(held)+3 })
	if err := A.c.Resume(ctx, "web"); !errors.Is(err, agent.ErrState) {
		t.Fatalf("resuming a VM that is not fenced: %v, want ErrState", err)
	}

	// Noticed in time (before the secondary's timeout plus its probe
	// window, less the slack): degraded, output flowing, as always.
	agent.SetDegradeDelay(A.a, 0)
	killStandby(protect())
	A.waitState(t, ctx, "web", agent.StateDegraded)
}
