package qmp

import (
	"context"
	"errors"
	"net"
	"strconv"
	"testing"
	"time"
)

var fuzzSeeds = []string{
	testGreeting,
	`{"return": {}, "id": 1}`,
	`{"return": {"status": "paused", "singlestep": false, "running": false}, "id": 7}`,
	`{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}`,
	`{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"bad\n'"}}`,
	`{"timestamp": {"seconds": 1795301820, "microseconds": 436209}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}`,
	`{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "STOP"}`,
	`{"event": "MIGRATION", "data": {"status": "completed"}}`,
	`{"return": "0x6b\r\n", "id": 2}`,
	`{"return": null, "id": 3}`,
	`{"return": {}, "id": "x"}`,
	`{"return": {}, "id": 18446744073709551615}`,
	`{"return": {}, "id": 99999999999999999999999}`,
	`{"return": {}, "event": "X"}`,
	`{"QMP": {}}`,
	`{"foo": 1}`,
	`[1]`,
	`{"return": {`,
	"\xff\xfe{}",
	`{"event": 1}`,
	`{"error": {"class": 1}}`,
	`{"return": {}, "id": 1}{"return": {}, "id": 2}`,
	"",
	"   \r\n",
}

// FuzzDecode: decodeMessage must never panic, must fail only with
// ErrProtocol, and what it accepts must be self-consistent.
func FuzzDecode(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		m, err := decodeMessage(line)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %v does not wrap ErrProtocol", err)
			}
			if len(err.Error()) > 512 {
				t.Fatalf("error message of %d bytes: snippets must stay short", len(err.Error()))
			}
			return
		}
		switch m.kind {
		case kindEvent:
			if m.event.Name == "" {
				t.Fatal("accepted an event without a name")
			}
		case kindReturn:
			if len(m.ret) == 0 {
				t.Fatal("accepted a reply without a return value")
			}
		case kindError:
			if m.errClass == "" && m.errDesc == "" {
				t.Fatal("accepted an error reply without class and desc")
			}
		case kindGreeting:
		default:
			t.Fatalf("accepted a message of kind %d", m.kind)
		}
		// JSON forbids leading zeros, so an id we accept must be the
		// canonical form of the number we would have sent.
		if id, ok := parseID(m.id); ok && strconv.FormatUint(id, 10) != string(m.id) {
			t.Fatalf("parseID(%s) = %d", m.id, id)
		}
	})
}

// FuzzClientStream plays arbitrary server output after a good handshake
// while a call is pending: the client must end the call and never hang or
// panic. Lines are separated by the fuzzer's own newlines.
func FuzzClientStream(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s + "\r\n"))
	}
	f.Add([]byte(`{"event": "STOP"}` + "\n" + `{"return": {}, "id": 2}` + "\n"))
	f.Add([]byte(`{"return": {}, "id": 1}` + "\n" + `{"return": {}, "id": 2}` + "\n"))
	f.Fuzz(func(t *testing.T, stream []byte) {
		cc, sc := net.Pipe()
		defer sc.Close()
		srv := newFakeServer(t, sc)
		go func() {
			if srv.handshake() != nil {
				return
			}
			if _, err := srv.read(); err != nil { // the pending call, id 2
				return
			}
			sc.Write(stream)
			sc.Close()
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := New(ctx, cc, WithEventBuffer(1))
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer c.Close()
		events, _ := c.Subscribe()
		err = c.Execute(ctx, "query-status", nil, nil)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatal("call hung on fuzzed input")
		}
		select {
		case <-c.Done():
		case <-ctx.Done():
			t.Fatal("connection not ended after the server closed")
		}
		if !errors.Is(c.Err(), ErrClosed) {
			t.Fatalf("Err() = %v, want ErrClosed", c.Err())
		}
		for range events { // closed when the connection ended
		}
	})
}
