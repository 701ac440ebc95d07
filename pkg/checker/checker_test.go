package checker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// fake is a server of the checksummed protocol on loopback whose replies a
// test can spoil through hook. It serves every request under one lock, so a
// hook that sleeps stalls the whole server, like a paused VM.
type fake struct {
	ln   net.Listener
	mu   sync.Mutex
	seq  uint64
	hook func(f *fake, fc *fakeConn, line string) // nil: answer correctly
	wg   sync.WaitGroup
}

type fakeConn struct {
	c    net.Conn
	sum  uint64
	n    int  // requests taken
	long bool // the checker's long-lived connection
}

func startFake(t *testing.T, hook func(f *fake, fc *fakeConn, line string)) *fake {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fake{ln: ln, hook: hook}
	var conns sync.Map
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			f.wg.Go(func() {
				defer c.Close()
				f.serve(c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
		f.wg.Wait()
	})
	return f
}

func (f *fake) serve(c net.Conn) {
	sc := bufio.NewScanner(c)
	fc := &fakeConn{c: c}
	if !sc.Scan() || sc.Text() != Hello {
		return
	}
	if _, err := fmt.Fprintf(c, "%s\n", HelloReply); err != nil {
		return
	}
	for sc.Scan() {
		line := sc.Text()
		fc.long = strings.HasPrefix(line, "L")
		f.mu.Lock()
		if f.hook != nil {
			f.hook(f, fc, line)
		} else {
			f.reply(fc, line)
		}
		f.mu.Unlock()
	}
}

// take advances the server's state by one request and returns its reply.
func (f *fake) take(fc *fakeConn, line string) []byte {
	f.seq++
	fc.n++
	fc.sum = NextSum(fc.sum, []byte(line))
	return AppendReply(nil, f.seq, fc.sum, []byte(line))
}

func (f *fake) reply(fc *fakeConn, line string) { fc.c.Write(f.take(fc, line)) }

func (f *fake) addr() string { return f.ln.Addr().String() }

// runChecker runs a checker on addr until until() holds (checked every few
// ms, for at most 20 s), then stops it and returns Run's error and the
// final report.
func runChecker(t *testing.T, cfg Config, until func(Report) bool) (*Checker, Report, error) {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	deadline := time.Now().Add(20 * time.Second)
	for !until(c.Snapshot()) {
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatalf("condition not reached in 20s:\n%s", c.Snapshot())
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	return c, c.Snapshot(), err
}

func quickConfig(addr string) Config {
	return Config{Addr: addr, Interval: 5 * time.Millisecond, Timeout: 3 * time.Second, ShortConns: 3}
}

func TestCleanServerNoViolation(t *testing.T) {
	f := startFake(t, nil)
	var mid time.Time
	var shortAtMid uint64
	c, r, err := runChecker(t, quickConfig(f.addr()), func(r Report) bool {
		if mid.IsZero() && r.LongAcked >= 20 {
			mid, shortAtMid = time.Now(), r.ShortDone
		}
		// Verify needs a short connection opened after mid: at most
		// ShortConns (3) opened before it complete after it.
		return !mid.IsZero() && r.LongAcked >= 60 && r.ShortDone >= 10 && r.ShortDone > shortAtMid+3
	})
	if err != nil || r.Err() != nil || len(r.Errors) != 0 {
		t.Fatalf("Run: %v; errors %v %v\n%s", err, r.Errors, r.Events, r)
	}
	if r.LongConns != 1 || r.LongReset || r.AckedLost != 0 || r.Acked < 60+10 || r.Acked > r.Sent || r.Replies != r.Acked {
		t.Fatalf("report:\n%s%+v", r, r)
	}
	f.mu.Lock()
	seq := f.seq
	f.mu.Unlock()
	if r.MaxSeq == 0 || r.MaxSeq > seq || r.LastAck.Conn != "L1" || r.LastAck.Index != r.LongAcked {
		t.Fatalf("max seq %d (server at %d), last ack %+v of %d", r.MaxSeq, seq, r.LastAck, r.LongAcked)
	}
	// Verify on a stopped checker: the connection was open throughout
	// and acknowledged requests sent after mid.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fo, err := c.Verify(ctx, mid)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if fo.Conn != "L1" || fo.LastAckBefore.Index == 0 || fo.FirstAckAfter.Index <= fo.LastAckBefore.Index ||
		fo.FirstAckAfter.Seq <= fo.LastAckBefore.Seq || fo.FirstAckAfter.Sent.Before(mid) || !fo.LastAckBefore.Received.Before(mid) {
		t.Fatalf("failover view %+v around %v", fo, mid)
	}
}

// onLong calls spoil for the long connection's n-th request instead of
// answering it; everything else is answered correctly.
func onLong(n int, spoil func(f *fake, fc *fakeConn, line string)) func(*fake, *fakeConn, string) {
	return func(f *fake, fc *fakeConn, line string) {
		if fc.long && fc.n+1 == n {
			spoil(f, fc, line)
			return
		}
		f.reply(fc, line)
	}
}

func TestMisbehavingServerIsCaught(t *testing.T) {
	for _, tc := range []struct {
		name    string
		hook    func(*fake, *fakeConn, string)
		want    []error // sentinels Err must wrap
		ok      Kind    // a kind that must not appear
		check   func(t *testing.T, r Report)
		longOK  bool // the long connection goes on after it
		newLong bool // a new long connection replaces it
	}{
		{name: "drops a reply", hook: onLong(10, func(f *fake, fc *fakeConn, line string) { f.take(fc, line) }),
			want: []error{ErrLost}, ok: KindReplayed, longOK: true},
		{name: "duplicates a reply", hook: onLong(10, func(f *fake, fc *fakeConn, line string) {
			b := f.take(fc, line)
			fc.c.Write(append(b, b...))
		}), want: []error{ErrReplayed}, ok: KindLost, longOK: true},
		{name: "resets the long connection", hook: onLong(10, func(f *fake, fc *fakeConn, line string) {
			fc.c.(*net.TCPConn).SetLinger(0)
			fc.c.Close()
		}), want: []error{ErrReset}, ok: KindLost, newLong: true, check: func(t *testing.T, r Report) {
			if !r.LongReset || r.LongConns < 2 {
				t.Errorf("long reset %v, %d long connections: want reset and a new one", r.LongReset, r.LongConns)
			}
		}},
		{name: "corrupts a sum", hook: onLong(10, func(f *fake, fc *fakeConn, line string) {
			b := f.take(fc, line)
			i := strings.Index(string(b), "sum=") + 4
			b[i] ^= 1 // another hex digit, or no hex digit: corrupt either way
			fc.c.Write(b)
		}), want: []error{ErrCorrupt}, ok: KindReset, newLong: true, check: func(t *testing.T, r Report) {
			if r.LongReset || r.LongConns < 2 {
				t.Errorf("long reset %v, %d long connections: want the checker to replace it itself", r.LongReset, r.LongConns)
			}
		}},
		{name: "echoes another line", hook: onLong(10, func(f *fake, fc *fakeConn, line string) {
			f.take(fc, line)
			fc.c.Write(AppendReply(nil, f.seq, fc.sum, []byte(line+"x")))
		}), want: []error{ErrCorrupt}, ok: KindReset},
		{name: "rolls back to a stale checkpoint", hook: rollback(10, 20), want: []error{ErrLost, ErrReplayed}, ok: KindReset,
			check: func(t *testing.T, r Report) {
				// The reply to request 20 shows 10..19 gone; some of
				// them (all, unless the machine is slow) were acked.
				if r.AckedLost < 1 || r.AckedLost > 10 {
					t.Errorf("acked lost %d, want 1..10", r.AckedLost)
				}
				if !strings.Contains(r.Err().Error(), "acknowledged request(s) missing") {
					t.Errorf("Err %v does not say acknowledged work is missing", r.Err())
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t, tc.hook)
			_, r, err := runChecker(t, quickConfig(f.addr()), func(r Report) bool {
				switch {
				case r.Err() == nil || r.ShortDone < 3:
					return false
				case tc.longOK:
					return r.LongAcked >= 15
				case tc.newLong:
					return r.LongConns >= 2 && r.LongAcked >= 3
				}
				return true
			})
			for _, want := range tc.want {
				if !errors.Is(err, want) || !errors.Is(r.Err(), want) {
					t.Errorf("Run error %v, want it to wrap %v", err, want)
				}
			}
			if r.Errors[tc.ok] != 0 {
				t.Errorf("%s counted %d times: %v", tc.ok, r.Errors[tc.ok], r.Events)
			}
			if tc.longOK && (r.LongConns != 1 || r.LongAcked < 10) {
				t.Errorf("long connection did not go on: %d opened, %d acked", r.LongConns, r.LongAcked)
			}
			if tc.check != nil {
				tc.check(t, r)
			}
			t.Logf("%s%v", r, r.Err())
		})
	}
}

// rollback saves the server's state before the long connection's request
// from and restores it before request to: seq counter and the connection's sum
// go back, like a VM resumed from an old checkpoint that still had this
// connection open.
func rollback(from, to int) func(*fake, *fakeConn, string) {
	var savedSeq, savedSum uint64
	var savedN int
	return func(f *fake, fc *fakeConn, line string) {
		if fc.long && fc.n+1 == from {
			savedSeq, savedSum, savedN = f.seq, fc.sum, fc.n
		}
		if fc.long && fc.n+1 == to {
			f.seq, fc.sum, fc.n = savedSeq, savedSum, savedN
		}
		f.reply(fc, line)
	}
}

func TestStallIsDowntimeNotViolation(t *testing.T) {
	const stall = 400 * time.Millisecond
	var mu sync.Mutex
	var since time.Time
	f := startFake(t, onLong(15, func(f *fake, fc *fakeConn, line string) {
		mu.Lock()
		since = time.Now()
		mu.Unlock()
		time.Sleep(stall) // holding the server's lock: every connection waits
		f.reply(fc, line)
	}))
	cfg := quickConfig(f.addr())
	cfg.Timeout = 150 * time.Millisecond // shorter than the stall: timeouts, counted
	shortAtStall := -1
	c, r, err := runChecker(t, cfg, func(r Report) bool {
		mu.Lock()
		defer mu.Unlock()
		if since.IsZero() {
			return false
		}
		if shortAtStall < 0 {
			shortAtStall = int(r.ShortDone)
		}
		// At most ShortConns short connections opened before the
		// stall can complete after it: one more opened after it.
		return time.Since(since) > stall && r.LongAcked >= 30 && int(r.ShortDone) > shortAtStall+cfg.ShortConns
	})
	if err != nil || r.Err() != nil {
		t.Fatalf("a stall is no violation: %v\n%v", err, r.Events)
	}
	if r.Errors[KindTimeout] == 0 || r.LongReset || r.LongConns != 1 {
		t.Fatalf("want timeouts counted and the long connection kept: %+v", r)
	}
	if r.LongestGap.Len() < stall || r.LongestGap.Len() > stall+5*time.Second {
		t.Fatalf("longest gap %v, stall %v", r.LongestGap.Len(), stall)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fo, err := c.Verify(ctx, since)
	if err != nil {
		t.Fatal(err)
	}
	if fo.Downtime < stall || fo.Downtime != r.LongestGap.Len() || fo.InFlight < 1 {
		t.Fatalf("downtime %v (longest gap %v), in flight %d; stall %v", fo.Downtime, r.LongestGap.Len(), fo.InFlight, stall)
	}
	t.Logf("downtime %v, %d requests in flight across the stall", fo.Downtime, fo.InFlight)
}

func TestVerifyWaitsAndFails(t *testing.T) {
	// The server takes requests but stops answering at the long
	// connection's 10th: Verify cannot complete and times out.
	f := startFake(t, func(f *fake, fc *fakeConn, line string) {
		if fc.long && fc.n >= 9 {
			f.take(fc, line)
			return
		}
		f.reply(fc, line)
	})
	c, err := New(quickConfig(f.addr()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	for c.Snapshot().LongAcked < 9 {
		time.Sleep(5 * time.Millisecond)
	}
	since := time.Now()
	vctx, vcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer vcancel()
	fo, err := c.Verify(vctx, since)
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "no verified reply to a request sent after the failover") {
		t.Fatalf("Verify: %v", err)
	}
	if fo.Conn != "L1" || fo.LastAckBefore.Index != 9 {
		t.Fatalf("failover view %+v", fo)
	}
	// Once Run has returned, nothing more can come: Verify says so at
	// once instead of waiting for its ctx.
	cancel()
	<-done
	done <- nil
	vctx, vcancel = context.WithTimeout(context.Background(), 20*time.Second)
	defer vcancel()
	if _, err := c.Verify(vctx, since); !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "checker stopped") {
		t.Fatalf("Verify after Run: %v", err)
	}
}

func TestVerifyWithoutServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: every dial is refused
	c, r, err := runChecker(t, Config{Addr: addr, Interval: 5 * time.Millisecond, ShortConns: 1}, func(r Report) bool {
		return r.Errors[KindDial] >= 3
	})
	if err != nil || r.Err() != nil || r.LongConns != 0 || r.Sent != 0 {
		t.Fatalf("an absent server is no violation: %v %+v", err, r)
	}
	if _, err := c.Verify(context.Background(), time.Now()); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Verify with no connection: %v", err)
	}
}

func TestOldServerIsRefusedClearly(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for n := 1; sc.Scan(); n++ {
					fmt.Fprintf(c, "seq=%d %s\n", n, sc.Text()) // the plain protocol
				}
			}()
		}
	}()
	_, r, err := runChecker(t, quickConfig(ln.Addr().String()), func(r Report) bool { return r.Errors[KindCorrupt] > 0 })
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "does not speak the checksummed protocol") || r.Sent != 0 {
		t.Fatalf("Run: %v, sent %d", err, r.Sent)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{}, `Addr ""`},
		{Config{Addr: "nohost"}, `Addr "nohost"`},
		{Config{Addr: "h:1", Interval: -1}, "Interval"},
		{Config{Addr: "h:1", Timeout: -1}, "Timeout"},
		{Config{Addr: "h:1", ShortConns: -1}, "ShortConns"},
		{Config{Addr: "h:1", ShortConns: 5000}, "ShortConns"},
		{Config{Addr: "h:1", ShortRequests: -2}, "ShortRequests"},
	} {
		if _, err := New(tc.cfg); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want ErrConfig naming %s", tc.cfg, err, tc.want)
		}
	}
	c, err := New(Config{Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Run(ctx); err != nil {
		t.Fatalf("Run on a cancelled ctx: %v", err)
	}
	if err := c.Run(ctx); err == nil {
		t.Fatal("second Run accepted")
	}
}
