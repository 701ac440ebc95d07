package failover

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Result is what a probe found.
type Result struct {
	// Alive: something answered as the VM would.
	Alive bool
	// By names the probe (and for MultiProbe, the one that answered).
	By string
	// Detail says what was seen: the answer, or what happened instead.
	Detail string
	// RTT is the time from the first request to the answer, when Alive.
	RTT time.Duration
}

// Probe checks whether the protected VM answers on its LAN as a client
// would see it. A nil error with Alive false means the probe ran and no
// answer came within its timeout (evidence of absence); an error (wrapping
// ErrProbe) means it could not run and says nothing either way.
type Probe interface {
	Probe(ctx context.Context) (Result, error)
}

// Default probe timings: requests are resent every DefaultProbeInterval
// and the VM is declared silent after DefaultProbeTimeout. A heartbeat
// Timeout has already passed when a probe runs, so this only needs to ride
// over one lost request and a busy guest.
const (
	DefaultProbeTimeout  = 500 * time.Millisecond
	DefaultProbeInterval = 100 * time.Millisecond
)

func probeTimings(timeout, interval time.Duration, what string) (time.Duration, time.Duration, error) {
	if timeout < 0 || interval < 0 {
		return 0, 0, fmt.Errorf("%w: %s probe has a negative timeout or interval", ErrConfig, what)
	}
	if timeout == 0 {
		timeout = DefaultProbeTimeout
	}
	if interval == 0 {
		interval = DefaultProbeInterval
	}
	return timeout, min(interval, timeout), nil
}

// probeOutcome maps the end of a probe's own deadline to "silent" and the
// end of the caller's ctx to an error: only a probe that ran its full
// course is evidence.
func probeOutcome(parent context.Context, by string) (Result, error) {
	if err := parent.Err(); err != nil {
		return Result{By: by}, fmt.Errorf("%w: %s interrupted: %w", ErrProbe, by, err)
	}
	return Result{By: by, Detail: "no answer before the timeout"}, nil
}

// MultiProbe runs several probes at once. Any answer means alive (the
// others are cancelled). If none answers, the result is silent only if
// every probe ran; if any could not run, MultiProbe returns its error, so
// an arbiter never promotes on the strength of a probe that never looked.
type MultiProbe []Probe

// Probe runs all probes concurrently.
func (m MultiProbe) Probe(ctx context.Context) (Result, error) {
	if len(m) == 0 {
		return Result{By: "multi"}, fmt.Errorf("%w: MultiProbe has no probes", ErrConfig)
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type out struct {
		r   Result
		err error
	}
	ch := make(chan out, len(m))
	for _, p := range m {
		go func() {
			r, err := p.Probe(cctx)
			ch <- out{r, err}
		}()
	}
	var errs []error
	var silent []string
	var alive *Result
	for range m {
		o := <-ch
		switch {
		case alive != nil:
			// Draining the cancelled ones.
		case o.err == nil && o.r.Alive:
			alive = &o.r
			cancel()
		case o.err != nil:
			errs = append(errs, o.err)
		default:
			silent = append(silent, o.r.By)
		}
	}
	if alive != nil {
		return *alive, nil
	}
	if len(errs) > 0 {
		return Result{By: "multi"}, fmt.Errorf("%w: no answer, and %d of %d probes could not run: %w",
			ErrProbe, len(errs), len(m), errors.Join(errs...))
	}
	return Result{By: "multi", Detail: "no answer from " + strings.Join(silent, ", ")}, nil
}
