package fakeclock

import (
	"testing"
	"time"
)

func TestTickerFiresOnlyWhenAdvanced(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := New(start)
	tick, stop := c.NewTicker(100 * time.Millisecond)
	c.Advance(99 * time.Millisecond)
	select {
	case <-tick:
		t.Fatal("ticked before its period")
	default:
	}
	c.Advance(time.Millisecond)
	if got := <-tick; !got.Equal(start.Add(100 * time.Millisecond)) {
		t.Fatalf("tick at %v", got)
	}
	// A long jump fires once (the channel holds one tick), then the
	// schedule continues from the jump.
	c.Advance(time.Second)
	<-tick
	select {
	case <-tick:
		t.Fatal("a missed tick was queued")
	default:
	}
	c.Advance(100 * time.Millisecond)
	<-tick
	if c.Tickers() != 1 {
		t.Fatalf("%d tickers", c.Tickers())
	}
	stop()
	c.Advance(time.Second)
	select {
	case <-tick:
		t.Fatal("stopped ticker fired")
	default:
	}
	if c.Tickers() != 0 {
		t.Fatalf("%d tickers after stop", c.Tickers())
	}
}
