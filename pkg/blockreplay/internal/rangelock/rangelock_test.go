package rangelock

import (
	"context"
	"testing"
	"time"
)

func granted(t *Ticket) bool {
	select {
	case <-t.ready:
		return true
	default:
		return false
	}
}

func TestFIFOAmongConflicts(t *testing.T) {
	var l Locker
	a := l.Enqueue(0, 100)
	b := l.Enqueue(50, 100)  // overlaps a
	c := l.Enqueue(200, 10)  // disjoint: runs at once
	d := l.Enqueue(120, 100) // [120,220) overlaps b and c
	e := l.Enqueue(0, 0)     // empty range conflicts with nothing
	if !granted(a) || !granted(c) || !granted(e) {
		t.Fatal("non-conflicting tickets must be granted at once")
	}
	if granted(b) || granted(d) {
		t.Fatal("conflicting tickets granted early")
	}
	a.Release()
	if !granted(b) {
		t.Fatal("b not granted after a released")
	}
	if granted(d) {
		t.Fatal("d overtook b and c")
	}
	b.Release()
	if granted(d) {
		t.Fatal("d granted while c (200..210) still held")
	}
	c.Release()
	if !granted(d) {
		t.Fatal("d not granted after b and c released")
	}
	d.Release()
	d.Release() // double release is a no-op
	e.Release()
	if len(l.held) != 0 {
		t.Fatalf("%d tickets left", len(l.held))
	}
}

func TestLockCancel(t *testing.T) {
	var l Locker
	a := l.Enqueue(0, 10)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := l.Lock(ctx, 5, 10); err == nil {
		t.Fatal("Lock on a held range did not time out")
	}
	// The cancelled waiter left the queue: a later one is not blocked by it.
	a.Release()
	b, err := l.Lock(context.Background(), 5, 10)
	if err != nil {
		t.Fatal(err)
	}
	b.Release()
}

func TestOverflowingRange(t *testing.T) {
	var l Locker
	a := l.Enqueue(^uint64(0)-5, 100) // wraps: treated as reaching the end
	b := l.Enqueue(^uint64(0)-1, 1)
	if granted(b) {
		t.Fatal("wrapped range did not cover the end of the space")
	}
	a.Release()
	if !granted(b) {
		t.Fatal("b not granted")
	}
}
