package e2e

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
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
	return protectedVMWith(t, nil)
}

// protectedVMWith is protectedVM on a cluster prepared by setup.
func protectedVMWith(t *testing.T, setup func(*cluster)) (*cluster, *vmClient) {
	t.Helper()
	return protectedVMHosts(t, 2, setup)
}

// protectedVMHosts is protectedVMWith on a bed of hosts KVM hosts.
func protectedVMHosts(t *testing.T, hosts int, setup func(*cluster)) (*cluster, *vmClient) {
	t.Helper()
	c := newClusterHosts(t, 4*time.Minute, hosts, setup)
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
// the last committed checkpoint, the client reaches the VM's address
// again, and its disk holds exactly what the resumed memory expects. When A
// returns, the VM is protected onto it again.
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
	// A request in flight when the host dies: its reply is either
	// released by A (its checkpoint committed) or recomputed by B, and
	// reaches the client exactly once.
	inflight, err := vc.sendLong()
	if err != nil {
		t.Fatal(err)
	}
	killT := time.Now()
	if err := c.bed.IsolateHost(c.bed.A); err != nil {
		t.Fatal(err)
	}
	c.a.kill()
	c.a.killShim(st)
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
	if !strings.Contains(sb.Reason, "primary lost (nothing heard from the peer") {
		t.Errorf("B's reason does not say the link went silent: %q", sb.Reason)
	}
	if !strings.Contains(sb.Reason, "the VM is silent on the LAN") {
		t.Errorf("B's reason does not say what its probe saw: %q", sb.Reason)
	}
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

	// The long-lived connection survives: TCP retransmits into the
	// resumed guest, which holds the connection's state as of the
	// checkpoint, and announce-self moved its MAC to B's port.
	seq, err := vc.finishLong(inflight, time.Minute)
	if err != nil {
		t.Fatalf("the request in flight at the kill: %v", err)
	}
	t.Logf("the request in flight at the kill got seq=%d, %v after the kill", seq, time.Since(killT).Round(time.Millisecond))
	if seq, err = vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("the long-lived TCP connection did not survive the failover: %v", err)
	}
	seq, took, err := vc.shortUntil(c.ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("a new connection got seq=%d (first try took %v)", seq, took.Round(time.Millisecond))

	// Host A comes back: the VM is protected again, onto A, without
	// stopping it.
	if err := c.bed.Rejoin(c.bed.A); err != nil {
		t.Fatal(err)
	}
	c.a.start()
	c.pair(c.b, c.a, true)
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection with the VM protected back on A: %v", err)
	}
	vc.checkLedger(t)
	c.b.stopAndVerifyDisk(c.b.replicaDisk(), true)
}

// TestReplicationLinkCut: only the replication link between A and B
// breaks; the LAN and the management network work. With the management
// path, B hears A's agent there after the link died and does not promote,
// without probing the LAN; without it (the agents have no --mgmt-listen),
// B's probe finds the VM answering on the LAN, and does not promote either.
// Either way B's standby QEMU stays waiting for a migration, and A goes on
// degraded, its output released, and serves the client. With the link
// back, pairing again protects the VM again.
func TestReplicationLinkCut(t *testing.T) {
	t.Run("management path", func(t *testing.T) { replicationLinkCut(t, true, 0) })
	t.Run("LAN probe", func(t *testing.T) { replicationLinkCut(t, false, 0) })
	// A holds the VM's output, and so its answers to B's probe, until its
	// own, longer, timeout fires: B must wait for it, or it would hear
	// nothing and promote while A runs.
	t.Run("LAN probe, primary's timeout longer", func(t *testing.T) { replicationLinkCut(t, false, 2500*time.Millisecond) })
}

// cutLink cuts the replication link only and waits for A to degrade and
// for B to decide not to promote, each saying the link went silent.
func cutLink(t *testing.T, c *cluster) (sa, sb agent.VMStatus) {
	t.Helper()
	cutT := time.Now()
	if err := c.bed.CutReplication(); err != nil {
		t.Fatal(err)
	}
	sa = c.a.waitState(vmName, agent.StateDegraded, time.Minute, agent.StateStopped)
	t.Logf("A degraded %v after the cut: %s", sa.Since.Sub(cutT).Round(time.Millisecond), sa.Reason)
	if !strings.Contains(sa.Reason, "secondary lost: nothing heard from the peer") {
		t.Fatalf("A's reason for degrading: %q", sa.Reason)
	}
	sb = c.b.waitReason(vmName, "not promoting", time.Minute)
	t.Logf("B decided %v after the cut: %s", sb.Since.Sub(cutT).Round(time.Millisecond), sb.Reason)
	if sb.State != agent.StateStandby || sb.Role != agent.RoleSecondary {
		t.Fatalf("after the cut B shows %s/%s, want a secondary in standby", sb.Role, sb.State)
	}
	if !strings.Contains(sb.Reason, "primary link lost (nothing heard from the peer") {
		t.Errorf("B's reason does not say the link went silent: %q", sb.Reason)
	}
	return sa, sb
}

func replicationLinkCut(t *testing.T, mgmt bool, primaryTimeout time.Duration) {
	c, vc := protectedVMWith(t, func(c *cluster) {
		if !mgmt {
			c.a.mgmt, c.b.mgmt = "", ""
		}
		if primaryTimeout > 0 {
			c.a.extra = append(c.a.extra, "--peer-timeout", primaryTimeout.String())
		}
	})
	// B's decision: the link died, the VM answers on the LAN, no promotion.
	sa, sb := cutLink(t, c)
	if mgmt {
		if !strings.Contains(sb.Reason, "answered on the management path") || !strings.Contains(sb.Reason, "only the replication link failed") {
			t.Errorf("B's reason does not say the management path showed A alive: %q", sb.Reason)
		}
		if strings.Contains(sb.Reason, "LAN") {
			t.Errorf("B probed the LAN although the management path decided: %q", sb.Reason)
		}
		sa = c.a.waitReason(vmName, "only the replication link failed", 30*time.Second)
		t.Logf("A's reason once the management path told: %s", sa.Reason)
	} else if !strings.Contains(sb.Reason, "the VM answers on the LAN") {
		t.Errorf("B's reason does not say its probe found the VM alive: %q", sb.Reason)
	}
	if strings.Contains(sb.Reason, "<nil>") {
		t.Errorf("B's reason shows a Go nil: %q", sb.Reason)
	}

	// Exactly one copy runs: A's QEMU runs, B's still waits for an
	// incoming migration and has printed nothing.
	for i := 0; i < 3; i++ {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection after the cut: %v", err)
		}
		if _, err := vc.short(c.ctx, 30*time.Second); err != nil {
			t.Fatalf("new connection after the cut: %v", err)
		}
	}
	sa, err := c.a.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	sb, err = c.b.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if sa.RunState != "running" || sb.RunState != "inmigrate" {
		t.Fatalf("QEMU run states: A %q, B %q; want running and inmigrate (one copy runs)", sa.RunState, sb.RunState)
	}
	if sb.State != agent.StateStandby {
		t.Fatalf("B became %s: %s", sb.State, sb.Reason)
	}
	if n := len(counterlog.Values(c.b.serial(vmName, true))); n != 0 {
		t.Fatalf("B's standby printed %d counter lines: it ran", n)
	}
	mark := counterlog.Last(c.a.serial(vmName, false))
	c.a.waitSerial(vmName, false, 30*time.Second, "counting on", func(b []byte) bool {
		return counterlog.Last(b) >= mark+3
	})

	if err := c.bed.RestoreReplication(); err != nil {
		t.Fatal(err)
	}
	c.repair(c.a, c.b)
	sb = c.b.waitState(vmName, agent.StateStandby, 30*time.Second)
	if sb.RunState != "inmigrate" {
		t.Fatalf("B's new standby is %q", sb.RunState)
	}
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection after re-pairing: %v", err)
	}
	if _, err := vc.short(c.ctx, 30*time.Second); err != nil {
		t.Fatalf("new connection after re-pairing: %v", err)
	}
	vc.checkLedger(t)
}

// TestSecondaryKilled: B's agent and its standby QEMU are SIGKILLed. A
// notices, goes on degraded with its output released, and the client is
// still served; once B's agent runs again, pairing again protects the VM.
// Killed processes close their connections (B's kernel lives on); when
// host B vanishes from every network first, A can only notice the silence.
func TestSecondaryKilled(t *testing.T) {
	for _, isolate := range []bool{false, true} {
		name := "processes killed"
		if isolate {
			name = "host vanished"
		}
		t.Run(name, func(t *testing.T) { secondaryKilled(t, isolate) })
	}
}

func secondaryKilled(t *testing.T, isolate bool) {
	c, vc := protectedVM(t)
	sb, err := c.b.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if sb.PID == 0 {
		t.Fatalf("B shows no standby QEMU: %+v", sb)
	}
	killT := time.Now()
	if isolate {
		if err := c.bed.IsolateHost(c.bed.B); err != nil {
			t.Fatal(err)
		}
	}
	c.b.kill()
	if err := syscall.Kill(sb.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill B's standby %d: %v", sb.PID, err)
	}
	sa := c.a.waitState(vmName, agent.StateDegraded, time.Minute, agent.StateStopped)
	t.Logf("A degraded %v after B was killed (peer timeout 1s): %s", sa.Since.Sub(killT).Round(time.Millisecond), sa.Reason)
	if isolate && !strings.Contains(sa.Reason, "nothing heard from the peer") {
		t.Errorf("A's reason does not say the link went silent: %q", sa.Reason)
	}
	for i := 0; i < 3; i++ {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection with the secondary dead: %v", err)
		}
		if _, err := vc.short(c.ctx, 30*time.Second); err != nil {
			t.Fatalf("new connection with the secondary dead: %v", err)
		}
	}
	mark := counterlog.Last(c.a.serial(vmName, false))
	c.a.waitSerial(vmName, false, 30*time.Second, "counting on", func(b []byte) bool {
		return counterlog.Last(b) >= mark+3
	})
	if sa, err = c.a.status(vmName); err != nil || sa.RunState != "running" || sa.State != agent.StateDegraded {
		t.Fatalf("A while degraded: %+v, %v", sa, err)
	}

	// A tries to pair with B again by itself, and says when.
	ctx, cancel := context.WithTimeout(c.ctx, time.Minute)
	defer cancel()
	for sa.Repair == nil || sa.Repair.Attempts == 0 || sa.Repair.LastError == "" {
		select {
		case <-ctx.Done():
			t.Fatalf("A shows no failed re-pairing attempt: %+v", sa)
		case <-time.After(200 * time.Millisecond):
		}
		if sa, err = c.a.status(vmName); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("A re-pairs by itself: %d attempts so far, next at +%v, last error: %s", sa.Repair.Attempts,
		time.Until(sa.Repair.Next).Round(time.Millisecond), sa.Repair.LastError)
	if r := c.a.mustCLI("status"); !strings.Contains(r.stdout, "re-pairing with "+c.b.listen) {
		t.Errorf("ftctl status does not show the re-pairing:\n%s", r.stdout)
	}

	if isolate {
		if err := c.bed.Rejoin(c.bed.B); err != nil {
			t.Fatal(err)
		}
	}
	c.b.start()
	backT := time.Now()
	// No pair command: the agent on A re-pairs.
	c.a.waitState(vmName, agent.StateProtected, 2*time.Minute, agent.StateStopped)
	c.b.waitState(vmName, agent.StateStandby, 30*time.Second)
	t.Logf("protected again %v after B's agent came back, without a pair command", time.Since(backT).Round(time.Millisecond))
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection after re-pairing: %v", err)
	}
	if _, err := vc.short(c.ctx, 30*time.Second); err != nil {
		t.Fatalf("new connection after re-pairing: %v", err)
	}
	vc.checkLedger(t)
	if _, err := counterlog.Check(counterlog.Values(c.a.serial(vmName, false))); err != nil {
		t.Fatalf("A's counter: %v", err)
	}
}

// switchover hands the VM over from one agent to the other with `ftctl
// failover` and checks zero loss: the new copy's counter continues the old
// one's exactly, and the client's long-lived connection goes on with the
// next reply. fromReplica/toReplica say where each side keeps the VM's
// files (a VM promoted on a host runs from its replica directory).
func switchover(t *testing.T, c *cluster, vc *vmClient, from, to *agentProc, fromReplica bool) {
	t.Helper()
	r := from.mustCLI("failover", vmName)
	if !strings.Contains(r.stdout, "now runs on its former secondary") {
		t.Fatalf("failover printed %q", r.stdout)
	}
	atHandover := from.serial(vmName, fromReplica)
	sf, err := from.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if sf.State != agent.StateHandedOver || sf.PID != 0 {
		t.Fatalf("after the handover %s shows %s with pid %d; want handed-over and no QEMU", from.name, sf.State, sf.PID)
	}
	st := to.waitState(vmName, agent.StatePromoted, 30*time.Second, agent.StateStopped)
	_, promote := promotion(t, st)
	t.Logf("%s → %s: %s (promotion %v)", from.name, to.name, st.Reason, promote)
	if st.RunState != "running" {
		t.Fatalf("the VM on %s is %q after the switchover", to.name, st.RunState)
	}
	back := to.waitSerial(vmName, true, time.Minute, "5 more counter lines", func(b []byte) bool {
		return counterlog.Last(b) >= counterlog.Last(atHandover)+5
	})
	if _, err := counterlog.Check(counterlog.Values(counterlog.Stitch(atHandover, back))); err != nil {
		t.Fatalf("counter across the switchover %s → %s: %v", from.name, to.name, err)
	}
	for i := 0; i < 3; i++ {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection after the switchover to %s: %v", to.name, err)
		}
		if _, err := vc.short(c.ctx, 30*time.Second); err != nil {
			t.Fatalf("new connection after the switchover to %s: %v", to.name, err)
		}
	}
}

// TestPlannedFailoverAndBack: `ftctl failover` moves the protected VM to
// B with zero loss; B then protects it on A and it moves back the same way.
func TestPlannedFailoverAndBack(t *testing.T) {
	c, vc := protectedVM(t)
	switchover(t, c, vc, c.a, c.b, false)
	c.pair(c.b, c.a, true)
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("long-lived connection with the VM protected on A: %v", err)
	}
	switchover(t, c, vc, c.b, c.a, true)
	vc.checkLedger(t)
	if vc.lostReq != 0 {
		t.Fatalf("%d requests went unanswered across planned switchovers", vc.lostReq)
	}
	c.a.stopAndVerifyDisk(c.a.replicaDisk(), true)
}

// TestCLIErrors: what a user gets wrong is refused with a message saying
// what was wrong, and a non-zero exit code.
func TestCLIErrors(t *testing.T) {
	c := newCluster(t, 3*time.Minute)
	refused := func(r cliResult, words ...string) {
		t.Helper()
		if r.code == 0 {
			t.Fatalf("succeeded, want an error: %v", r)
		}
		for _, w := range words {
			if !strings.Contains(r.stderr, w) {
				t.Fatalf("error lacks %q: %v", w, r)
			}
		}
		t.Logf("ftctl %s → exit %d: %s", strings.Join(r.args, " "), r.code, strings.TrimSpace(r.stderr))
	}
	// Wrong VM names.
	refused(c.a.cli("status", "nope"), "no such VM", "nope", "ftctl status")
	refused(c.a.cli("pair", "nope", c.b.listen), "no such VM", "nope")
	refused(c.a.cli("failover", "nope"), "no such VM", "nope")
	refused(c.a.cli("stop", "nope"), "no such VM", "nope")
	// No agent there.
	refused(c.cli("status", "--socket", filepath.Join(c.root, "missing.sock")), "no ftctl agent answers", "missing.sock")
	// Usage.
	refused(c.a.cli("pair", vmName), "usage: ftctl pair VM HOST[:PORT]")
	refused(c.a.cli("start", "--spec", filepath.Join(c.root, "missing.json")), "missing.json")

	c.startVM(c.a)
	// Unreachable hosts: nothing listens on the port; no host has the address.
	refused(c.a.cli("pair", vmName, c.bed.B.ReplAddr.String()+":7999"), "connect to", "7999", "ftctl agent --listen")
	nobody := c.bed.ReplNet.Addr().Next().Next().Next().Next().Next().Next().Next().Next().Next() // .9: no host
	refused(c.a.cli("pair", vmName, nobody.String()), "connect to", nobody.String()+":"+peerPort)

	// Bad credentials: an agent on B whose certificate comes from another CA.
	other := filepath.Join(c.root, "pki-other")
	c.mustCLI("cert", "init", "--dir", other)
	c.mustCLI("cert", "issue", "--dir", other, "host-b", "--host", c.bed.B.ReplAddr.String())
	rogue := c.newAgentIn("host-b-other", "host-b", c.bed.B)
	rogue.pki, rogue.listen = other, c.bed.B.ReplAddr.String()+":7481"
	rogue.sock = filepath.Join(rogue.dir, "agent.sock")
	rogue.mgmt = "" // B's agent answers heartbeats on its management address
	c.more = append(c.more, rogue)
	rogue.start()
	refused(c.a.cli("pair", vmName, rogue.listen), "connect to", "certificate")
	if s, err := c.a.status(vmName); err != nil || s.State != agent.StateUnprotected || s.RunState != "running" {
		t.Fatalf("after the refused pairings the VM is %+v, %v; want running unprotected", s, err)
	}
	if out := readTail(rogue.log, 4000); !strings.Contains(out, "peer refused") {
		t.Errorf("the agent with the other CA did not log refusing the peer:\n%s", out)
	}
	// Nothing else failed on the way in: the VM can still be paired.
	c.pair(c.a, c.b, false)
	refused(c.a.cli("pair", vmName, c.b.listen), "protected", "unpair it first")
	refused(c.b.cli("pair", vmName, c.a.listen), "replica here", "primary's host")
	refused(c.b.cli("failover", vmName), "replica here", "primary's host")
	refused(c.a.cli("unpair", "nope"), "no such VM")
	if s, err := c.a.status(vmName); err != nil || s.State != agent.StateProtected {
		t.Fatalf("after the refused commands the VM is %+v, %v; want protected", s, err)
	}
}
