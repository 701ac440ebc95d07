package memsync

import (
	"context"
	"fmt"
)

// Tracker finds the guest pages written in an interval.
type Tracker interface {
	// Begin starts tracking: writes before it are considered known to the
	// peer. It must be called once before Dirty, and may be called again
	// to restart.
	Begin(ctx context.Context) error
	// Dirty returns the pages written since the previous Begin or Dirty and
	// starts a new interval. Call it while the VM is stopped: only then is
	// the result exact for every tracker (see the package doc).
	Dirty(ctx context.Context) (*Bitmap, error)
	// Kind names the implementation.
	Kind() Kind
	// Close releases the tracker's resources.
	Close() error
}

// Kind names a tracker implementation.
type Kind string

// Tracker kinds. KindAuto lets New probe.
const (
	KindAuto      Kind = "auto"
	KindSoftDirty Kind = "soft-dirty"
	KindShadow    Kind = "shadow"
)

// ParseKind turns a user's option value into a Kind.
func ParseKind(s string) (Kind, error) {
	switch k := Kind(s); k {
	case KindAuto, KindSoftDirty, KindShadow:
		return k, nil
	case "":
		return KindAuto, nil
	}
	return "", fmt.Errorf("%w: tracker kind %q (want auto, soft-dirty or shadow)", ErrBadInput, s)
}

// LiveSource is implemented by trackers whose notion of "unchanged" is a
// stored copy rather than a point in time (the shadow tracker). A copy taken
// while the guest runs must read from that copy, or a page changed and
// changed back between the scan and the copy would be lost.
type LiveSource interface {
	Source() Pages
}

// LiveSafe is implemented by trackers whose Dirty loses no write even when
// the guest runs during the call (the shadow tracker: a write racing with
// the compare shows up in the next interval). Other trackers need the VM
// paused around Dirty.
type LiveSafe interface {
	LiveSafe() bool
}

// Config selects and configures a tracker for one guest.
type Config struct {
	// Kind forces an implementation; KindAuto (or "") probes: soft-dirty
	// when the kernel really supports it, shadow otherwise.
	Kind Kind
	// PID is the QEMU process whose page tables soft-dirty reads.
	PID int
	// Region is the agent's own mapping of the guest RAM file; its Path
	// identifies the mapping in /proc/PID/maps.
	Region *Region
	// Workers bounds the shadow tracker's parallelism (0: GOMAXPROCS).
	Workers int
}

// New returns the tracker Config asks for. With KindAuto it runs
// ProbeSoftDirty and falls back to the shadow tracker when the probe fails;
// with KindSoftDirty a failing probe is an error wrapping ErrUnsupported.
func New(ctx context.Context, c Config) (Tracker, error) {
	if c.Region == nil {
		return nil, fmt.Errorf("%w: tracker config has no region", ErrBadInput)
	}
	kind := c.Kind
	if kind == "" {
		kind = KindAuto
	}
	switch kind {
	case KindShadow:
		return NewShadow(c.Region, c.Workers), nil
	case KindSoftDirty:
		if err := ProbeSoftDirty(); err != nil {
			return nil, err
		}
		return NewSoftDirty(ctx, c.PID, c.Region)
	case KindAuto:
		if ProbeSoftDirty() == nil {
			// A supported kernel with an unusable target (wrong PID, RAM not
			// mapped) is a configuration error, not a reason to fall back.
			return NewSoftDirty(ctx, c.PID, c.Region)
		}
		return NewShadow(c.Region, c.Workers), nil
	}
	return nil, fmt.Errorf("%w: tracker kind %q", ErrBadInput, kind)
}
