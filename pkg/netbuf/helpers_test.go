package netbuf

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// testEtherType is IEEE 802 "local experimental" 1: frames of this type
// belong to the test; anything else the kernel sends on a tap is ignored.
const testEtherType = 0x88b5

var guestMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0xab, 0xcd, 0xef}

// mkFrame builds a test frame of size bytes (at least MinFrameSize) whose
// payload starts with seq when there is room for it.
func mkFrame(seq uint64, size int) []byte {
	f := make([]byte, max(size, MinFrameSize))
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], guestMAC)
	binary.BigEndian.PutUint16(f[12:14], testEtherType)
	if size >= 22 {
		binary.BigEndian.PutUint64(f[14:22], seq)
	}
	for i := 22; i < size; i++ {
		f[i] = byte(seq) ^ byte(i)
	}
	return f
}

func frameSeq(f []byte) uint64 {
	if len(f) < 22 {
		return ^uint64(0)
	}
	return binary.BigEndian.Uint64(f[14:22])
}

func isTestFrame(f []byte) bool {
	return len(f) >= 22 && binary.BigEndian.Uint16(f[12:14]) == testEtherType
}

// testLogger sends the buffer's log to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// testCtx is bounded well under the package's time budget.
func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// served is a Buffer with Serve running on an in-memory host port.
type served struct {
	b    *Buffer
	sock string
	// world is the other end of the buffer's host port: what the
	// network sees, and where world-to-guest frames come from.
	world Port
	errc  chan error
}

func serveBuffer(t *testing.T, o Options) *served {
	t.Helper()
	hostSide, world := Pipe()
	sock := filepath.Join(t.TempDir(), "nic.sock")
	if o.Logger == nil {
		o.Logger = testLogger(t)
	}
	b, err := New(sock, hostSide, o)
	if err != nil {
		t.Fatal(err)
	}
	s := &served{b: b, sock: sock, world: world, errc: make(chan error, 1)}
	go func() { s.errc <- b.Serve(context.Background()) }()
	t.Cleanup(func() {
		b.Close()
		select {
		case err := <-s.errc:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after Close")
		}
		hostSide.Close()
		world.Close()
	})
	return s
}

// expectWorld reads the next frames from the world side and checks their
// sequence numbers.
func (s *served) expectWorld(t *testing.T, seqs ...uint64) {
	t.Helper()
	buf := make([]byte, MaxFrameSize)
	for _, want := range seqs {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		n, err := s.world.ReadFrame(ctx, buf)
		cancel()
		if err != nil {
			t.Fatalf("waiting for frame %d on the host port: %v", want, err)
		}
		if got := frameSeq(buf[:n]); got != want {
			t.Fatalf("host port got frame %d, want %d", got, want)
		}
	}
}

// expectWorldQuiet asserts that no frame reaches the world side for d.
func (s *served) expectWorldQuiet(t *testing.T, d time.Duration) {
	t.Helper()
	buf := make([]byte, MaxFrameSize)
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	n, err := s.world.ReadFrame(ctx, buf)
	if err == nil {
		t.Fatalf("frame %d reached the host port although it was not released", frameSeq(buf[:n]))
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("host port: %v", err)
	}
}

// waitStats polls until cond holds for the buffer's stats.
func waitStats(t *testing.T, b *Buffer, what string, cond func(Stats) bool) Stats {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := b.Stats()
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; stats %+v", what, s)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// fakeQEMU speaks QEMU's side of -netdev stream.
type fakeQEMU struct {
	t  *testing.T
	c  net.Conn
	r  *bufio.Reader
	mu sync.Mutex
}

func dialQEMU(t *testing.T, sock string) *fakeQEMU {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &fakeQEMU{t: t, c: c, r: bufio.NewReader(c)}
}

func (q *fakeQEMU) send(frames ...[]byte) {
	q.t.Helper()
	var out []byte
	for _, f := range frames {
		out = appendStreamFrame(out, f)
	}
	q.writeRaw(out)
}

func (q *fakeQEMU) writeRaw(p []byte) {
	q.t.Helper()
	q.mu.Lock()
	defer q.mu.Unlock()
	q.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := q.c.Write(p); err != nil {
		q.t.Fatalf("fake QEMU write: %v", err)
	}
}

// recv reads one length-prefixed frame from the buffer.
func (q *fakeQEMU) recv() ([]byte, error) {
	q.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hdr [HeaderSize]byte
	return readStreamFrame(q.r, &hdr)
}

// sendSeq sends frames numbered from..to inclusive, of the given size.
func (q *fakeQEMU) sendSeq(from, to uint64, size int) {
	q.t.Helper()
	var fs [][]byte
	for i := from; i <= to; i++ {
		fs = append(fs, mkFrame(i, size))
	}
	q.send(fs...)
}

func seqRange(from, to uint64) []uint64 {
	var s []uint64
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}
