package failover

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// Fence stops the local VM from emitting output: stop the VM (QMP stop or
// kill QEMU) and cut its network output. The agent implements it. It must
// be quick, and it must not return before the VM can no longer send.
type Fence interface {
	Fence(ctx context.Context, reason string) error
}

// FenceFunc adapts a function to Fence.
type FenceFunc func(ctx context.Context, reason string) error

// Fence calls f.
func (f FenceFunc) Fence(ctx context.Context, reason string) error { return f(ctx, reason) }

// GuardConfig configures a PrimaryGuard.
type GuardConfig struct {
	// VM is the protected VM's name (the lease key).
	VM string
	// Lease is the witness.
	Lease Leaser
	// Fence stops the VM's output when the lease is lost.
	Fence Fence
	// RenewEvery is the renewal period, and the resolution at which the
	// guard checks its lease's validity. Default DefaultRenewEvery.
	RenewEvery time.Duration
	// Margin is taken off each lease's validity to cover the check
	// resolution (RenewEvery), the fence's own duration and the drift
	// between this host's clock rate and the witness's. It must exceed
	// RenewEvery. Default DefaultGuardMargin.
	Margin time.Duration
	// Clock defaults to RealClock.
	Clock Clock
	// Held is a lease the caller was already granted by its own Acquire
	// (to report a refusal before it starts the VM's protection). Run
	// then starts from it instead of taking the lease again, so a first
	// renewal that fails is handled like any later one: the lease runs
	// out and the guard fences, rather than Run ending unfenced while
	// the VM goes on.
	Held *Lease
}

// Lease timing defaults; see the package doc for how they relate.
const (
	DefaultRenewEvery  = 200 * time.Millisecond
	DefaultGuardMargin = 800 * time.Millisecond
)

// PrimaryGuard keeps the active primary's witness lease and fences the
// primary when it cannot: when the witness says another node holds the
// lease, or when the last granted lease runs out (less the margin) without
// a renewal. Lease validity is counted from when the renewal was sent, so
// it always ends before the witness's own expiry (which starts on
// receipt): the primary stops before a secondary can be granted the lease.
//
// Without a witness there is no guard: a primary that only lost its
// replication link keeps running degraded, and the secondary's probe
// arbiter keeps it from promoting.
type PrimaryGuard struct {
	cfg GuardConfig

	mu     sync.Mutex
	valid  time.Time // the lease is ours until then (less the margin)
	fenced string    // reason, once fenced
}

// NewPrimaryGuard checks cfg.
func NewPrimaryGuard(cfg GuardConfig) (*PrimaryGuard, error) {
	if err := checkName("vm", cfg.VM); err != nil {
		return nil, err
	}
	if cfg.Lease == nil || cfg.Fence == nil {
		return nil, fmt.Errorf("%w: primary guard needs a Lease and a Fence", ErrConfig)
	}
	if cfg.RenewEvery < 0 || cfg.Margin < 0 {
		return nil, fmt.Errorf("%w: negative guard duration", ErrConfig)
	}
	if cfg.RenewEvery == 0 {
		cfg.RenewEvery = DefaultRenewEvery
	}
	if cfg.Margin == 0 {
		cfg.Margin = DefaultGuardMargin
	}
	if cfg.Margin <= cfg.RenewEvery {
		return nil, fmt.Errorf("%w: guard Margin %v must exceed RenewEvery %v (the fence may come one check late)",
			ErrConfig, cfg.Margin, cfg.RenewEvery)
	}
	cfg.Clock = clockOr(cfg.Clock)
	return &PrimaryGuard{cfg: cfg}, nil
}

// ValidUntil returns when the guard's lease ends (less the margin), zero
// before the first grant.
func (g *PrimaryGuard) ValidUntil() time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.valid
}

// Fenced returns the reason the guard fenced the VM, or "".
func (g *PrimaryGuard) Fenced() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.fenced
}

type renewResult struct {
	sent  time.Time
	lease Lease
	err   error
}

// Run first takes the lease, or starts from Held: if the witness says
// another node holds it, the guard fences at once; if the witness cannot
// be reached, Run returns that error without fencing, and the agent must
// not start protection (there is no standby to conflict with yet); a
// lease TTL too short for
// Margin plus RenewEvery is an ErrConfig error, also without fencing.
// Then it renews every RenewEvery until ctx is done (returning ctx's
// error) or it fenced (returning an error wrapping ErrFenced). Stopping
// Run stops renewals: the agent must then stop the VM, or Release the
// lease only after stopping it.
func (g *PrimaryGuard) Run(ctx context.Context) error {
	var first renewResult
	if h := g.cfg.Held; h != nil {
		first = renewResult{sent: h.Sent, lease: *h}
	} else {
		first = g.renew(ctx, g.cfg.Clock.Now())
	}
	if first.err != nil {
		return fmt.Errorf("primary guard: initial lease for %q: %w", g.cfg.VM, first.err)
	}
	if l := first.lease; l.Granted && l.TTL <= g.cfg.Margin+g.cfg.RenewEvery {
		// Every grant would expire before it could be renewed.
		return fmt.Errorf("%w: witness lease TTL %v is too short for guard Margin %v plus RenewEvery %v",
			ErrConfig, l.TTL, g.cfg.Margin, g.cfg.RenewEvery)
	}
	if err := g.apply(ctx, first); err != nil {
		return err
	}

	tick, stop := g.cfg.Clock.NewTicker(g.cfg.RenewEvery)
	defer stop()
	results := make(chan renewResult, 1)
	renewing := false
	defer func() {
		if renewing {
			<-results
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case r := <-results:
			renewing = false
			if err := g.apply(ctx, r); err != nil {
				return err
			}
		case <-tick:
			if err := g.check(ctx); err != nil {
				return err
			}
			if !renewing {
				renewing = true
				sent := g.cfg.Clock.Now()
				go func() { results <- g.renew(ctx, sent) }()
			}
		}
	}
}

func (g *PrimaryGuard) renew(ctx context.Context, sent time.Time) renewResult {
	// A renewal slower than the period is as good as lost.
	cctx, cancel := context.WithTimeout(ctx, max(g.cfg.RenewEvery, time.Millisecond))
	defer cancel()
	l, err := g.cfg.Lease.Acquire(cctx, g.cfg.VM, true)
	return renewResult{sent: sent, lease: l, err: err}
}

// apply records one renewal's outcome.
func (g *PrimaryGuard) apply(ctx context.Context, r renewResult) error {
	switch {
	case r.err != nil:
		return g.check(ctx)
	case !r.lease.Granted && r.lease.Holder != "":
		return g.fence(ctx, fmt.Sprintf("witness says %q holds the lease of %q", r.lease.Holder, g.cfg.VM))
	case !r.lease.Granted:
		return g.check(ctx)
	}
	until := r.sent.Add(r.lease.TTL - g.cfg.Margin)
	g.mu.Lock()
	if until.After(g.valid) {
		g.valid = until
	}
	g.mu.Unlock()
	return g.check(ctx)
}

// check fences if the lease ran out.
func (g *PrimaryGuard) check(ctx context.Context) error {
	g.mu.Lock()
	valid := g.valid
	g.mu.Unlock()
	if now := g.cfg.Clock.Now(); !now.Before(valid) {
		return g.fence(ctx, fmt.Sprintf("lease of %q not renewed in time (valid until %s, now %s)",
			g.cfg.VM, valid.Format(time.RFC3339Nano), now.Format(time.RFC3339Nano)))
	}
	return nil
}

func (g *PrimaryGuard) fence(ctx context.Context, reason string) error {
	g.mu.Lock()
	g.fenced = reason
	g.mu.Unlock()
	// The fence must run even if ctx is ending: a primary that stops
	// guarding while it may have lost the lease has to stop its VM too.
	if err := g.cfg.Fence.Fence(context.WithoutCancel(ctx), reason); err != nil {
		return fmt.Errorf("%w: %s; fence failed: %w", ErrFenced, reason, err)
	}
	return fmt.Errorf("%w: %s", ErrFenced, reason)
}
