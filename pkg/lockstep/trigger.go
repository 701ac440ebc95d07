package lockstep

import (
	"context"
	"fmt"
	"time"
)

// Mode selects what starts a checkpoint.
type Mode string

// Trigger modes.
const (
	// ModeIO is Kemari-style: a checkpoint starts when the guest emits an
	// outbound packet (its output must wait for the next commit anyway),
	// no sooner than MinInterval after the previous one (to coalesce a
	// burst) and no later than MaxInterval (to bound the work and the
	// replica's lag when the guest is silent).
	ModeIO Mode = "io"
	// ModePeriodic is Remus-style: a checkpoint every Period, whatever the
	// guest does. Kept for comparison.
	ModePeriodic Mode = "periodic"
)

// Policy configures the trigger; zero values take the defaults.
type Policy struct {
	Mode        Mode          `json:"mode,omitempty"`
	MinInterval time.Duration `json:"min_interval,omitempty"` // ModeIO, default 5ms
	MaxInterval time.Duration `json:"max_interval,omitempty"` // ModeIO, default 200ms
	Period      time.Duration `json:"period,omitempty"`       // ModePeriodic, default 50ms
}

// Defaults for Policy.
const (
	DefaultMinInterval = 5 * time.Millisecond
	DefaultMaxInterval = 200 * time.Millisecond
	DefaultPeriod      = 50 * time.Millisecond
)

// WithDefaults fills in zero fields.
func (p Policy) WithDefaults() Policy {
	if p.Mode == "" {
		p.Mode = ModeIO
	}
	if p.MinInterval == 0 {
		p.MinInterval = DefaultMinInterval
	}
	if p.MaxInterval == 0 {
		p.MaxInterval = DefaultMaxInterval
	}
	if p.Period == 0 {
		p.Period = DefaultPeriod
	}
	return p
}

// Validate checks a defaulted policy.
func (p Policy) Validate() error {
	switch p.Mode {
	case ModeIO:
		if p.MinInterval < 0 || p.MaxInterval <= 0 || p.MinInterval > p.MaxInterval {
			return fmt.Errorf("%w: trigger: need 0 <= min_interval (%v) <= max_interval (%v)", ErrConfig, p.MinInterval, p.MaxInterval)
		}
	case ModePeriodic:
		if p.Period <= 0 {
			return fmt.Errorf("%w: trigger: period must be > 0 (got %v)", ErrConfig, p.Period)
		}
	default:
		return fmt.Errorf("%w: trigger: unknown mode %q (want io or periodic)", ErrConfig, p.Mode)
	}
	return nil
}

// Reason says why a checkpoint started.
type Reason string

// Trigger reasons.
const (
	ReasonOutput   Reason = "output"   // the guest emitted a packet
	ReasonInterval Reason = "interval" // MaxInterval passed without output
	ReasonPeriod   Reason = "period"   // ModePeriodic
	ReasonRequest  Reason = "request"  // an explicit request (switchover, test)
)

// Clock abstracts time for tests of the policy logic.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Trigger decides when the next checkpoint starts.
type Trigger struct {
	p     Policy
	clock Clock
}

// NewTrigger returns a trigger for a policy (defaults applied, validated).
func NewTrigger(p Policy, c Clock) (*Trigger, error) {
	p = p.WithDefaults()
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if c == nil {
		c = realClock{}
	}
	return &Trigger{p: p, clock: c}, nil
}

// Policy is the trigger's defaulted policy.
func (t *Trigger) Policy() Policy { return t.p }

// Wait blocks until the next checkpoint is due, given the start of the
// previous one. outbound signals guest output (coalesced, non-blocking
// sends); request forces a checkpoint now.
func (t *Trigger) Wait(ctx context.Context, last time.Time, outbound, request <-chan struct{}) (Reason, error) {
	if t.p.Mode == ModePeriodic {
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-request:
			return ReasonRequest, nil
		case <-t.clock.After(t.p.Period - t.clock.Now().Sub(last)):
			return ReasonPeriod, nil
		}
	}
	maxTimer := t.clock.After(t.p.MaxInterval - t.clock.Now().Sub(last))
	select {
	case <-ctx.Done():
		return "", ctx.Err()
	case <-request:
		return ReasonRequest, nil
	case <-maxTimer:
		return ReasonInterval, nil
	case <-outbound:
	}
	// Output is waiting: checkpoint as soon as MinInterval allows, so a
	// burst of packets shares one checkpoint.
	if wait := t.p.MinInterval - t.clock.Now().Sub(last); wait > 0 {
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-request:
			return ReasonRequest, nil
		case <-t.clock.After(wait):
		}
	}
	return ReasonOutput, nil
}
