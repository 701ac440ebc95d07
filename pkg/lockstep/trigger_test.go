package lockstep

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// fakeClock fires timers only when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []fakeTimer
}

type fakeTimer struct {
	at time.Time
	ch chan time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.timers = append(c.timers, fakeTimer{c.now.Add(d), ch})
	return ch
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, t := range c.timers {
		if !t.at.After(c.now) {
			t.ch <- c.now
		} else {
			kept = append(kept, t)
		}
	}
	c.timers = kept
}

func (c *fakeClock) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.timers)
}

type waitResult struct {
	r   Reason
	err error
}

func startWait(t *testing.T, tr *Trigger, last time.Time, out, req chan struct{}) chan waitResult {
	t.Helper()
	res := make(chan waitResult, 1)
	go func() {
		r, err := tr.Wait(context.Background(), last, out, req)
		res <- waitResult{r, err}
	}()
	return res
}

func waitTimers(t *testing.T, c *fakeClock, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for c.pending() < n {
		if time.Now().After(deadline) {
			t.Fatalf("trigger never armed %d timers", n)
		}
		time.Sleep(time.Millisecond)
	}
}

func expectNone(t *testing.T, res chan waitResult) {
	t.Helper()
	select {
	case r := <-res:
		t.Fatalf("checkpoint triggered too early: %+v", r)
	case <-time.After(20 * time.Millisecond):
	}
}

func expect(t *testing.T, res chan waitResult, want Reason) {
	t.Helper()
	select {
	case r := <-res:
		if r.err != nil || r.r != want {
			t.Fatalf("Wait = %q, %v; want %q", r.r, r.err, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no checkpoint triggered, want %q", want)
	}
}

func TestIOTriggerCoalescesOutputByMinInterval(t *testing.T) {
	c := &fakeClock{now: time.Unix(1000, 0)}
	tr, err := NewTrigger(Policy{MinInterval: 10 * time.Millisecond, MaxInterval: time.Second}, c)
	if err != nil {
		t.Fatal(err)
	}
	last := c.Now()
	out, req := make(chan struct{}, 1), make(chan struct{})
	res := startWait(t, tr, last, out, req)
	waitTimers(t, c, 1)
	c.Advance(2 * time.Millisecond)
	out <- struct{}{} // output 2ms after the last checkpoint: wait until 10ms
	waitTimers(t, c, 2)
	expectNone(t, res)
	c.Advance(7 * time.Millisecond)
	expectNone(t, res)
	c.Advance(time.Millisecond)
	expect(t, res, ReasonOutput)
}

func TestIOTriggerImmediateWhenMinIntervalPassed(t *testing.T) {
	c := &fakeClock{now: time.Unix(1000, 0)}
	tr, _ := NewTrigger(Policy{MinInterval: 10 * time.Millisecond, MaxInterval: time.Second}, c)
	last := c.Now()
	c.Advance(50 * time.Millisecond)
	out := make(chan struct{}, 1)
	out <- struct{}{}
	expect(t, startWait(t, tr, last, out, nil), ReasonOutput)
}

func TestIOTriggerMaxIntervalWithoutOutput(t *testing.T) {
	c := &fakeClock{now: time.Unix(1000, 0)}
	tr, _ := NewTrigger(Policy{MinInterval: time.Millisecond, MaxInterval: 100 * time.Millisecond}, c)
	res := startWait(t, tr, c.Now(), make(chan struct{}), nil)
	waitTimers(t, c, 1)
	c.Advance(99 * time.Millisecond)
	expectNone(t, res)
	c.Advance(time.Millisecond)
	expect(t, res, ReasonInterval)
}

func TestPeriodicIgnoresOutput(t *testing.T) {
	c := &fakeClock{now: time.Unix(1000, 0)}
	tr, _ := NewTrigger(Policy{Mode: ModePeriodic, Period: 30 * time.Millisecond}, c)
	out := make(chan struct{}, 1)
	out <- struct{}{}
	res := startWait(t, tr, c.Now(), out, nil)
	waitTimers(t, c, 1)
	c.Advance(29 * time.Millisecond)
	expectNone(t, res)
	c.Advance(time.Millisecond)
	expect(t, res, ReasonPeriod)
}

func TestRequestAndCancel(t *testing.T) {
	c := &fakeClock{now: time.Unix(1000, 0)}
	tr, _ := NewTrigger(Policy{}, c)
	req := make(chan struct{}, 1)
	req <- struct{}{}
	expect(t, startWait(t, tr, c.Now(), nil, req), ReasonRequest)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := tr.Wait(ctx, c.Now(), nil, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait on cancelled ctx = %v", err)
	}
}

func TestPolicyValidation(t *testing.T) {
	for _, p := range []Policy{
		{Mode: "sometimes"},
		{MinInterval: time.Second, MaxInterval: time.Millisecond},
		{Mode: ModePeriodic, Period: -1},
	} {
		if _, err := NewTrigger(p, nil); !errors.Is(err, ErrConfig) {
			t.Errorf("NewTrigger(%+v) = %v, want ErrConfig", p, err)
		}
	}
}
