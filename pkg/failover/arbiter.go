package failover

import (
	"context"
	"errors"
	"fmt"
)

// Decision is an arbiter's answer to "may this secondary promote?".
type Decision uint8

const (
	// Unknown: this arbiter cannot tell; ask the next one.
	Unknown Decision = iota
	// Promote: the primary is gone (or has been fenced); start the standby.
	Promote
	// DoNotPromote: the primary is alive (only a link broke) or holds the
	// lease; the secondary must stay a secondary.
	DoNotPromote
)

func (d Decision) String() string {
	switch d {
	case Unknown:
		return "unknown"
	case Promote:
		return "promote"
	case DoNotPromote:
		return "do-not-promote"
	}
	return fmt.Sprintf("decision(%d)", uint8(d))
}

// Evidence is what the secondary knows when it asks for a decision.
type Evidence struct {
	// VM is the protected VM's name (the witness lease key).
	VM string
	// Detector is the detector's judgement that started arbitration,
	// normally a Lost event.
	Detector Event
	// LocalRunning is true once the local copy of the VM runs (promoted).
	// LAN probes are then meaningless: they would see the local VM.
	LocalRunning bool
}

// Arbiter decides whether a secondary may promote. An error means the
// arbiter could not decide (the Decision is then Unknown).
type Arbiter interface {
	Decide(ctx context.Context, ev Evidence) (Decision, error)
}

// ArbiterFunc adapts a function to Arbiter.
type ArbiterFunc func(ctx context.Context, ev Evidence) (Decision, error)

// Decide calls f.
func (f ArbiterFunc) Decide(ctx context.Context, ev Evidence) (Decision, error) { return f(ctx, ev) }

// ProbeArbiter asks the VM's LAN. On the secondary, before promotion, the
// standby QEMU is paused (-incoming) and its NIC is attached to this agent,
// not to the LAN, so the only thing that can answer for the VM's address
// (and MAC) is the primary's VM: an answer proves the primary runs and only
// the link between the hosts broke. It must never run after promotion (the
// promoted VM would answer itself), which Evidence.LocalRunning enforces.
type ProbeArbiter struct {
	Probe Probe
	// SilenceMeansDead makes a probe that ran and got no answer decide
	// Promote. Off by default: silence can also mean this host lost its
	// LAN port, and then a witness should decide.
	SilenceMeansDead bool
}

// Decide: an answer is DoNotPromote; silence is Unknown (or Promote with
// SilenceMeansDead); a probe that could not run is Unknown with its error.
func (a ProbeArbiter) Decide(ctx context.Context, ev Evidence) (Decision, error) {
	if a.Probe == nil {
		return Unknown, fmt.Errorf("%w: ProbeArbiter has no probe", ErrConfig)
	}
	if ev.LocalRunning {
		return Unknown, fmt.Errorf("%w: probing the LAN while the local copy of %q runs would see it", ErrUnsafe, ev.VM)
	}
	r, err := a.Probe.Probe(ctx)
	switch {
	case err != nil:
		return Unknown, err
	case r.Alive:
		return DoNotPromote, nil
	case a.SilenceMeansDead:
		return Promote, nil
	}
	return Unknown, nil
}

// Chain asks its arbiters in order and returns the first Promote or
// DoNotPromote. When none decides, it returns Fallback, where Unknown (the
// zero value) means DoNotPromote: losing availability is recoverable, two
// running copies of the VM are not. Setting Fallback to Promote trades
// that safety for availability and is the caller's explicit choice.
type Chain struct {
	Arbiters []Arbiter
	Fallback Decision
	// Report, if set, is told each arbiter's answer (for logs and status).
	Report func(i int, d Decision, err error)
}

// Decide runs the chain. The error is non-nil only when ctx ended (the
// decision is then the fallback); arbiters' errors go to Report.
func (c Chain) Decide(ctx context.Context, ev Evidence) (Decision, error) {
	fallback := c.Fallback
	if fallback == Unknown {
		fallback = DoNotPromote
	}
	if fallback != Promote && fallback != DoNotPromote {
		return DoNotPromote, fmt.Errorf("%w: chain fallback %v", ErrConfig, c.Fallback)
	}
	for i, a := range c.Arbiters {
		if err := ctx.Err(); err != nil {
			return fallback, err
		}
		d, err := a.Decide(ctx, ev)
		if err != nil {
			d = Unknown
		}
		if c.Report != nil {
			c.Report(i, d, err)
		}
		if d == Promote || d == DoNotPromote {
			return d, nil
		}
		if errors.Is(err, ErrUnsafe) {
			// A later arbiter cannot make an unsafe question safe.
			return DoNotPromote, err
		}
	}
	return fallback, ctx.Err()
}
