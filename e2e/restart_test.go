package e2e

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/pkg/agent"
)

// TestAgentRestart: kill -9 of an agent while its VM is protected, with
// the agents running each VM in a shim (--shims; not yet the default).
//
// A's agent (the primary's host): the VM lives in its shim, which owns its
// QEMU, disk export, NIC buffer and replication link, so nothing notices.
// The client is served throughout, the counter goes on, B's replica keeps
// committing, and the restarted agent finds the shim and shows the VM
// protected, with the same QEMU and shim.
//
// B's agent (the secondary's host): the replica lives in B's agent for now,
// so it is lost with it. A degrades without stopping the guest (the client
// is still served) and pairs again by itself once B's agent is back.
func TestAgentRestart(t *testing.T) {
	c, vc := protectedVMWith(t, func(c *cluster) {
		for _, p := range []*agentProc{c.a, c.b} {
			p.extra = append(p.extra, "--shims")
		}
	})
	before, err := c.a.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if before.State != agent.StateProtected || before.ShimPID == 0 {
		t.Fatalf("before the kill A shows %+v", before)
	}
	sb, err := c.b.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	serialBefore := c.a.serial(vmName, false)

	// 1. A's agent dies.
	c.a.kill()
	for i := 0; i < 3; i++ {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection with A's agent dead: %v", err)
		}
		if _, err := vc.short(c.ctx, 30*time.Second); err != nil {
			t.Fatalf("new connection with A's agent dead: %v", err)
		}
	}
	// B still commits checkpoints of the running VM (its epoch advances):
	// protection went on without A's agent.
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, err := c.b.status(vmName)
		if err == nil && s.State == agent.StateStandby && s.Epoch > sb.Epoch+3 {
			t.Logf("B committed epochs %d..%d with A's agent dead", sb.Epoch, s.Epoch)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B's replica stopped committing with A's agent dead: %+v, %v (was epoch %d)", s, err, sb.Epoch)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.a.start()
	after := c.a.waitState(vmName, agent.StateProtected, 30*time.Second, agent.StateStopped, agent.StateDegraded)
	if after.PID != before.PID || after.ShimPID != before.ShimPID {
		t.Fatalf("after A's agent restart: QEMU %d, shim %d; before: QEMU %d, shim %d", after.PID, after.ShimPID, before.PID, before.ShimPID)
	}
	serialAfter := c.a.waitSerial(vmName, false, 30*time.Second, "5 more counter lines", func(b []byte) bool {
		return counterlog.Last(b) >= counterlog.Last(serialBefore)+5
	})
	if _, err := counterlog.Check(counterlog.Values(serialAfter)); err != nil {
		t.Fatalf("counter across A's agent restart: %v", err)
	}
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection after A's agent restart: %v", err)
	}

	// 2. B's agent dies: A degrades and goes on serving, then re-pairs.
	c.b.kill()
	sa := c.a.waitState(vmName, agent.StateDegraded, time.Minute, agent.StateStopped)
	t.Logf("A degraded after B's agent was killed: %s", sa.Reason)
	if sa.PID != before.PID {
		t.Fatalf("A's QEMU changed from %d to %d", before.PID, sa.PID)
	}
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection with B's agent dead: %v", err)
	}
	// Its standby QEMU went with the replica's owner or not: either way
	// B starts clean.
	if sb.PID > 0 && processLives(sb.PID) {
		killUnder(t, c.b.dir)
	}
	c.b.start()
	c.a.waitState(vmName, agent.StateProtected, 2*time.Minute, agent.StateStopped)
	c.b.waitState(vmName, agent.StateStandby, 30*time.Second)
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection, protected again: %v", err)
	}
	vc.checkLedger(t)
	c.a.stopAndVerifyDisk(filepath.Join(c.root, "disk.raw"), false)
}
