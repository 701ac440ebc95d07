package failover

import "time"

// Clock is the time source of the Detector, the WitnessServer and the
// PrimaryGuard; tests swap in a fake one (see package fakeclock) to walk
// through timeouts without sleeping.
type Clock interface {
	Now() time.Time
	// NewTicker returns a channel that receives the time every d, and a
	// func that stops it.
	NewTicker(d time.Duration) (c <-chan time.Time, stop func())
}

// RealClock is the wall clock. Go's time.Time carries a monotonic reading,
// so differences between its Now values are immune to clock steps.
type RealClock struct{}

// Now returns time.Now().
func (RealClock) Now() time.Time { return time.Now() }

// NewTicker wraps time.NewTicker.
func (RealClock) NewTicker(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTicker(d)
	return t.C, t.Stop
}

func clockOr(c Clock) Clock {
	if c == nil {
		return RealClock{}
	}
	return c
}
