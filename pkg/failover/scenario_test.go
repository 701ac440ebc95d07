package failover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/testbed"
)

// pairRig emulates the failover side of two agents on a testbed: host A
// runs the VM (a fake one) and answers heartbeats on the replication
// network (standing in for lockstep frames) and the management network,
// and keeps the witness lease with a PrimaryGuard; host B pings both and
// runs the detector and the arbiter chain. The witness sits in the
// client's namespace, on the LAN.
type pairRig struct {
	bed      *testbed.Bed
	vm       *testbed.FakeVM
	detA     *Detector // A watching B
	detB     *Detector // B watching A
	chain    Chain
	witness  *WitnessServer
	guard    *PrimaryGuard
	guardErr chan error
	fencedAt atomic.Int64
	stopA    context.CancelFunc
}

const rigTTL = 600 * time.Millisecond

func newPairRig(t *testing.T) *pairRig {
	requireRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	bed, err := testbed.New(ctx, testbed.Options{Prefix: "ftfo"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := bed.Close(); err != nil {
			t.Errorf("testbed close: %v", err)
		}
	})
	r := &pairRig{bed: bed, guardErr: make(chan error, 1)}
	if r.vm, err = bed.AddFakeVM(ctx, 0, bed.A); err != nil {
		t.Fatal(err)
	}
	// Witness.
	ln, err := bed.Client.Listen(ctx, "tcp", net.JoinHostPort(bed.Client.LANAddr.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	if r.witness, err = NewWitnessServer(ln, WitnessConfig{Key: testKey, LeaseTTL: rigTTL, Grace: time.Nanosecond}); err != nil {
		t.Fatal(err)
	}
	go r.witness.Serve(ctx)
	wclient := func(h *testbed.Host) *WitnessClient {
		c, err := NewWitnessClient(WitnessClientConfig{Addr: ln.Addr().String(), Key: testKey, Node: "host-" + h.Name, Netns: h.NetNS, Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}

	dcfg := Config{Interval: 20 * time.Millisecond, Timeout: 300 * time.Millisecond}
	r.detA, _ = NewDetector(dcfg)
	r.detB, _ = NewDetector(dcfg)

	// Agent A: two heartbeat servers and the guard, stoppable as a unit.
	actx, stopA := context.WithCancel(ctx)
	r.stopA = stopA
	serve := func(addr netip.Addr, p Path) net.Addr {
		conn, err := bed.A.ListenPacket(ctx, "udp", net.JoinHostPort(addr.String(), "0"))
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewHeartbeatServer(conn, HeartbeatServerConfig{Key: testKey, Heard: func() { r.detA.Heard(ctx, p) }})
		if err != nil {
			t.Fatal(err)
		}
		go s.Serve(actx)
		return s.Addr()
	}
	replSrv, mgmtSrv := serve(bed.A.ReplAddr, PathRepl), serve(bed.A.MgmtAddr, PathMgmt)
	// As the agent does: take the lease with a patient request, then
	// guard it from that grant (the guard's own renewals time out after
	// RenewEvery, too short for a first request on a loaded machine).
	leaseA := wclient(bed.A)
	lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
	held, err := leaseA.Acquire(lctx, "vm0", true)
	lcancel()
	if err != nil || !held.Granted {
		t.Fatalf("A's first lease: %+v, %v", held, err)
	}
	r.guard, err = NewPrimaryGuard(GuardConfig{VM: "vm0", Lease: leaseA, Held: &held,
		Fence: FenceFunc(func(context.Context, string) error {
			r.fencedAt.Store(time.Now().UnixNano())
			return nil
		}),
		RenewEvery: 50 * time.Millisecond, Margin: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	go func() { r.guardErr <- r.guard.Run(actx) }()

	// Agent B: two heartbeat clients feeding its detector.
	ping := func(local netip.Addr, to net.Addr, p Path) {
		conn, err := bed.B.ListenPacket(ctx, "udp", net.JoinHostPort(local.String(), "0"))
		if err != nil {
			t.Fatal(err)
		}
		c, err := NewHeartbeatClient(conn, to, HeartbeatClientConfig{Key: testKey, Interval: dcfg.Interval,
			Heard: func(time.Duration) { r.detB.Heard(ctx, p) }})
		if err != nil {
			t.Fatal(err)
		}
		go c.Run(ctx)
	}
	ping(bed.B.ReplAddr, replSrv, PathRepl)
	ping(bed.B.MgmtAddr, mgmtSrv, PathMgmt)
	go r.detA.Run(ctx)
	go r.detB.Run(ctx)

	// B's arbiters: ARP and ICMP for the VM on B's LAN bridge, then the
	// witness.
	arp, err := NewARPProbe(ARPProbeConfig{Addr: r.vm.Addr.Addr(), MAC: r.vm.MAC, Interface: bed.B.Bridge, Netns: bed.B.NetNS, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	icmp, err := NewICMPProbe(ICMPProbeConfig{Addr: r.vm.Addr.Addr(), Netns: bed.B.NetNS, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	r.chain = Chain{Arbiters: []Arbiter{ProbeArbiter{Probe: MultiProbe{arp, icmp}}, WitnessArbiter{Lease: wclient(bed.B)}}}

	waitFor(t, 10*time.Second, "A holds the lease", func() bool { h, _ := r.witness.Holder("vm0"); return h == "host-a" })
	return r
}

func (r *pairRig) evidence() Evidence { return Evidence{VM: "vm0", Detector: r.detB.State()} }

// TestScenarioReplicationCut: only the replication link fails, then the
// management path too. B suspects, then loses A, but the VM answers on the
// LAN, so B does not promote; A is degraded and keeps its lease.
func TestScenarioReplicationCut(t *testing.T) {
	r := newPairRig(t)
	if err := r.bed.CutReplication(); err != nil {
		t.Fatal(err)
	}
	ev := awaitState(t, r.detB.Events(), Suspect, 10*time.Second)
	if fmt.Sprint(ev.Paths) != fmt.Sprint([]Path{PathRepl}) {
		t.Fatalf("suspect paths %v, want [repl]", ev.Paths)
	}
	// Well past the timeout, still only suspect: mgmt is alive.
	time.Sleep(3 * r.detB.Config().Timeout)
	if st := r.detB.State(); st.State != Suspect {
		t.Fatalf("with mgmt alive B's detector says %v", st)
	}
	if err := r.bed.CutMgmt(); err != nil {
		t.Fatal(err)
	}
	awaitState(t, r.detB.Events(), Lost, 10*time.Second)
	awaitState(t, r.detA.Events(), Lost, 10*time.Second) // A: degraded
	d, err := r.chain.Decide(context.Background(), r.evidence())
	if d != DoNotPromote || err != nil {
		t.Fatalf("link cut only: %v, %v; want do-not-promote", d, err)
	}
	if h, _ := r.witness.Holder("vm0"); h != "host-a" {
		t.Fatalf("lease holder %q after a link cut, want host-a", h)
	}
	if r.guard.Fenced() != "" {
		t.Fatalf("A fenced on a link cut: %s", r.guard.Fenced())
	}
	r.bed.RestoreReplication()
	r.bed.RestoreMgmt()
	awaitState(t, r.detB.Events(), Alive, 10*time.Second)
}

// TestScenarioPrimaryDies: host A drops off every network. B loses it,
// nothing answers for the VM, and B wins the lease, but only after A's
// guard fenced A's VM. After the promotion, probing is refused.
func TestScenarioPrimaryDies(t *testing.T) {
	r := newPairRig(t)
	if err := r.bed.IsolateHost(r.bed.A); err != nil {
		t.Fatal(err)
	}
	lost := awaitState(t, r.detB.Events(), Lost, 10*time.Second)
	t.Logf("B: %v", lost)
	var grantedAt int64
	var early []Decision
	deadline := time.Now().Add(10 * time.Second)
	for grantedAt == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("B never promoted; answers so far %v", early)
		}
		d, err := r.chain.Decide(context.Background(), r.evidence())
		if err != nil {
			t.Fatal(err)
		}
		if d == Promote {
			grantedAt = time.Now().UnixNano()
		} else {
			early = append(early, d)
		}
	}
	if err := <-r.guardErr; !errors.Is(err, ErrFenced) {
		t.Fatalf("A's guard: %v, want ErrFenced", err)
	}
	if f := r.fencedAt.Load(); f == 0 || f >= grantedAt {
		t.Fatalf("A fenced at %d, B granted at %d", f, grantedAt)
	}
	t.Logf("B promoted %v after Lost, %v after A fenced; earlier answers %v",
		time.Duration(grantedAt-lost.At.UnixNano()), time.Duration(grantedAt-r.fencedAt.Load()), early)
	r.stopA()

	// Promotion: the VM now runs on B.
	if err := r.vm.MoveTo(context.Background(), r.bed.B); err != nil {
		t.Fatal(err)
	}
	ev := r.evidence()
	ev.LocalRunning = true
	if d, err := r.chain.Decide(context.Background(), ev); d != DoNotPromote || !errors.Is(err, ErrUnsafe) {
		t.Fatalf("arbitration after promotion: %v, %v; want refusal", d, err)
	}
}
