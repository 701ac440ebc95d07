package failover

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// Path names a channel over which a peer is heard.
type Path uint8

const (
	// PathRepl is the replication link: the agent calls Heard for every
	// lockstep frame (or acknowledgement) it receives from the peer.
	PathRepl Path = iota + 1
	// PathMgmt is the separate management path, fed by HeartbeatServer
	// (pings received) or HeartbeatClient (pongs received).
	PathMgmt
)

func (p Path) String() string {
	switch p {
	case PathRepl:
		return "repl"
	case PathMgmt:
		return "mgmt"
	}
	return fmt.Sprintf("path(%d)", uint8(p))
}

// State is the Detector's judgement of its subject.
type State uint8

const (
	// Alive: every signal is fresh.
	Alive State = iota + 1
	// Suspect: some signal is late or failing, but not all of them for
	// longer than the timeout. Nothing is to be done yet except report it.
	Suspect
	// Lost: every heartbeat path has been silent for longer than Timeout,
	// or the liveness check failed for that long (or reported ErrDead).
	// This starts arbitration; it is not itself permission to promote.
	Lost
)

func (s State) String() string {
	switch s {
	case Alive:
		return "alive"
	case Suspect:
		return "suspect"
	case Lost:
		return "lost"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Event is one state change of a Detector.
type Event struct {
	State State
	// Paths lists the paths that are overdue (Suspect) or silent (Lost),
	// in the order of Config.Paths.
	Paths []Path
	// Liveness is the last liveness failure while it lasts, else nil.
	Liveness error
	// Reason says in words why the state is what it is.
	Reason string
	// At is when the detector decided, on its clock.
	At time.Time
}

func (e Event) String() string {
	return fmt.Sprintf("%s at %s: %s", e.State, e.At.Format(time.RFC3339Nano), e.Reason)
}

// Liveness checks the subject directly, for instance QMP query-status with
// a short deadline, or whether the QEMU process still exists. It returns
// nil when the subject is fine, an error wrapping ErrDead when it is
// certainly gone (the process exited: Lost at once), and any other error
// when it did not answer properly (Lost only after failing for Timeout).
// It must return when ctx is done.
type Liveness func(ctx context.Context) error

// Config tunes a Detector. Zero durations take the defaults below, chosen
// from measurements on this project's machines (see the package doc).
type Config struct {
	// Interval is how often heartbeats are expected and how often the
	// detector evaluates and polls Liveness. Default DefaultInterval.
	Interval time.Duration
	// SuspectAfter is the silence after which a path is reported late
	// (Suspect). Default 5 × Interval (at most Timeout): the worst gap
	// between heartbeats measured under CPU load was 335 ms.
	SuspectAfter time.Duration
	// Timeout is the silence on all paths (or the duration of liveness
	// failure) after which the subject is Lost. Default DefaultTimeout.
	Timeout time.Duration
	// Paths are the heartbeat paths to watch. nil means PathRepl and
	// PathMgmt; an empty non-nil slice means none (a liveness-only detector).
	Paths []Path
	// Liveness, if set, is polled every Interval.
	Liveness Liveness
	// LivenessTimeout bounds one Liveness call. Default Interval.
	LivenessTimeout time.Duration
	// Clock defaults to RealClock.
	Clock Clock
}

// Defaults measured on this project's machines; see the package doc.
const (
	DefaultInterval = 100 * time.Millisecond
	DefaultTimeout  = 1 * time.Second
)

func (c Config) withDefaults() (Config, error) {
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.SuspectAfter == 0 {
		c.SuspectAfter = min(5*c.Interval, c.Timeout)
	}
	if c.LivenessTimeout == 0 {
		c.LivenessTimeout = c.Interval
	}
	if c.Paths == nil {
		c.Paths = []Path{PathRepl, PathMgmt}
	}
	c.Clock = clockOr(c.Clock)
	switch {
	case c.Interval < 0 || c.Timeout < 0 || c.SuspectAfter < 0 || c.LivenessTimeout < 0:
		return c, fmt.Errorf("%w: negative duration in detector config", ErrConfig)
	case c.Timeout <= c.Interval:
		return c, fmt.Errorf("%w: detector Timeout %v must exceed Interval %v", ErrConfig, c.Timeout, c.Interval)
	case c.SuspectAfter > c.Timeout:
		return c, fmt.Errorf("%w: detector SuspectAfter %v exceeds Timeout %v", ErrConfig, c.SuspectAfter, c.Timeout)
	case len(c.Paths) == 0 && c.Liveness == nil:
		return c, fmt.Errorf("%w: detector has neither heartbeat paths nor a liveness check", ErrConfig)
	}
	for i, p := range c.Paths {
		if p != PathRepl && p != PathMgmt {
			return c, fmt.Errorf("%w: unknown heartbeat path %d", ErrConfig, uint8(p))
		}
		if slices.Contains(c.Paths[:i], p) {
			return c, fmt.Errorf("%w: heartbeat path %s listed twice", ErrConfig, p)
		}
	}
	return c, nil
}

// Detector decides whether its subject (the peer agent, or the local
// QEMU) is lost, from heartbeats on several paths and an optional liveness
// check. Use one Detector per subject. Heard and State are safe for
// concurrent use; Run drives it.
type Detector struct {
	cfg    Config
	events chan Event
	poke   chan struct{}

	mu        sync.Mutex
	last      map[Path]time.Time
	cur       Event
	livSince  time.Time // first failure of the current failing streak
	livErr    error
	livDead   bool
	running   bool
	unhealthy bool // cur.State != Alive, read by Heard to decide on a poke
}

// NewDetector checks cfg and returns a detector in state Alive: the grace
// period before a silent peer is Lost starts now.
func NewDetector(cfg Config) (*Detector, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	now := cfg.Clock.Now()
	d := &Detector{
		cfg:    cfg,
		events: make(chan Event, 32),
		poke:   make(chan struct{}, 1),
		last:   make(map[Path]time.Time, len(cfg.Paths)),
		cur:    Event{State: Alive, Reason: "starting", At: now},
	}
	for _, p := range cfg.Paths {
		d.last[p] = now
	}
	return d, nil
}

// Config returns the effective configuration, defaults filled in.
func (d *Detector) Config() Config { return d.cfg }

// Heard records a sign of life on path p. Paths the detector does not watch
// are ignored. It never blocks.
func (d *Detector) Heard(_ context.Context, p Path) {
	d.mu.Lock()
	if _, ok := d.last[p]; !ok {
		d.mu.Unlock()
		return
	}
	d.last[p] = d.cfg.Clock.Now()
	wake := d.unhealthy
	d.mu.Unlock()
	if wake {
		// Re-evaluate now rather than at the next tick: recovery is news.
		select {
		case d.poke <- struct{}{}:
		default:
		}
	}
}

// State returns the current judgement.
func (d *Detector) State() Event {
	d.mu.Lock()
	defer d.mu.Unlock()
	return cloneEvent(d.cur)
}

// Events returns the stream of state changes. It is closed when Run
// returns. The consumer must keep reading: Run waits for it to take each
// change rather than drop one.
func (d *Detector) Events() <-chan Event { return d.events }

// Run evaluates every Interval (and at once when a path recovers) until
// ctx is done, sending each change of state or of the set of late paths to
// Events. It returns ctx's error.
func (d *Detector) Run(ctx context.Context) error {
	d.mu.Lock()
	if d.running {
		d.mu.Unlock()
		return fmt.Errorf("%w: detector Run called twice", ErrConfig)
	}
	d.running = true
	d.mu.Unlock()
	defer close(d.events)

	tick, stop := d.cfg.Clock.NewTicker(d.cfg.Interval)
	defer stop()

	type livResult struct{ err error }
	livc := make(chan livResult, 1)
	livBusy := false
	startLiveness := func() {
		if d.cfg.Liveness == nil || livBusy {
			return
		}
		livBusy = true
		go func() {
			cctx, cancel := context.WithTimeout(ctx, d.cfg.LivenessTimeout)
			defer cancel()
			err := d.cfg.Liveness(cctx)
			if err == nil && cctx.Err() != nil && ctx.Err() == nil {
				// A check that ignores its deadline is a failing check.
				err = fmt.Errorf("liveness check overran %v", d.cfg.LivenessTimeout)
			}
			livc <- livResult{err}
		}()
	}
	defer func() {
		if livBusy {
			<-livc // the check sees ctx done and returns
		}
	}()

	startLiveness()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick:
			startLiveness()
		case <-d.poke:
		case r := <-livc:
			livBusy = false
			d.recordLiveness(r.err)
		}
		if ev, changed := d.evaluate(); changed {
			select {
			case d.events <- ev:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
}

func (d *Detector) recordLiveness(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err == nil {
		d.livSince, d.livErr, d.livDead = time.Time{}, nil, false
		return
	}
	if d.livErr == nil {
		d.livSince = d.cfg.Clock.Now()
	}
	d.livErr = err
	d.livDead = errors.Is(err, ErrDead)
}

// evaluate recomputes the state; it reports the new event if the state or
// the set of late paths changed.
func (d *Detector) evaluate() (Event, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.cfg.Clock.Now()
	var late, silent []Path
	var oldest time.Duration
	for _, p := range d.cfg.Paths {
		gap := now.Sub(d.last[p])
		if gap > d.cfg.SuspectAfter {
			late = append(late, p)
		}
		if gap > d.cfg.Timeout {
			silent = append(silent, p)
		}
		if gap > oldest {
			oldest = gap
		}
	}
	ev := Event{At: now, Liveness: d.livErr}
	livFor := now.Sub(d.livSince)
	switch {
	case len(d.cfg.Paths) > 0 && len(silent) == len(d.cfg.Paths):
		ev.State, ev.Paths = Lost, silent
		ev.Reason = fmt.Sprintf("no heartbeat on %s for over %v", pathList(silent), d.cfg.Timeout)
	case d.livDead:
		ev.State, ev.Paths = Lost, late
		ev.Reason = fmt.Sprintf("liveness: %v", d.livErr)
	case d.livErr != nil && livFor >= d.cfg.Timeout:
		ev.State, ev.Paths = Lost, late
		ev.Reason = fmt.Sprintf("liveness failing for %v: %v", livFor, d.livErr)
	case len(late) > 0 || d.livErr != nil:
		ev.State, ev.Paths = Suspect, late
		var parts []string
		if len(late) > 0 {
			parts = append(parts, fmt.Sprintf("no heartbeat on %s for over %v (oldest %v)", pathList(late), d.cfg.SuspectAfter, oldest))
		}
		if d.livErr != nil {
			parts = append(parts, fmt.Sprintf("liveness failing for %v: %v", livFor, d.livErr))
		}
		ev.Reason = strings.Join(parts, "; ")
	default:
		ev.State = Alive
		ev.Reason = "all signals fresh"
	}
	changed := ev.State != d.cur.State || !slices.Equal(ev.Paths, d.cur.Paths) ||
		(ev.Liveness == nil) != (d.cur.Liveness == nil)
	if changed {
		d.cur = ev
		d.unhealthy = ev.State != Alive
	}
	return cloneEvent(ev), changed
}

func pathList(ps []Path) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

func cloneEvent(e Event) Event {
	e.Paths = slices.Clone(e.Paths)
	return e
}
