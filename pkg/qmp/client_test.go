package qmp

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestHandshakeParsesGreeting(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error { return f.serve(func(fakeReq) error { return nil }) })
	g := c.Greeting()
	if g.Major != 7 || g.Minor != 2 || g.Micro != 22 || g.Package != "fake" {
		t.Errorf("greeting = %+v, want 7.2.22 fake", g)
	}
	if len(g.Capabilities) != 1 || g.Capabilities[0] != "oob" {
		t.Errorf("capabilities = %v, want [oob]", g.Capabilities)
	}
	if c.Err() != nil {
		t.Errorf("Err() = %v on an open connection", c.Err())
	}
}

func TestBadGreeting(t *testing.T) {
	cases := []struct {
		name  string
		lines []string // sent, then the server closes
		hang  bool     // send lines, then stay silent
		want  error
	}{
		{"garbage", []string{"hello there"}, false, ErrProtocol},
		{"json array", []string{`[1,2,3]`}, false, ErrProtocol},
		{"reply first", []string{`{"return": {}, "id": 1}`}, false, ErrProtocol},
		{"event first", []string{`{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`}, false, ErrProtocol},
		{"greeting without version", []string{`{"QMP": {"capabilities": []}}`}, false, ErrProtocol},
		{"eof", nil, false, ErrClosed},
		{"truncated", []string{`{"QMP": {"version"`}, false, ErrClosed},
		{"silent", nil, true, context.DeadlineExceeded},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cc, sc := net.Pipe()
			defer sc.Close()
			go func() {
				for i, l := range tc.lines {
					if tc.name == "truncated" && i == len(tc.lines)-1 {
						sc.Write([]byte(l)) // no newline: cut mid-message
						continue
					}
					sc.Write([]byte(l + "\r\n"))
				}
				if !tc.hang {
					sc.Close()
				}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			c, err := New(ctx, cc)
			if err == nil {
				c.Close()
				t.Fatal("New succeeded on a bad greeting")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("New error %q does not wrap %v", err, tc.want)
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestCapabilitiesErrorFailsNew(t *testing.T) {
	cc, sc := net.Pipe()
	defer sc.Close()
	f := newFakeServer(t, sc)
	go func() {
		f.send(testGreeting)
		req, err := f.read()
		if err == nil {
			f.replyError(req, "CommandNotFound", "no caps here")
		}
	}()
	_, err := New(ctxT(t, 5*time.Second), cc)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "qmp_capabilities" {
		t.Fatalf("New error = %v, want *Error CommandNotFound for qmp_capabilities", err)
	}
}

func TestEventBeforeCapabilitiesReply(t *testing.T) {
	cc, sc := net.Pipe()
	defer sc.Close()
	f := newFakeServer(t, sc)
	done := make(chan error, 1)
	go func() {
		done <- func() error {
			if err := f.send(testGreeting); err != nil {
				return err
			}
			req, err := f.read()
			if err != nil {
				return err
			}
			if err := f.event("RESET", map[string]any{"guest": false}); err != nil {
				return err
			}
			if err := f.reply(req, map[string]any{}); err != nil {
				return err
			}
			return f.serve(func(r fakeReq) error {
				if err := f.event("STOP", nil); err != nil {
					return err
				}
				return f.reply(r, map[string]any{"running": false, "status": "paused"})
			})
		}()
	}()
	c, err := New(ctxT(t, 5*time.Second), cc)
	if err != nil {
		t.Fatalf("New with an event before the capabilities reply: %v", err)
	}
	defer c.Close()
	events, cancel := c.Subscribe()
	defer cancel()
	st, err := c.QueryStatus(ctxT(t, 5*time.Second))
	if err != nil || st.Status != "paused" || st.Running {
		t.Fatalf("QueryStatus = %+v, %v; want paused", st, err)
	}
	ev := <-events // dispatched before the reply, so already buffered
	if ev.Name != "STOP" {
		t.Errorf("event %q, want STOP", ev.Name)
	}
	c.Close()
	if err := <-done; err != nil {
		t.Errorf("server: %v", err)
	}
}

// TestFatalInput feeds one bad message while a call is pending: the call and
// the connection must end with an error naming the problem.
func TestFatalInput(t *testing.T) {
	cases := []struct {
		name      string
		line      func(id json.RawMessage) string
		protocol  bool   // ErrProtocol expected (else only ErrClosed)
		wantInErr string // the error must name this
	}{
		{"garbage line", func(json.RawMessage) string { return "this is not json" }, true, "not a JSON object"},
		{"broken json", func(json.RawMessage) string { return `{"return": {` }, true, "bad JSON"},
		{"two objects on a line", func(id json.RawMessage) string { return `{"return": {}, "id": ` + string(id) + `}{"return": {}}` }, true, "bad JSON"},
		{"array", func(json.RawMessage) string { return `[{"return": {}}]` }, true, "not a JSON object"},
		{"unknown member", func(json.RawMessage) string { return `{"foo": 1}` }, true, "neither reply"},
		{"mixed kinds", func(id json.RawMessage) string { return `{"return": {}, "event": "STOP", "id": ` + string(id) + `}` }, true, "mixes"},
		{"reply without id", func(json.RawMessage) string { return `{"return": {}}` }, true, "without id"},
		{"error without id", func(json.RawMessage) string {
			return `{"error": {"class": "GenericError", "desc": "JSON parse error"}}`
		}, true, "without id"},
		{"unknown string id", func(json.RawMessage) string { return `{"return": {}, "id": "nope"}` }, true, "unknown id"},
		{"never sent id", func(json.RawMessage) string { return `{"return": {}, "id": 987654}` }, true, "unknown id"},
		{"negative id", func(json.RawMessage) string { return `{"return": {}, "id": -1}` }, true, "unknown id"},
		{"second greeting", func(json.RawMessage) string { return testGreeting }, true, "second greeting"},
		{"empty event name", func(json.RawMessage) string { return `{"event": ""}` }, true, "empty name"},
		{"event name not string", func(json.RawMessage) string { return `{"event": 5}` }, true, "bad JSON"},
		{"empty error", func(id json.RawMessage) string { return `{"error": {}, "id": ` + string(id) + `}` }, true, "without class"},
		{"truncated then eof", func(json.RawMessage) string { return `{"return": {}, "id"` }, false, "middle of a message"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := startFake(t, func(f *fakeServer) error {
				req, err := f.read()
				if err != nil {
					return err
				}
				line := tc.line(req.ID)
				if tc.name == "truncated then eof" {
					f.conn.Write([]byte(line))
					return f.conn.Close()
				}
				if err := f.send(line); err != nil {
					return nil // the client may close before reading it all
				}
				return f.serve(func(fakeReq) error { return nil })
			})
			events, _ := c.Subscribe()
			err := c.Execute(ctxT(t, 5*time.Second), "query-status", nil, nil)
			if err == nil {
				t.Fatal("Execute succeeded despite bad input")
			}
			if !errors.Is(err, ErrClosed) || errors.Is(err, ErrProtocol) != tc.protocol {
				t.Fatalf("Execute error %q: want ErrClosed, ErrProtocol=%v", err, tc.protocol)
			}
			if !strings.Contains(err.Error(), tc.wantInErr) {
				t.Errorf("error %q does not name %q", err, tc.wantInErr)
			}
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("Done not closed after fatal input")
			}
			if !errors.Is(c.Err(), ErrClosed) {
				t.Errorf("Err() = %v, want ErrClosed", c.Err())
			}
			if _, ok := <-events; ok {
				t.Error("subscriber channel still open after the connection ended")
			}
			// Later calls fail at once with the same cause.
			err2 := c.Execute(ctxT(t, 5*time.Second), "query-status", nil, nil)
			if !errors.Is(err2, ErrClosed) || !strings.Contains(err2.Error(), tc.wantInErr) {
				t.Errorf("call after failure: %v", err2)
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestDropMidCommandFailsAllPending(t *testing.T) {
	const n = 5
	got := make(chan struct{})
	c := startFake(t, func(f *fakeServer) error {
		for range n {
			if _, err := f.read(); err != nil {
				return err
			}
		}
		close(got)
		return f.conn.Close()
	})
	errs := make(chan error, n)
	for range n {
		go func() { errs <- c.Execute(ctxT(t, 10*time.Second), "stop", nil, nil) }()
	}
	<-got
	for range n {
		err := <-errs
		if !errors.Is(err, ErrClosed) || errors.Is(err, ErrProtocol) {
			t.Errorf("pending call error = %v, want ErrClosed only", err)
		}
	}
	<-c.Done()
	if c.pendingCount() != 0 {
		t.Errorf("%d pending entries left", c.pendingCount())
	}
}

func TestNoReplyDeadlineThenLateReplyIgnored(t *testing.T) {
	late := make(chan fakeReq, 1)
	sendLate := make(chan struct{})
	c := startFake(t, func(f *fakeServer) error {
		req, err := f.read()
		if err != nil {
			return err
		}
		late <- req
		<-sendLate
		// The late reply comes first, then the answer to the next call.
		if err := f.reply(req, map[string]any{"status": "LATE", "running": true}); err != nil {
			return err
		}
		return f.serve(func(r fakeReq) error {
			return f.reply(r, map[string]any{"status": "paused", "running": false})
		})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := c.QueryStatus(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("QueryStatus without a reply: %v, want DeadlineExceeded", err)
	}
	if !strings.Contains(err.Error(), "query-status") {
		t.Errorf("error %q does not name the command", err)
	}
	if n := c.pendingCount(); n != 0 {
		t.Errorf("%d pending entries after the deadline, want 0", n)
	}
	<-late
	close(sendLate)
	st, err := c.QueryStatus(ctxT(t, 5*time.Second))
	if err != nil || st.Status != "paused" {
		t.Fatalf("call after a late reply: %+v, %v; want paused (late reply must be ignored)", st, err)
	}
	if c.Err() != nil {
		t.Errorf("late reply ended the connection: %v", c.Err())
	}
}

func TestCancelWhileWaiting(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error { return f.serve(func(fakeReq) error { return nil }) })
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(ctx, "query-status", nil, nil) }()
	for c.pendingCount() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("error = %v, want Canceled", err)
	}
	if c.pendingCount() != 0 {
		t.Error("pending entry not cleaned up after cancel")
	}
}

func TestErrorReplyKeepsClass(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error {
			return f.replyError(r, "DeviceNotFound", "Device 'x' not found")
		})
	})
	err := c.Execute(ctxT(t, 5*time.Second), "device_del", map[string]string{"id": "x"}, nil)
	wrapped := fmt.Errorf("outer: %w", err)
	var qe *Error
	if !errors.As(wrapped, &qe) {
		t.Fatalf("errors.As(*Error) failed on %v", err)
	}
	if qe.Class != "DeviceNotFound" || qe.Desc != "Device 'x' not found" || qe.Command != "device_del" {
		t.Errorf("Error = %+v", qe)
	}
	if !strings.Contains(err.Error(), "DeviceNotFound") || !strings.Contains(err.Error(), "device_del") {
		t.Errorf("Error() = %q lacks class or command", err)
	}
	if c.Err() != nil {
		t.Errorf("an error reply ended the connection: %v", c.Err())
	}
}

// TestRepliesMatchedByID has the server answer a batch of calls in reverse
// order: each caller must still get its own answer.
func TestRepliesMatchedByID(t *testing.T) {
	const n = 50
	c := startFake(t, func(f *fakeServer) error {
		var reqs []fakeReq
		for range n {
			r, err := f.read()
			if err != nil {
				return err
			}
			reqs = append(reqs, r)
		}
		for i := len(reqs) - 1; i >= 0; i-- {
			var a struct{ N int }
			if err := json.Unmarshal(reqs[i].Arguments, &a); err != nil {
				return err
			}
			if err := f.reply(reqs[i], map[string]int{"echo": a.N * 3}); err != nil {
				return err
			}
		}
		return f.serve(func(fakeReq) error { return nil })
	})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			var r struct{ Echo int }
			if err := c.Execute(ctxT(t, 10*time.Second), "echo", map[string]int{"n": i}, &r); err != nil {
				t.Errorf("caller %d: %v", i, err)
				return
			}
			if r.Echo != i*3 {
				t.Errorf("caller %d got echo %d, want %d", i, r.Echo, i*3)
			}
		})
	}
	wg.Wait()
}

func TestHugeReply(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 6<<20/16) // 6 MiB
	big[12345] = 'Z'                                          // not just a repeating pattern
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error { return f.reply(r, string(big)) })
	})
	var got string
	if err := c.Execute(ctxT(t, 20*time.Second), "human-monitor-command", nil, &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(big) || sha256.Sum256([]byte(got)) != sha256.Sum256(big) {
		t.Fatalf("reply of %d bytes differs from the %d bytes sent", len(got), len(big))
	}
	// The connection keeps working after a huge message.
	if err := c.Execute(ctxT(t, 20*time.Second), "again", nil, &got); err != nil || len(got) != len(big) {
		t.Fatalf("second huge reply: %d bytes, %v", len(got), err)
	}
}

func TestMaxMessageSize(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error {
			f.reply(r, strings.Repeat("x", 1<<20))
			return nil
		})
	}, WithMaxMessageSize(64<<10))
	err := c.Execute(ctxT(t, 5*time.Second), "big", nil, nil)
	if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "longer than 65536") {
		t.Fatalf("error = %v, want ErrProtocol naming the limit", err)
	}
}

func TestResultTypeMismatchIsNotFatal(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error {
			if r.Execute == "query-status" {
				return f.reply(r, map[string]any{"running": false, "status": "paused"})
			}
			return f.reply(r, "a string")
		})
	})
	var n int
	err := c.Execute(ctxT(t, 5*time.Second), "odd", nil, &n)
	if !errors.Is(err, ErrProtocol) || errors.Is(err, ErrClosed) {
		t.Fatalf("error = %v, want ErrProtocol without ErrClosed", err)
	}
	if _, err := c.QueryStatus(ctxT(t, 5*time.Second)); err != nil {
		t.Fatalf("connection unusable after a decode mismatch: %v", err)
	}
}

// TestSlowSubscriberDoesNotStallReplies floods events at a subscriber that
// never reads; the reply behind them must still arrive.
func TestSlowSubscriberDoesNotStallReplies(t *testing.T) {
	const buf, flood = 4, 1000
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error {
			for i := range flood {
				if err := f.event("NOISE", map[string]int{"seq": i}); err != nil {
					return err
				}
			}
			return f.reply(r, map[string]any{"running": true, "status": "running"})
		})
	}, WithEventBuffer(buf))
	slow, cancel := c.Subscribe("NOISE")
	defer cancel()
	st, err := c.QueryStatus(ctxT(t, 20*time.Second))
	if err != nil || !st.Running {
		t.Fatalf("QueryStatus behind %d events: %+v, %v", flood, st, err)
	}
	if got := c.DroppedEvents(); got != flood-buf {
		t.Errorf("DroppedEvents = %d, want %d", got, flood-buf)
	}
	for i := range buf {
		ev := <-slow
		var d struct{ Seq int }
		if err := json.Unmarshal(ev.Data, &d); err != nil || d.Seq != i {
			t.Errorf("buffered event %d: seq %d, %v", i, d.Seq, err)
		}
	}
	select {
	case ev := <-slow:
		t.Errorf("unexpected extra event %+v", ev)
	default:
	}
}

func TestSubscribeFilterCancelAndTimestamp(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error {
			for _, n := range []string{"STOP", "RESUME", "STOP"} {
				if err := f.event(n, nil); err != nil {
					return err
				}
			}
			return f.reply(r, map[string]any{})
		})
	})
	stops, cancelStops := c.Subscribe("STOP")
	all, cancelAll := c.Subscribe()
	if err := c.Execute(ctxT(t, 5*time.Second), "sync", nil, nil); err != nil {
		t.Fatal(err)
	}
	var names []string
	for range 3 {
		names = append(names, (<-all).Name)
	}
	if strings.Join(names, ",") != "STOP,RESUME,STOP" {
		t.Errorf("all-events subscriber got %v", names)
	}
	for range 2 {
		ev := <-stops
		if ev.Name != "STOP" {
			t.Errorf("STOP subscriber got %q", ev.Name)
		}
		if want := time.Unix(1700000000, 250000000); !ev.Timestamp.Equal(want) {
			t.Errorf("timestamp %v, want %v", ev.Timestamp, want)
		}
		if ev.Data != nil {
			t.Errorf("event without data has Data %q", ev.Data)
		}
	}
	cancelStops()
	cancelStops() // idempotent
	if _, ok := <-stops; ok {
		t.Error("channel open after cancel")
	}
	// A cancelled subscriber gets nothing more and counts no drops.
	if err := c.Execute(ctxT(t, 5*time.Second), "sync", nil, nil); err != nil {
		t.Fatal(err)
	}
	if c.DroppedEvents() != 0 {
		t.Errorf("DroppedEvents = %d, want 0", c.DroppedEvents())
	}
	cancelAll()
}

func TestCloseFailsPendingAndClosesSubscribers(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error { return f.serve(func(fakeReq) error { return nil }) })
	events, _ := c.Subscribe()
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(ctxT(t, 10*time.Second), "stop", nil, nil) }()
	for c.pendingCount() == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("pending call after Close: %v, want ErrClosed", err)
	}
	if _, ok := <-events; ok {
		t.Error("subscriber channel open after Close")
	}
	late, cancel := c.Subscribe("STOP")
	cancel()
	if _, ok := <-late; ok {
		t.Error("Subscribe after Close returned an open channel")
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := c.Stop(ctxT(t, time.Second)); !errors.Is(err, ErrClosed) {
		t.Errorf("Stop after Close: %v", err)
	}
}

func TestBadArguments(t *testing.T) {
	var seen []fakeReq
	var mu sync.Mutex
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error {
			mu.Lock()
			seen = append(seen, r)
			mu.Unlock()
			return f.reply(r, map[string]any{})
		})
	})
	ctx := ctxT(t, 5*time.Second)
	if err := c.Execute(ctx, "", nil, nil); err == nil || !strings.Contains(err.Error(), "empty command") {
		t.Errorf("empty command: %v", err)
	}
	if err := c.Execute(ctx, "x", make(chan int), nil); err == nil || !strings.Contains(err.Error(), "encoding arguments") {
		t.Errorf("unencodable args: %v", err)
	}
	if err := c.Execute(ctx, "x", []int{1}, nil); err == nil || !strings.Contains(err.Error(), "JSON object") {
		t.Errorf("array args: %v", err)
	}
	if err := c.Execute(ctx, "x", json.RawMessage(`{bad`), nil); err == nil {
		t.Error("invalid raw JSON args accepted")
	}
	var nilMap map[string]any
	if err := c.Execute(ctx, "noargs", nilMap, nil); err != nil {
		t.Fatalf("nil map args: %v", err)
	}
	for _, bad := range []func() error{
		func() error { return c.Migrate(ctx, "") },
		func() error { return c.MigrateIncoming(ctx, "") },
		func() error { return c.GetFD(ctx, "", 0) },
		func() error { return c.CloseFD(ctx, "") },
		func() error { return c.SetMigrationCapabilities(ctx, nil) },
		func() error { return c.SetMigrationCapabilities(ctx, map[string]bool{"": true}) },
		func() error { return c.SetMigrationParameters(ctx, nil) },
		func() error { return c.RemoveFD(ctx, -1, 0) },
		func() error { return c.AnnounceSelfWith(ctx, AnnounceParams{}) },
		func() error { return c.ExecuteFD(ctx, "getfd", nil, -1, nil) },
		func() error { _, err := c.HumanMonitorCommand(ctx, ""); return err },
	} {
		if err := bad(); err == nil {
			t.Error("bad input accepted")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 1 || seen[0].Execute != "noargs" || bytes.Contains(seen[0].raw, []byte("arguments")) {
		t.Errorf("server saw %d requests (want only noargs, without arguments): %+v", len(seen), seen)
	}
}

// TestBlockedWriteHonoursDeadline: a server that stops reading must not
// hang a caller; once it reads again the connection still works.
func TestBlockedWriteHonoursDeadline(t *testing.T) {
	resume := make(chan struct{})
	c := startFake(t, func(f *fakeServer) error {
		<-resume
		return f.serve(func(r fakeReq) error { return f.reply(r, map[string]any{}) })
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := c.Execute(ctx, "stop", nil, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("blocked write: %v, want DeadlineExceeded", err)
	}
	cctx, ccancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(cctx, "stop", nil, nil) }()
	time.Sleep(20 * time.Millisecond)
	ccancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("blocked write cancelled: %v, want Canceled", err)
	}
	if c.Err() != nil {
		t.Fatalf("connection ended by a write that never started: %v", c.Err())
	}
	close(resume)
	if err := c.Execute(ctxT(t, 5*time.Second), "cont", nil, nil); err != nil {
		t.Fatalf("call after the server resumed reading: %v", err)
	}
}

func TestExecuteFDNeedsUnixSocket(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error { return f.serve(func(fakeReq) error { return nil }) })
	err := c.GetFD(ctxT(t, time.Second), "x", 0)
	if !errors.Is(err, errors.ErrUnsupported) || !strings.Contains(err.Error(), "unix socket") {
		t.Fatalf("GetFD over net.Pipe: %v, want ErrUnsupported", err)
	}
}

// TestExecuteFDPassesDescriptor checks that the fd arrives with the request
// bytes and is usable by the receiver.
func TestExecuteFDPassesDescriptor(t *testing.T) {
	cc, sc := unixPair(t)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	pr := os.NewFile(uintptr(p[0]), "pipe-r")
	pw := os.NewFile(uintptr(p[1]), "pipe-w")
	defer pr.Close()
	defer pw.Close()

	c := startFakeConn(t, cc, sc, func(f *fakeServer) error {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(4*4))
		n, oobn, _, _, err := sc.ReadMsgUnix(buf, oob)
		if err != nil {
			return err
		}
		var req fakeReq
		if err := json.Unmarshal(bytes.TrimSpace(buf[:n]), &req); err != nil {
			return fmt.Errorf("request %q: %w", buf[:n], err)
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			return fmt.Errorf("control messages %d, %v", len(msgs), err)
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			return fmt.Errorf("rights %v, %v", fds, err)
		}
		got := os.NewFile(uintptr(fds[0]), "passed")
		_, werr := got.Write([]byte("through the passed fd"))
		got.Close()
		if werr != nil {
			return werr
		}
		if req.Execute != "getfd" || string(req.Arguments) != `{"fdname":"mig"}` {
			return f.replyError(req, "GenericError", "unexpected request "+string(buf[:n]))
		}
		if err := f.reply(req, map[string]any{}); err != nil {
			return err
		}
		return f.serve(func(fakeReq) error { return nil })
	})
	if err := c.GetFD(ctxT(t, 5*time.Second), "mig", int(pw.Fd())); err != nil {
		t.Fatalf("GetFD: %v", err)
	}
	pw.Close()
	buf := make([]byte, 64)
	n, _ := pr.Read(buf)
	if string(buf[:n]) != "through the passed fd" {
		t.Fatalf("read %q from the pipe, want the server's message", buf[:n])
	}
}

func TestQuit(t *testing.T) {
	t.Run("reply then close", func(t *testing.T) {
		c := startFake(t, func(f *fakeServer) error {
			r, err := f.read()
			if err != nil {
				return err
			}
			f.event("SHUTDOWN", map[string]any{"guest": false})
			f.reply(r, map[string]any{})
			return f.conn.Close()
		})
		if err := c.Quit(ctxT(t, 5*time.Second)); err != nil {
			t.Fatalf("Quit: %v", err)
		}
		<-c.Done()
	})
	t.Run("close without reply", func(t *testing.T) {
		c := startFake(t, func(f *fakeServer) error {
			if _, err := f.read(); err != nil {
				return err
			}
			return f.conn.Close()
		})
		if err := c.Quit(ctxT(t, 5*time.Second)); err != nil {
			t.Fatalf("Quit when QEMU exits before replying: %v", err)
		}
	})
	t.Run("error reply", func(t *testing.T) {
		c := startFake(t, func(f *fakeServer) error {
			return f.serve(func(r fakeReq) error { return f.replyError(r, "GenericError", "no") })
		})
		var qe *Error
		if err := c.Quit(ctxT(t, 5*time.Second)); !errors.As(err, &qe) {
			t.Fatalf("Quit with an error reply: %v", err)
		}
	})
	t.Run("already closed", func(t *testing.T) {
		c := startFake(t, nil)
		c.Close()
		if err := c.Quit(ctxT(t, 5*time.Second)); !errors.Is(err, ErrClosed) {
			t.Fatalf("Quit on a closed client: %v, want ErrClosed", err)
		}
	})
}

// TestTypedHelpersWireFormat checks the exact request each helper sends and
// how it reads the reply.
func TestTypedHelpersWireFormat(t *testing.T) {
	type call struct {
		name    string
		run     func(ctx context.Context, c *Client) (any, error)
		execute string
		args    string // exact JSON, "" for none
		reply   string // JSON return value
		want    any
	}
	calls := []call{
		{"stop", func(ctx context.Context, c *Client) (any, error) { return nil, c.Stop(ctx) }, "stop", "", `{}`, nil},
		{"cont", func(ctx context.Context, c *Client) (any, error) { return nil, c.Cont(ctx) }, "cont", "", `{}`, nil},
		{"status", func(ctx context.Context, c *Client) (any, error) { return c.QueryStatus(ctx) },
			"query-status", "", `{"status":"running","singlestep":false,"running":true}`, Status{Running: true, Status: "running"}},
		{"caps", func(ctx context.Context, c *Client) (any, error) {
			return nil, c.SetMigrationCapabilities(ctx, map[string]bool{"x-ignore-shared": true, "events": false})
		}, "migrate-set-capabilities", `{"capabilities":[{"capability":"events","state":false},{"capability":"x-ignore-shared","state":true}]}`, `{}`, nil},
		{"params", func(ctx context.Context, c *Client) (any, error) {
			return nil, c.SetMigrationParameters(ctx, map[string]any{"downtime-limit": 1, "max-bandwidth": int64(1) << 40})
		}, "migrate-set-parameters", `{"downtime-limit":1,"max-bandwidth":1099511627776}`, `{}`, nil},
		{"migrate", func(ctx context.Context, c *Client) (any, error) { return nil, c.Migrate(ctx, "unix:/tmp/x") },
			"migrate", `{"uri":"unix:/tmp/x"}`, `{}`, nil},
		{"incoming", func(ctx context.Context, c *Client) (any, error) { return nil, c.MigrateIncoming(ctx, "fd:in") },
			"migrate-incoming", `{"uri":"fd:in"}`, `{}`, nil},
		{"cancel", func(ctx context.Context, c *Client) (any, error) { return nil, c.MigrateCancel(ctx) },
			"migrate_cancel", "", `{}`, nil},
		{"query-migrate", func(ctx context.Context, c *Client) (any, error) {
			i, err := c.QueryMigrate(ctx)
			i.Raw = nil
			return i, err
		}, "query-migrate", "",
			`{"status":"completed","total-time":12,"downtime":3,"setup-time":1,"ram":{"transferred":4096,"remaining":0,"total":67108864,"dirty-sync-count":2,"mbps":9.5}}`,
			MigrationInfo{Status: "completed", TotalTime: 12 * time.Millisecond, Downtime: 3 * time.Millisecond,
				SetupTime: time.Millisecond, TransferredBytes: 4096, TotalBytes: 64 << 20, DirtySyncCount: 2, MBps: 9.5}},
		{"query-migrate empty", func(ctx context.Context, c *Client) (any, error) {
			i, err := c.QueryMigrate(ctx)
			i.Raw = nil
			return i, err
		}, "query-migrate", "", `{}`, MigrationInfo{}},
		{"announce", func(ctx context.Context, c *Client) (any, error) { return nil, c.AnnounceSelf(ctx) },
			"announce-self", `{"initial":50,"max":550,"rounds":5,"step":100}`, `{}`, nil},
		{"announce with", func(ctx context.Context, c *Client) (any, error) {
			return nil, c.AnnounceSelfWith(ctx, AnnounceParams{Initial: time.Millisecond, Max: 2 * time.Millisecond,
				Step: time.Millisecond, Rounds: 1, Interfaces: []string{"n0"}, ID: "a"})
		}, "announce-self", `{"id":"a","initial":1,"interfaces":["n0"],"max":2,"rounds":1,"step":1}`, `{}`, nil},
		{"closefd", func(ctx context.Context, c *Client) (any, error) { return nil, c.CloseFD(ctx, "mig") },
			"closefd", `{"fdname":"mig"}`, `{}`, nil},
		{"remove-fd", func(ctx context.Context, c *Client) (any, error) { return nil, c.RemoveFD(ctx, 3, 7) },
			"remove-fd", `{"fd":7,"fdset-id":3}`, `{}`, nil},
		{"remove-fdset", func(ctx context.Context, c *Client) (any, error) { return nil, c.RemoveFD(ctx, 3, -1) },
			"remove-fd", `{"fdset-id":3}`, `{}`, nil},
		{"fdsets", func(ctx context.Context, c *Client) (any, error) { return c.QueryFDSets(ctx) },
			"query-fdsets", "", `[{"fdset-id":1,"fds":[{"fd":25,"opaque":"o"},{"fd":26}]}]`,
			[]FDSet{{ID: 1, FDs: []FDSetEntry{{25, "o"}, {26, ""}}}}},
		{"hmp", func(ctx context.Context, c *Client) (any, error) { return c.HumanMonitorCommand(ctx, "info status") },
			"human-monitor-command", `{"command-line":"info status"}`, `"VM status: paused\r\n"`, "VM status: paused\r\n"},
	}
	for _, tc := range calls {
		t.Run(tc.name, func(t *testing.T) {
			reqc := make(chan fakeReq, 1)
			c := startFake(t, func(f *fakeServer) error {
				return f.serve(func(r fakeReq) error {
					reqc <- r
					return f.send(`{"return": ` + tc.reply + `, "id": ` + string(r.ID) + `}`)
				})
			})
			got, err := tc.run(ctxT(t, 5*time.Second), c)
			if err != nil {
				t.Fatal(err)
			}
			r := <-reqc
			if r.Execute != tc.execute || string(r.Arguments) != tc.args {
				t.Errorf("sent execute %q arguments %s, want %q %s", r.Execute, r.Arguments, tc.execute, tc.args)
			}
			if tc.want != nil && fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestTypedHelpersRejectBadReplies(t *testing.T) {
	c := startFake(t, func(f *fakeServer) error {
		return f.serve(func(r fakeReq) error {
			switch r.Execute {
			case "query-status":
				return f.reply(r, map[string]any{"running": true})
			case "query-migrate":
				return f.reply(r, map[string]any{"status": 5})
			}
			return f.reply(r, []int{1})
		})
	})
	ctx := ctxT(t, 5*time.Second)
	if _, err := c.QueryStatus(ctx); !errors.Is(err, ErrProtocol) {
		t.Errorf("query-status without status: %v", err)
	}
	if _, err := c.QueryMigrate(ctx); !errors.Is(err, ErrProtocol) {
		t.Errorf("query-migrate with numeric status: %v", err)
	}
	if _, err := c.QueryFDSets(ctx); err != nil {
		// a list of numbers is not a list of fd sets
		if !errors.Is(err, ErrProtocol) {
			t.Errorf("query-fdsets: %v", err)
		}
	} else {
		t.Error("query-fdsets accepted [1]")
	}
}

// migrateScript answers query-migrate with statuses in turn (the last one
// repeats) and sends a MIGRATION event before the reply whose index is
// eventAt (-1: never).
func migrateScript(statuses []string, eventAt int, extra map[string]any) func(f *fakeServer) error {
	return func(f *fakeServer) error {
		i := 0
		return f.serve(func(r fakeReq) error {
			if r.Execute != "query-migrate" {
				return f.replyError(r, "CommandNotFound", r.Execute)
			}
			st := statuses[min(i, len(statuses)-1)]
			if i == eventAt {
				if err := f.event("MIGRATION", map[string]string{"status": st}); err != nil {
					return err
				}
			}
			i++
			ret := map[string]any{"status": st}
			if st != "active" {
				for k, v := range extra {
					ret[k] = v
				}
			}
			return f.reply(r, ret)
		})
	}
}

func TestWaitMigration(t *testing.T) {
	t.Run("polling", func(t *testing.T) {
		c := startFake(t, migrateScript([]string{"setup", "active", "active", "completed"}, -1,
			map[string]any{"total-time": 7}))
		info, err := c.WaitMigration(ctxT(t, 10*time.Second))
		if err != nil || info.Status != "completed" || info.TotalTime != 7*time.Millisecond {
			t.Fatalf("WaitMigration = %+v, %v", info, err)
		}
	})
	t.Run("event wakes the waiter", func(t *testing.T) {
		// With a one-hour poll interval only the event can end the wait.
		fire := make(chan struct{})
		statusReplied := make(chan struct{})
		c := startFake(t, func(f *fakeServer) error {
			n := 0
			return f.serve(func(r fakeReq) error {
				n++
				if n > 1 {
					return f.reply(r, map[string]any{"status": "completed", "downtime": 2})
				}
				if err := f.reply(r, map[string]any{"status": "active"}); err != nil {
					return err
				}
				close(statusReplied)
				go func() {
					<-fire
					// A non-final status must not end the wait; a final one must.
					f.event("MIGRATION", map[string]string{"status": "device"})
					f.event("MIGRATION", map[string]string{"status": "completed"})
				}()
				return nil
			})
		}, withMigratePoll(time.Hour, time.Hour))
		type result struct {
			info MigrationInfo
			err  error
		}
		res := make(chan result, 1)
		go func() {
			i, err := c.WaitMigration(ctxT(t, 10*time.Second))
			res <- result{i, err}
		}()
		<-statusReplied
		select {
		case r := <-res:
			t.Fatalf("WaitMigration returned before any event: %+v, %v", r.info, r.err)
		case <-time.After(20 * time.Millisecond):
		}
		close(fire)
		r := <-res
		if r.err != nil || r.info.Status != "completed" || r.info.Downtime != 2*time.Millisecond {
			t.Fatalf("WaitMigration = %+v, %v; want completed with downtime 2ms", r.info, r.err)
		}
	})
	t.Run("failed", func(t *testing.T) {
		c := startFake(t, migrateScript([]string{"active", "failed"}, 1,
			map[string]any{"error-desc": "Unable to write to socket: Broken pipe"}))
		info, err := c.WaitMigration(ctxT(t, 10*time.Second))
		if !errors.Is(err, ErrMigrationFailed) || !strings.Contains(err.Error(), "Broken pipe") || info.Status != "failed" {
			t.Fatalf("WaitMigration = %+v, %v; want ErrMigrationFailed with error-desc", info, err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		c := startFake(t, migrateScript([]string{"cancelling", "cancelled"}, -1, nil))
		_, err := c.WaitMigration(ctxT(t, 10*time.Second))
		if !errors.Is(err, ErrMigrationFailed) || !strings.Contains(err.Error(), "cancelled") {
			t.Fatalf("WaitMigration = %v, want ErrMigrationFailed (cancelled)", err)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		c := startFake(t, migrateScript([]string{"active"}, -1, nil))
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Millisecond)
		defer cancel()
		info, err := c.WaitMigration(ctx)
		if !errors.Is(err, context.DeadlineExceeded) || info.Status != "active" {
			t.Fatalf("WaitMigration = %+v, %v; want DeadlineExceeded with last status active", info, err)
		}
	})
	t.Run("connection drops", func(t *testing.T) {
		c := startFake(t, func(f *fakeServer) error {
			r, err := f.read()
			if err != nil {
				return err
			}
			f.reply(r, map[string]any{"status": "active"})
			return f.conn.Close()
		})
		_, err := c.WaitMigration(ctxT(t, 10*time.Second))
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("WaitMigration on a dropped connection: %v, want ErrClosed", err)
		}
	})
}
