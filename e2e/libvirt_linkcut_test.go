package e2e

import (
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
)

// TestLibvirtReplicationLinkCut: TestReplicationLinkCut's LAN-probe
// variant for a libvirt domain. The domain is prepared with the VM's LAN
// address and service port as its failure probe (`ftctl libvirt prepare
// --probe-addr --probe-tcp`), the agents have no management path, and only
// the replication link between A and B breaks. The probe recorded in the
// domain's metadata reaches B's arbiter through the hook's pairing; it
// finds the VM answering on the LAN, so B does not promote: B's libvirt
// never runs the domain (no resumed event, its standby stays paused) while
// A goes on degraded and serves the client. With the link back, A pairs
// again by itself and the domain is protected again.
func TestLibvirtReplicationLinkCut(t *testing.T) {
	lb := newLibvirtBed(t, libvirtOptions{
		setup: func(c *cluster) {
			// No second path: the LAN probe alone decides. A short
			// re-pairing backoff keeps the wait after the link
			// returns short.
			c.a.mgmt, c.b.mgmt = "", ""
			c.a.extra = append(c.a.extra, "--repair-max", "4s")
		},
		probe: true,
	})
	c, ca, cb, vc := lb.c, lb.ca, lb.cb, lb.vc
	ctx := c.ctx
	vmIP := lb.addr.Addr().String()

	// prepare recorded the probe on A, and B's standby definition, which
	// A's agent derived from it, keeps it.
	for _, h := range []struct {
		name string
		conn *libvirt.Conn
	}{{"A", ca}, {"B", cb}} {
		x, err := h.conn.XML(ctx, vmName, false)
		if err != nil {
			t.Fatal(err)
		}
		d, err := domxml.ParseDomain([]byte(x))
		if err != nil {
			t.Fatal(err)
		}
		var prot *domxml.Protection
		if d.Metadata != nil {
			prot = d.Metadata.Protection
		}
		addrs, ports := prot.ProbeSpec()
		if len(addrs) != 1 || addrs[0] != vmIP || len(ports) != 1 || ports[0] != vmServicePort {
			t.Fatalf("the probe in %s's definition of %s: addrs %q, TCP ports %v; want [%s] [%d]", h.name, vmName, addrs, ports, vmIP, vmServicePort)
		}
	}

	// Every lifecycle event of the domain on B's libvirt from here on: a
	// resumed (or, while the link is cut, started) event would be a
	// second running copy, however briefly.
	evCtx, stopEvents := context.WithCancel(ctx)
	defer stopEvents()
	events, err := cb.Lifecycle(evCtx, vmName)
	if err != nil {
		t.Fatal(err)
	}
	var evMu sync.Mutex
	var seen []libvirt.LifecycleEvent
	evDone := make(chan struct{})
	go func() {
		defer close(evDone)
		for ev := range events {
			evMu.Lock()
			seen = append(seen, ev)
			evMu.Unlock()
		}
	}()
	eventsSince := func(n int) []libvirt.LifecycleEvent {
		evMu.Lock()
		defer evMu.Unlock()
		return append([]libvirt.LifecycleEvent(nil), seen[n:]...)
	}

	if err := vc.connectLong(ctx); err != nil {
		t.Fatalf("connect to the VM's service: %v", err)
	}
	for range 3 {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection while protected: %v", err)
		}
	}
	s0, err := c.b.status(vmName)
	if err != nil || s0.State != agent.StateStandby {
		t.Fatalf("B before the cut: %+v %v", s0, err)
	}

	// B's decision: the link died, the probe from the domain's metadata
	// found the VM answering at its address, no promotion.
	sa, sb := cutLink(t, c)
	if strings.Contains(sb.Reason, "no probe address configured") {
		t.Fatalf("B's arbiter had no probe: the domain's recorded probe did not reach it: %q", sb.Reason)
	}
	if !strings.Contains(sb.Reason, "the VM answers on the LAN") {
		t.Errorf("B's reason does not say its probe found the VM alive: %q", sb.Reason)
	}
	if !strings.Contains(sb.Reason, " "+vmIP) {
		t.Errorf("B's reason does not name the VM's address %s (the recorded probe): %q", vmIP, sb.Reason)
	}
	if strings.Contains(sb.Reason, "management path") {
		t.Errorf("B speaks of a management path the agents do not have: %q", sb.Reason)
	}
	if strings.Contains(sb.Reason, "<nil>") {
		t.Errorf("B's reason shows a Go nil: %q", sb.Reason)
	}

	// Exactly one copy runs: A's, which serves the client; B's standby
	// stays paused in its libvirt, waiting for a migration, and has
	// printed nothing.
	for range 3 {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection after the cut: %v", err)
		}
		if _, err := vc.short(ctx, 30*time.Second); err != nil {
			t.Fatalf("new connection after the cut: %v", err)
		}
	}
	mark := counterlog.Last(readFile(lb.serialA))
	waitFile(t, ctx, lb.serialA, func(b []byte) bool { return counterlog.Last(b) >= mark+3 })
	if sa, err = c.a.status(vmName); err != nil || sa.RunState != "running" || sa.State != agent.StateDegraded {
		t.Fatalf("A while the link is cut: %+v, %v", sa, err)
	}
	if sb, err = c.b.status(vmName); err != nil || sb.State != agent.StateStandby || sb.RunState == "running" {
		t.Fatalf("B while the link is cut: %+v, %v", sb, err)
	}
	if st, err := cb.State(ctx, vmName); err != nil || st.Code != libvirt.StatePaused {
		t.Fatalf("B's libvirt shows %s as %v (%v), want paused", vmName, st, err)
	}
	if st, err := ca.State(ctx, vmName); err != nil || st.Code != libvirt.StateRunning {
		t.Fatalf("A's libvirt shows %s as %v (%v), want running", vmName, st, err)
	}
	if n := len(counterlog.Values(readFile(lb.serialB))); n != 0 {
		t.Fatalf("B's standby printed %d counter lines: it ran", n)
	}
	// A tries to pair again by itself, and fails while the link is cut.
	waitCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	for sa.Repair == nil || sa.Repair.Attempts == 0 || sa.Repair.LastError == "" {
		select {
		case <-waitCtx.Done():
			cancel()
			t.Fatalf("A shows no failed re-pairing attempt with the link cut: %+v", sa)
		case <-time.After(200 * time.Millisecond):
		}
		if sa, err = c.a.status(vmName); err != nil {
			cancel()
			t.Fatal(err)
		}
	}
	cancel()
	t.Logf("A re-pairs by itself: %d attempts so far, last error: %s", sa.Repair.Attempts, sa.Repair.LastError)
	for _, ev := range eventsSince(0) {
		if ev.Type == libvirt.EventResumed || ev.Type == libvirt.EventStarted {
			t.Fatalf("B's libvirt reported %v while the link was cut: a second copy", ev)
		}
	}

	// The link returns: no pair command, A's agent re-pairs by itself.
	backT := time.Now()
	if err := c.bed.RestoreReplication(); err != nil {
		t.Fatal(err)
	}
	nCut := len(eventsSince(0))
	sa = c.a.waitState(vmName, agent.StateProtected, time.Minute, agent.StateStopped)
	sb = c.b.waitState(vmName, agent.StateStandby, 30*time.Second)
	t.Logf("protected again %v after the link returned, without a pair command: %s", time.Since(backT).Round(time.Millisecond), sa.Reason)
	if sa.Peer != c.b.listen || sa.RunState != "running" {
		t.Fatalf("A after re-pairing: %+v", sa)
	}
	if st, err := cb.State(ctx, vmName); err != nil || st.Code != libvirt.StatePaused {
		t.Fatalf("B's new standby in its libvirt: %v %v, want paused", st, err)
	}
	// Checkpoints commit on B again.
	for {
		s, err := c.b.status(vmName)
		if err == nil && s.State == agent.StateStandby && s.Epoch > sb.Epoch+3 {
			t.Logf("B commits again: epochs %d..%d", sb.Epoch, s.Epoch)
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("B does not commit after re-pairing: %+v, %v (was epoch %d)", s, err, sb.Epoch)
		case <-time.After(100 * time.Millisecond):
		}
	}
	for range 3 {
		if _, err := vc.onLong(30 * time.Second); err != nil {
			t.Fatalf("long-lived connection after re-pairing: %v", err)
		}
		if _, err := vc.short(ctx, 30*time.Second); err != nil {
			t.Fatalf("new connection after re-pairing: %v", err)
		}
	}
	vc.checkLedger(t)
	if n := len(counterlog.Values(readFile(lb.serialB))); n != 0 {
		t.Fatalf("B's standby printed %d counter lines after re-pairing: it ran", n)
	}
	if _, err := counterlog.Check(counterlog.Values(readFile(lb.serialA))); err != nil {
		t.Fatalf("A's counter: %v", err)
	}
	stopEvents()
	<-evDone
	all := eventsSince(0)
	for _, ev := range all {
		if ev.Type == libvirt.EventResumed {
			t.Fatalf("B's libvirt resumed %s: %v (events %v)", vmName, ev, all)
		}
	}
	t.Logf("B's libvirt events: during the cut %v; re-pairing %v", all[:nCut], all[nCut:])
}

// readFile is the file's content, nil if it cannot be read (yet).
func readFile(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}
