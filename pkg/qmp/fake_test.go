package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// withMigratePoll overrides WaitMigration's poll intervals.
func withMigratePoll(lo, hi time.Duration) Option {
	return func(o *options) { o.pollMin, o.pollMax = lo, hi }
}

// pendingCount reports how many calls wait for a reply.
func (c *Client) pendingCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending)
}

const testGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}`

// fakeServer is the server end of a scripted QMP conversation.
type fakeServer struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
	wmu  sync.Mutex
}

// fakeReq is a request as the server sees it.
type fakeReq struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
	raw       []byte
}

func newFakeServer(t testing.TB, conn net.Conn) *fakeServer {
	return &fakeServer{t: t, conn: conn, r: bufio.NewReader(conn)}
}

// send writes one raw line (QEMU ends lines with CRLF).
func (f *fakeServer) send(line string) error {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	_, err := f.conn.Write([]byte(line + "\r\n"))
	return err
}

func (f *fakeServer) sendJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return f.send(string(b))
}

func (f *fakeServer) read() (fakeReq, error) {
	line, err := f.r.ReadBytes('\n')
	if err != nil {
		return fakeReq{}, err
	}
	var req fakeReq
	if err := json.Unmarshal(line, &req); err != nil {
		return fakeReq{}, fmt.Errorf("client sent bad JSON %q: %w", line, err)
	}
	req.raw = line
	return req, nil
}

func (f *fakeServer) reply(req fakeReq, ret any) error {
	return f.sendJSON(map[string]any{"return": ret, "id": req.ID})
}

func (f *fakeServer) replyError(req fakeReq, class, desc string) error {
	return f.sendJSON(map[string]any{"error": map[string]string{"class": class, "desc": desc}, "id": req.ID})
}

func (f *fakeServer) event(name string, data any) error {
	return f.sendJSON(map[string]any{
		"event": name, "data": data,
		"timestamp": map[string]int64{"seconds": 1700000000, "microseconds": 250000},
	})
}

// handshake plays the server side of greeting and qmp_capabilities.
func (f *fakeServer) handshake() error {
	if err := f.send(testGreeting); err != nil {
		return err
	}
	req, err := f.read()
	if err != nil {
		return err
	}
	if req.Execute != "qmp_capabilities" {
		return fmt.Errorf("first command %q, want qmp_capabilities", req.Execute)
	}
	return f.reply(req, map[string]any{})
}

// serve answers every request with handle until the client goes away.
func (f *fakeServer) serve(handle func(req fakeReq) error) error {
	for {
		req, err := f.read()
		if err != nil {
			return nil // client closed
		}
		if err := handle(req); err != nil {
			return err
		}
	}
}

// startFake connects a client to a scripted server over net.Pipe. script
// runs after the handshake; its error fails the test. Everything is torn
// down at cleanup.
func startFake(t testing.TB, script func(f *fakeServer) error, opts ...Option) *Client {
	t.Helper()
	cc, sc := net.Pipe()
	return startFakeConn(t, cc, sc, script, opts...)
}

func startFakeConn(t testing.TB, cc, sc net.Conn, script func(f *fakeServer) error, opts ...Option) *Client {
	t.Helper()
	f := newFakeServer(t, sc)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := f.handshake(); err != nil {
			t.Errorf("fake server handshake: %v", err)
			return
		}
		if script != nil {
			if err := script(f); err != nil {
				t.Errorf("fake server: %v", err)
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := New(ctx, cc, opts...)
	if err != nil {
		sc.Close()
		<-done
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		sc.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("fake server script did not finish")
		}
	})
	return c
}

// unixPair returns two connected unix stream sockets.
func unixPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	conv := func(fd int, name string) *net.UnixConn {
		f := os.NewFile(uintptr(fd), name)
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatalf("FileConn: %v", err)
		}
		return c.(*net.UnixConn)
	}
	a, b := conv(fds[0], "a"), conv(fds[1], "b")
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// ctxT is a test context bounded well below go test's own timeout, so a
// hang becomes a clear failure.
func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
