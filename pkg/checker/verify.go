package checker

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrNotConnected: Verify found no long-lived connection open at the
// failover, so it cannot tell what the failover did to one.
var ErrNotConnected = errors.New("no long-lived connection at the failover")

// Failover is the client's view of one failover, from Verify.
type Failover struct {
	Since time.Time
	Conn  string // the long-lived connection that was open at Since
	// LastAckBefore is the last request on Conn acknowledged before
	// Since; FirstAckAfter the first acknowledged request sent after it.
	// The chain in FirstAckAfter.Sum covers every request up to it, so
	// it proves the server still holds LastAckBefore and all before.
	LastAckBefore Ack
	FirstAckAfter Ack
	// InFlight counts requests on Conn sent before Since whose replies
	// were verified after it: work that crossed the failover.
	InFlight int
	// Downtime is the longest stretch without any verified reply that
	// ended after Since (0 if none was longer than 2×Interval).
	Downtime time.Duration
	Report   Report
}

// Verify waits until the service has proved it came through a failover that
// happened at or after since (take it just before killing the primary):
// the long-lived connection open at since acknowledges a request sent after
// since, and, with ShortConns, a short connection opened after since
// completes. It returns an error as soon as the report holds a violation or
// that connection ended, and wraps ErrTimeout if ctx ends first.
func (c *Checker) Verify(ctx context.Context, since time.Time) (Failover, error) {
	for {
		c.mu.Lock()
		f, done, err := c.verifyLocked(since)
		changed := c.changed
		c.mu.Unlock()
		if err != nil || done {
			return f.Failover, err
		}
		select {
		case <-ctx.Done():
			return f.Failover, fmt.Errorf("%w: %s (%v)", ErrTimeout, f.waiting, context.Cause(ctx))
		case <-changed:
		}
	}
}

// verifyResult carries why Verify is still waiting.
type verifyResult struct {
	Failover
	waiting string
}

func (c *Checker) verifyLocked(since time.Time) (verifyResult, bool, error) {
	now := time.Now()
	f := verifyResult{Failover: Failover{Since: since, Report: c.reportLocked(now)}}
	if err := f.Report.Err(); err != nil {
		return f, false, fmt.Errorf("checker saw a violation: %w", err)
	}
	var s *stream
	switch {
	case c.long != nil && !c.long.opened.After(since):
		s = c.long
	case c.longOld != nil && !c.longOld.opened.After(since):
		s = c.longOld
	case c.long != nil && c.longReset:
		return f, false, fmt.Errorf("%w: the long-lived connection open at the failover was reset", ErrReset)
	default:
		f.waiting = "no long-lived connection was open at the failover"
		return f, false, fmt.Errorf("%w (since %s)", ErrNotConnected, since.Format("15:04:05.000"))
	}
	f.Conn = s.id
	if s.closed && !s.stopped {
		k := s.endKind
		if k == "" {
			// The checker gave it up after a violation, already reported.
			return f, false, fmt.Errorf("%w: long-lived connection %s ended (checker closed it)", ErrLost, s.id)
		}
		return f, false, fmt.Errorf("%w: long-lived connection %s: %s", k.Err(), s.id, s.endMsg)
	}
	var after *entry
	for i := range s.hist {
		e := &s.hist[i]
		switch {
		case e.acked && e.ackedAt.Before(since):
			f.LastAckBefore = Ack{Conn: s.id, Index: s.base + uint64(i), Seq: e.seq, Sum: e.sum, Sent: e.sent, Received: e.ackedAt}
		case e.acked && e.sent.Before(since):
			f.InFlight++
		case e.acked && after == nil:
			after = e
			f.FirstAckAfter = Ack{Conn: s.id, Index: s.base + uint64(i), Seq: e.seq, Sum: e.sum, Sent: e.sent, Received: e.ackedAt}
		}
	}
	if after == nil {
		f.waiting = fmt.Sprintf("long-lived connection %s has no verified reply to a request sent after the failover (%d unanswered)", s.id, s.outstanding())
		return c.waitLocked(f)
	}
	if c.cfg.ShortConns > 0 {
		ok := false
		for _, t := range c.shortDone {
			ok = ok || t.After(since)
		}
		if !ok {
			f.waiting = "no short connection opened after the failover has completed"
			return c.waitLocked(f)
		}
	}
	for _, g := range c.gaps {
		if g.End.After(since) {
			f.Downtime = max(f.Downtime, g.Len())
		}
	}
	return f, true, nil
}

// waitLocked makes Verify wait for more, unless Run has returned.
func (c *Checker) waitLocked(f verifyResult) (verifyResult, bool, error) {
	if c.stopped {
		return f, false, fmt.Errorf("%w: the checker stopped, and %s", ErrTimeout, f.waiting)
	}
	return f, false, nil
}
