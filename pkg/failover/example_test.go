package failover_test

import (
	"context"
	"log"
	"net/netip"
	"time"

	"github.com/ftctl/ftctl/pkg/failover"
)

// The secondary's side: a detector fed by the replication link and the
// management heartbeat, and, when it loses the primary, a chain of a LAN
// probe and a witness. (Compiled, not run: it needs a primary, a witness
// and a LAN.)
func Example_secondary() {
	ctx := context.Background()
	key := []byte("pair key, 16 bytes or more")
	det, err := failover.NewDetector(failover.Config{}) // PathRepl and PathMgmt, measured defaults
	if err != nil {
		log.Fatal(err)
	}
	hb, err := failover.DialHeartbeat(ctx, "", "192.0.2.1:7401", failover.HeartbeatClientConfig{
		Key: key, Heard: func(time.Duration) { det.Heard(ctx, failover.PathMgmt) },
	})
	if err != nil {
		log.Fatal(err)
	}
	go hb.Run(ctx)
	go det.Run(ctx)
	// The lockstep receiver calls det.Heard(ctx, failover.PathRepl) per frame.

	vmIP := netip.MustParseAddr("192.0.2.50")
	arp, _ := failover.NewARPProbe(failover.ARPProbeConfig{Addr: vmIP, Interface: "br-vm"})
	tcp, _ := failover.NewTCPProbe(failover.TCPProbeConfig{Addr: vmIP, Ports: []uint16{22, 443}})
	witness, _ := failover.NewWitnessClient(failover.WitnessClientConfig{Addr: "192.0.2.9:7402", Key: key, Node: "host-b"})
	chain := failover.Chain{Arbiters: []failover.Arbiter{
		failover.ProbeArbiter{Probe: failover.MultiProbe{arp, tcp}},
		failover.WitnessArbiter{Lease: witness},
	}} // no decision: DoNotPromote

	for ev := range det.Events() {
		if ev.State != failover.Lost {
			continue
		}
		d, _ := chain.Decide(ctx, failover.Evidence{VM: "vm-a", Detector: ev})
		if d == failover.Promote {
			// Promote the standby, then run a PrimaryGuard with witness.
			return
		}
	}
}

// The primary's side: keep the witness lease, fence the VM when it is lost.
func Example_primary() {
	ctx := context.Background()
	witness, err := failover.NewWitnessClient(failover.WitnessClientConfig{
		Addr: "192.0.2.9:7402", Key: []byte("pair key, 16 bytes or more"), Node: "host-a"})
	if err != nil {
		log.Fatal(err)
	}
	guard, err := failover.NewPrimaryGuard(failover.GuardConfig{
		VM: "vm-a", Lease: witness,
		Fence: failover.FenceFunc(func(ctx context.Context, reason string) error {
			log.Printf("fencing vm-a: %s", reason)
			return nil // QMP stop, and stop releasing held output
		}),
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := guard.Run(ctx); err != nil {
		log.Print(err)
	}
}
