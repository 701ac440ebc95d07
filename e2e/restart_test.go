package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/pkg/agent"
)

// TestAgentRestart: kill -9 of an agent while its VM is protected, with
// the agents running each VM and each replica in a shim (the default;
// --shims is given anyway, so the test means it whatever the default).
//
// A's agent (the primary's host): the VM lives in its shim, which owns its
// QEMU, disk export, NIC buffer and replication link, so nothing notices.
// The client is served throughout, the counter goes on, B's replica keeps
// committing, and the restarted agent finds the shim and shows the VM
// protected, with the same QEMU and shim.
//
// B's agent (the secondary's host): the replica lives in B's replica shim,
// which the pairing was redirected to, with its own replication listener
// and management heartbeat server. So A stays protected without a state
// change — no degradation, no re-sync: its checkpoints go on, its state
// keeps its timestamp, and B's shim commits epochs in sequence — and A's
// health path still hears B. The restarted agent lists the replica again,
// in the same shim with the same standby.
func TestAgentRestart(t *testing.T) {
	c, vc := protectedVMWith(t, func(c *cluster) {
		for _, p := range []*agentProc{c.a, c.b} {
			p.extra = append(p.extra, "--shims", "--shim-ports", shimPorts)
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

	// 2. B's agent dies: the replica and its link live on in B's shim.
	sa, err := c.a.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	sb, err = c.b.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if sb.Role != agent.RoleSecondary || sb.State != agent.StateStandby || sb.ShimPID == 0 || sb.ShimPID == c.b.cmd.Process.Pid {
		t.Fatalf("B's replica should live in a shim of its own: %+v", sb)
	}
	// Its replication listener is on a port of --shim-ports.
	m := regexp.MustCompile(`started a replica shim".* addr=\S+:(\d+)`).FindStringSubmatch(readTail(c.b.log, 100000))
	if m == nil {
		t.Fatalf("B's agent did not log its replica shim's address:\n%s", readTail(c.b.log, 2000))
	}
	if port, _ := strconv.Atoi(m[1]); port < shimPortLow || port > shimPortHigh {
		t.Fatalf("B's replica shim listens on port %d, outside --shim-ports %s", port, shimPorts)
	}
	c.b.kill()
	for i := 0; i < 3; i++ {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection with B's agent dead: %v", err)
		}
	}
	// Beyond the peer timeout (1 s): a pairing that depended on B's agent
	// would be degraded by now.
	time.Sleep(3 * time.Second)
	shimSock := agent.ShimSocket(filepath.Join(c.b.dir, "run"), vmName)
	deadline = time.Now().Add(30 * time.Second)
	var sbShim agent.VMStatus
	for {
		sbShim, err = statusAt(c, shimSock, vmName)
		if err == nil && sbShim.State == agent.StateStandby && sbShim.Epoch > sb.Epoch+5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B's replica shim stopped committing with B's agent dead: %+v, %v (was epoch %d)", sbShim, err, sb.Epoch)
		}
		time.Sleep(100 * time.Millisecond)
	}
	during, err := c.a.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if during.State != agent.StateProtected || !during.Since.Equal(sa.Since) || during.Checkpoints <= sa.Checkpoints || during.Epoch <= sa.Epoch {
		t.Fatalf("with B's agent dead A shows %+v; before: %+v", during, sa)
	}
	if during.PeerHealth != "alive" {
		t.Fatalf("A's failure detector says B is %q, but only B's agent died", during.PeerHealth)
	}
	t.Logf("B's agent dead: its replica shim committed epochs %d..%d; A protected since %v, epochs acknowledged %d..%d",
		sb.Epoch, sbShim.Epoch, sa.Since.Format(time.RFC3339Nano), sa.Epoch, during.Epoch)

	c.b.start()
	sb2 := c.b.waitState(vmName, agent.StateStandby, 30*time.Second, agent.StatePromoted, agent.StateStopped)
	if sb2.Role != agent.RoleSecondary || sb2.ShimPID != sb.ShimPID || sb2.PID != sb.PID || sb2.Epoch < sbShim.Epoch {
		t.Fatalf("after B's agent restart B shows %+v; before: shim %d, standby %d, epoch %d", sb2, sb.ShimPID, sb.PID, sbShim.Epoch)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		after2, err := c.a.status(vmName)
		if err != nil {
			t.Fatal(err)
		}
		if after2.State != agent.StateProtected || !after2.Since.Equal(sa.Since) {
			t.Fatalf("after B's agent restart A shows %+v", after2)
		}
		if after2.Epoch > sb2.Epoch {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no epoch acknowledged after B's agent restart: A at %d, B had %d", after2.Epoch, sb2.Epoch)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection after B's agent restart: %v", err)
	}
	vc.checkLedger(t)
	c.a.stopAndVerifyDisk(filepath.Join(c.root, "disk.raw"), false)
}

// The ports replica shims listen on in TestAgentRestart.
const (
	shimPortLow, shimPortHigh = 7490, 7499
	shimPorts                 = "7490-7499"
)

// statusAt is `ftctl status --json` of VM name on the control socket sock
// (an agent's or a shim's).
func statusAt(c *cluster, sock, name string) (agent.VMStatus, error) {
	r := c.cli("status", "--socket", sock, "--json", name)
	if r.code != 0 {
		return agent.VMStatus{}, fmt.Errorf("%s", strings.TrimSpace(r.stderr))
	}
	var list []agent.VMStatus
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil || len(list) != 1 {
		return agent.VMStatus{}, fmt.Errorf("status --json printed %q: %v", r.stdout, err)
	}
	return list[0], nil
}
