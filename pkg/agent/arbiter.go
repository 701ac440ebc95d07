package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/ftctl/ftctl/pkg/failover"
)

// ProbeArbiter is the seed's client-oriented failure detector: before a
// secondary promotes, it asks the VM's LAN whether the VM still answers
// (ARP on the LAN interface, ICMP, TCP to its service ports). An answer
// means the primary runs and only the replication link broke: no
// promotion. Silence means the primary is dead when SilenceMeansDead is
// set; otherwise the Witness (if any) decides, and without one the answer
// is the safe one: do not promote.
type ProbeArbiter struct {
	// Interface on the VM's LAN for ARP probes (the bridge the VM taps
	// join); empty skips ARP.
	Interface string
	// SilenceMeansDead: a probe that ran and heard nothing decides Promote.
	SilenceMeansDead bool
	// Witness, if set, decides when the probe cannot (a lease holder).
	Witness failover.Arbiter
	// Timeout of the probe (default failover.DefaultProbeTimeout).
	Timeout time.Duration
	// WitnessWait is how long the witness is asked again while it says
	// the primary holds the lease (or cannot be reached): a primary that
	// died keeps its lease for up to a lease TTL after its last renewal.
	// Default DefaultWitnessWait.
	WitnessWait time.Duration
}

// SilenceWindow is how long the probe listens for a VM probed at probe
// when silence alone decides a promotion; 0 when it never does (no
// address to probe, or silence defers to the witness).
func (p ProbeArbiter) SilenceWindow(probe ProbeSpec) time.Duration {
	if !p.SilenceMeansDead || len(probe.Addrs) == 0 {
		return 0
	}
	if p.Timeout > 0 {
		return p.Timeout
	}
	return failover.DefaultProbeTimeout
}

// silenceWindower is an Arbiter that may promote on the VM's silence on
// its LAN, heard for a window after the link was declared dead.
type silenceWindower interface {
	SilenceWindow(ProbeSpec) time.Duration
}

// silenceWindow is this agent's probe window for a VM (see
// message.ProbeWindow).
func (a *Agent) silenceWindow(probe ProbeSpec) time.Duration {
	if w, ok := a.cfg.Arbiter.(silenceWindower); ok {
		return w.SilenceWindow(probe)
	}
	return 0
}

// DefaultWitnessWait is ProbeArbiter.WitnessWait's default: three lease
// TTLs, so a dead primary's lease has surely lapsed within it.
const DefaultWitnessWait = 3 * failover.DefaultLeaseTTL

// witnessRetryEvery is the pause between two questions to the witness.
const witnessRetryEvery = 250 * time.Millisecond

// waitingArbiter asks its arbiter again, until it says Promote or wait
// passes: "held by the primary" is final only once the primary had time to
// lose its lease.
type waitingArbiter struct {
	a    failover.Arbiter
	wait time.Duration
	// asked counts the questions, for the reason shown to users.
	asked int
}

func (w *waitingArbiter) Decide(ctx context.Context, ev failover.Evidence) (failover.Decision, error) {
	deadline := time.Now().Add(w.wait)
	for {
		d, err := w.a.Decide(ctx, ev)
		w.asked++
		if d == failover.Promote || errors.Is(err, failover.ErrUnsafe) || !time.Now().Add(witnessRetryEvery).Before(deadline) {
			return d, err
		}
		select {
		case <-ctx.Done():
			return d, err
		case <-time.After(witnessRetryEvery):
		}
	}
}

func (p ProbeArbiter) witness() *waitingArbiter {
	if p.Witness == nil {
		return nil
	}
	wait := p.WitnessWait
	if wait <= 0 {
		wait = DefaultWitnessWait
	}
	return &waitingArbiter{a: p.Witness, wait: wait}
}

// MayPromote implements Arbiter.
func (p ProbeArbiter) MayPromote(ctx context.Context, q ArbiterQuery) (bool, string, error) {
	if q.PrimaryVMDead != "" {
		if p.Witness == nil {
			return true, "the primary's agent reports its VM dead", nil
		}
		w := p.witness()
		d, err := w.Decide(ctx, failover.Evidence{VM: q.VM})
		note := fmt.Sprintf("the primary's agent reports its VM dead; witness: %v (asked %d times)", d, w.asked)
		if err != nil {
			note += fmt.Sprintf(" (%v)", err)
		}
		return d == failover.Promote, note, nil
	}
	var probes failover.MultiProbe
	for _, s := range q.Probe.Addrs {
		addr, err := netip.ParseAddr(s)
		if err != nil {
			return false, "", fmt.Errorf("%w: probe address %q: %v", ErrBadRequest, s, err)
		}
		icmp, err := failover.NewICMPProbe(failover.ICMPProbeConfig{Addr: addr, Timeout: p.Timeout})
		if err != nil {
			return false, "", err
		}
		probes = append(probes, icmp)
		if len(q.Probe.TCPPorts) > 0 {
			var ports []uint16
			for _, port := range q.Probe.TCPPorts {
				ports = append(ports, uint16(port))
			}
			tcp, err := failover.NewTCPProbe(failover.TCPProbeConfig{Addr: addr, Ports: ports, Timeout: p.Timeout})
			if err != nil {
				return false, "", err
			}
			probes = append(probes, tcp)
		}
		if p.Interface != "" {
			arp, err := failover.NewARPProbe(failover.ARPProbeConfig{Addr: addr, Interface: p.Interface, Timeout: p.Timeout})
			if err != nil {
				return false, "", err
			}
			probes = append(probes, arp)
		}
	}
	w := p.witness()
	var chain failover.Chain
	var seen probeRecorder
	var notes []string
	chain.Report = func(i int, d failover.Decision, err error) {
		n := fmt.Sprintf("arbiter %d: %v", i, d)
		if i == 0 && seen.ran {
			// The probe's own words: a user must see why the VM was
			// judged alive or dead.
			if seen.res.Alive {
				n += fmt.Sprintf(" (the VM answers on the LAN: %s %s)", seen.res.By, seen.res.Detail)
			} else {
				n += fmt.Sprintf(" (the VM is silent on the LAN: %s)", seen.res.Detail)
			}
		}
		if w != nil && chain.Arbiters[i] == failover.Arbiter(w) {
			n += fmt.Sprintf(" (the witness, asked %d times", w.asked)
			if d == failover.DoNotPromote {
				n += ": the primary holds the VM's lease"
			}
			n += ")"
		}
		if err != nil {
			n += fmt.Sprintf(" (%v)", err)
		}
		notes = append(notes, n)
	}
	if len(probes) > 0 {
		seen.p = probes
		chain.Arbiters = append(chain.Arbiters, failover.ProbeArbiter{Probe: &seen, SilenceMeansDead: p.SilenceMeansDead})
	} else {
		notes = append(notes, "no probe address configured for the VM")
	}
	if w != nil {
		chain.Arbiters = append(chain.Arbiters, w)
	}
	d, err := chain.Decide(ctx, failover.Evidence{VM: q.VM})
	return d == failover.Promote, strings.Join(notes, "; "), err
}

// probeRecorder keeps the result of the probe it wraps, for the reason a
// secondary shows.
type probeRecorder struct {
	p   failover.Probe
	ran bool
	res failover.Result
}

func (r *probeRecorder) Probe(ctx context.Context) (failover.Result, error) {
	res, err := r.p.Probe(ctx)
	r.ran, r.res = err == nil, res
	return res, err
}
