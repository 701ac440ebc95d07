// Package rangelock orders operations on overlapping byte ranges.
//
// The write-event log must emit events in the same order as their effects
// reach the image, and the NBD server must apply overlapping requests in the
// order they arrived. Both need a lock over byte ranges whose waiters are
// served strictly in the order they enqueued: a later request never overtakes
// an earlier conflicting one, while non-overlapping requests run in parallel.
package rangelock

import (
	"context"
	"sync"
)

// Locker grants exclusive access to byte ranges in FIFO order among
// conflicting ranges. The zero value is ready to use.
type Locker struct {
	mu   sync.Mutex
	held []*Ticket // queued or held, in enqueue order
}

// Ticket is one place in the queue. It must be released exactly once.
type Ticket struct {
	l        *Locker
	off, end uint64
	ready    chan struct{}
	granted  bool
	released bool
}

// Enqueue takes a place in line for [off, off+n) without waiting. The caller
// waits for the grant with Wait; taking the place and waiting are separate so
// a request reader can fix the order before handing work to another
// goroutine. n == 0 conflicts with nothing.
func (l *Locker) Enqueue(off, n uint64) *Ticket {
	t := &Ticket{l: l, off: off, end: off + n, ready: make(chan struct{})}
	if t.end < off { // overflow: treat as reaching the end of the address space
		t.end = ^uint64(0)
	}
	l.mu.Lock()
	l.held = append(l.held, t)
	l.grantLocked()
	l.mu.Unlock()
	return t
}

// Lock enqueues and waits; on ctx cancellation it gives up its place.
func (l *Locker) Lock(ctx context.Context, off, n uint64) (*Ticket, error) {
	t := l.Enqueue(off, n)
	if err := t.Wait(ctx); err != nil {
		t.Release()
		return nil, err
	}
	return t, nil
}

// Wait blocks until the ticket's range is free of earlier conflicting tickets.
func (t *Ticket) Wait(ctx context.Context) error {
	select {
	case <-t.ready:
		return nil
	default:
	}
	select {
	case <-t.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Release frees the range (or gives up the place in line) and wakes the
// tickets that were waiting on it. Releasing twice is a no-op.
func (t *Ticket) Release() {
	l := t.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if t.released {
		return
	}
	t.released = true
	for i, h := range l.held {
		if h == t {
			l.held = append(l.held[:i], l.held[i+1:]...)
			break
		}
	}
	l.grantLocked()
}

func overlaps(a, b *Ticket) bool {
	return a.off < b.end && b.off < a.end
}

// grantLocked grants every ticket that has no earlier conflicting ticket.
// The queue is short (bounded by in-flight requests), so a quadratic scan is
// cheaper than an interval tree here.
func (l *Locker) grantLocked() {
	for i, t := range l.held {
		if t.granted {
			continue
		}
		free := true
		for _, e := range l.held[:i] {
			if overlaps(e, t) {
				free = false
				break
			}
		}
		if free {
			t.granted = true
			close(t.ready)
		}
	}
}
