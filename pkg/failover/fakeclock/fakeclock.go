// Package fakeclock owns a manually advanced clock for tests of timeout
// logic (it satisfies failover.Clock): time moves only when Advance is
// called, and tickers fire as Advance crosses their deadlines.
package fakeclock

import (
	"sync"
	"time"
)

// Clock is a fake clock. The zero value is not usable; call New.
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*ticker
}

type ticker struct {
	c       chan time.Time
	every   time.Duration
	next    time.Time
	stopped bool
}

// New returns a clock reading start.
func New(start time.Time) *Clock { return &Clock{now: start} }

// Now returns the clock's current time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// NewTicker returns a ticker that fires every d of fake time. Like
// time.Ticker its channel holds one tick; ticks a slow reader misses are
// dropped.
func (c *Clock) NewTicker(d time.Duration) (<-chan time.Time, func()) {
	if d <= 0 {
		panic("fakeclock: non-positive ticker interval") // same contract as time.NewTicker
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &ticker{c: make(chan time.Time, 1), every: d, next: c.now.Add(d)}
	c.tickers = append(c.tickers, t)
	return t.c, func() {
		c.mu.Lock()
		t.stopped = true
		c.mu.Unlock()
	}
}

// Tickers reports how many tickers are running, so a test can wait until
// the code under test has started its ticker before advancing.
func (c *Clock) Tickers() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.tickers {
		if !t.stopped {
			n++
		}
	}
	return n
}

// Advance moves the clock forward by d and fires the tickers whose
// deadlines it crosses (each at most once per call, with the new time).
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	live := c.tickers[:0]
	for _, t := range c.tickers {
		if t.stopped {
			continue
		}
		live = append(live, t)
		if c.now.Before(t.next) {
			continue
		}
		for !c.now.Before(t.next) {
			t.next = t.next.Add(t.every)
		}
		select {
		case t.c <- c.now:
		default:
		}
	}
	c.tickers = live
}
