package e2e

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/testbed"
)

// witnessPort is where the witness serves, on the third host's
// management address.
const witnessPort = "7482"

// startWitness runs `ftctl witness` on the bed's third host and points
// both agents at it. The agents run without the management heartbeat path
// here, so that the witness, not the second path, is what decides.
func startWitness(c *cluster) string {
	t := c.t
	t.Helper()
	w := c.bed.Hosts[2]
	addr := w.MgmtAddr.String() + ":" + witnessPort
	key := filepath.Join(c.root, "witness.key")
	c.mustCLI("cert", "psk", key)
	logPath := filepath.Join(c.root, "witness.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := w.Command(context.Background(), c.bin, "witness", "--listen", addr, "--key-file", key)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start witness: %v", err)
	}
	logf.Close()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-exited
		if t.Failed() {
			t.Logf("---- witness log ----\n%s", readTail(logPath, 4000))
		}
	})
	for {
		ctx, cancel := context.WithTimeout(c.ctx, time.Second)
		conn, err := c.bed.A.Dial(ctx, "tcp", addr)
		cancel()
		if err == nil {
			conn.Close()
			break
		}
		select {
		case <-exited:
			t.Fatalf("witness exited at start:\n%s", readTail(logPath, 4000))
		case <-c.ctx.Done():
			t.Fatalf("witness never answered on %s: %v", addr, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	for _, p := range []*agentProc{c.a, c.b} {
		p.mgmt = ""
		p.extra = append(p.extra, "--witness", addr, "--witness-key-file", key)
	}
	return addr
}

// TestWitness: the LAN probe cannot decide, the witness does.
//
// First B loses both the replication link and its LAN port: its probe
// hears nothing from the VM, but A runs and keeps renewing the VM's lease
// at the witness over the management network, so B must not promote. Then
// A vanishes from every network: its guard cannot renew the lease and
// fences the VM (kills its QEMU), the lease lapses, B is granted it and
// promotes — after A fenced.
func TestWitness(t *testing.T) {
	c, vc := protectedVMHosts(t, 3, func(c *cluster) { startWitness(c) })

	// 1. B cut from the replication link and the LAN.
	cutT := time.Now()
	for _, n := range []testbed.Net{testbed.NetRepl, testbed.NetLAN} {
		if err := c.bed.Cut(c.bed.B, n); err != nil {
			t.Fatal(err)
		}
	}
	sa := c.a.waitState(vmName, agent.StateDegraded, time.Minute, agent.StateStopped)
	t.Logf("A degraded %v after the cut: %s", sa.Since.Sub(cutT).Round(time.Millisecond), sa.Reason)
	sb := c.b.waitReason(vmName, "not promoting", time.Minute)
	t.Logf("B decided %v after the cut: %s", sb.Since.Sub(cutT).Round(time.Millisecond), sb.Reason)
	if sb.State != agent.StateStandby || sb.RunState != "inmigrate" {
		t.Fatalf("B with A alive: %s, QEMU %q; want standby, inmigrate", sb.State, sb.RunState)
	}
	if !strings.Contains(sb.Reason, "the VM is silent on the LAN") || !strings.Contains(sb.Reason, "the primary holds the VM's lease") {
		t.Fatalf("B's reason should say the probe heard nothing and the witness kept it from promoting: %q", sb.Reason)
	}
	if _, err := vc.onLong(30 * time.Second); err != nil {
		t.Fatalf("A's VM no longer serves the client: %v", err)
	}
	if sa, err := c.a.status(vmName); err != nil || sa.State != agent.StateDegraded || sa.RunState != "running" {
		t.Fatalf("A while B is cut off: %+v, %v", sa, err)
	}
	for _, n := range []testbed.Net{testbed.NetRepl, testbed.NetLAN} {
		if err := c.bed.Restore(c.bed.B, n); err != nil {
			t.Fatal(err)
		}
	}
	c.repair(c.a, c.b)

	// 2. A vanishes.
	st, err := c.a.status(vmName)
	if err != nil {
		t.Fatal(err)
	}
	isoT := time.Now()
	if err := c.bed.IsolateHost(c.bed.A); err != nil {
		t.Fatal(err)
	}
	sa = c.a.waitState(vmName, agent.StateStopped, time.Minute)
	t.Logf("A fenced %v after its isolation: %s", sa.Since.Sub(isoT).Round(time.Millisecond), sa.Reason)
	if !strings.Contains(sa.Reason, "fenced") {
		t.Fatalf("A stopped, but not fenced: %q", sa.Reason)
	}
	if err := syscall.Kill(st.PID, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("A's QEMU %d still exists after the fence (%v)", st.PID, err)
	}
	// Whoever runs the VM fences it and logs it: the agent, or the VM's
	// shim when the agent runs one (--shims).
	fenced, ok := logTime(c.a.log, isoT, "fenced: QEMU killed")
	if !ok {
		fenced, ok = logTime(c.a.shimLog(vmName), isoT, "fenced: QEMU killed")
	}
	if !ok {
		t.Fatalf("neither A's log nor its shim's says when the fence was done:\n%s", readTail(c.a.log, 3000))
	}
	sb = c.b.waitState(vmName, agent.StatePromoted, time.Minute, agent.StateStopped)
	_, promote := promotion(t, sb)
	decided := sb.Since.Add(-promote)
	t.Logf("A's QEMU was dead %v after the isolation; B promoted %v after it (decision %v, %v after A's fence): %s",
		fenced.Sub(isoT).Round(time.Millisecond), sb.Since.Sub(isoT).Round(time.Millisecond), decided.Sub(isoT).Round(time.Millisecond),
		decided.Sub(fenced).Round(time.Millisecond), sb.Reason)
	if !decided.After(fenced) {
		t.Fatalf("B decided to promote at %s, before A's fence was done at %s: two copies could have run", decided, fenced)
	}
	if !strings.Contains(sb.Reason, "promote (the witness") {
		t.Fatalf("B's promotion was not the witness's decision: %q", sb.Reason)
	}
	if _, _, err := vc.shortUntil(c.ctx, time.Minute); err != nil {
		t.Fatalf("the client does not reach the VM on B: %v", err)
	}
}
