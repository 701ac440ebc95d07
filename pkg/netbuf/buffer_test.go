package netbuf

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

const quiet = 50 * time.Millisecond

func TestSealReleaseKeepsOrderWithinAndAcrossEpochs(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)

	q.send(mkFrame(1, 60), mkFrame(2, 1514), mkFrame(3, MaxFrameSize))
	waitStats(t, s.b, "3 guest frames", func(st Stats) bool { return st.GuestFrames == 3 })
	frames, bytes := s.b.Seal(1)
	if frames != 3 || bytes != int64(60+1514+MaxFrameSize) {
		t.Fatalf("Seal(1) = %d frames, %d bytes; want 3, %d", frames, bytes, 60+1514+MaxFrameSize)
	}
	q.sendSeq(4, 5, 100)
	waitStats(t, s.b, "5 guest frames", func(st Stats) bool { return st.GuestFrames == 5 })
	if f, _ := s.b.Seal(2); f != 2 {
		t.Fatalf("Seal(2) sealed %d frames, want 2", f)
	}
	q.sendSeq(6, 6, 100)
	waitStats(t, s.b, "6 guest frames", func(st Stats) bool { return st.GuestFrames == 6 })

	s.expectWorldQuiet(t, quiet)
	s.b.Release(1)
	s.expectWorld(t, 1, 2, 3)
	s.expectWorldQuiet(t, quiet)
	// Releasing beyond the last sealed epoch releases only what is sealed:
	// frame 6 is still in the open epoch.
	s.b.Release(7)
	s.expectWorld(t, 4, 5)
	s.expectWorldQuiet(t, quiet)
	if f, _ := s.b.Seal(8); f != 1 {
		t.Fatalf("Seal(8) sealed %d frames, want 1", f)
	}
	s.b.Release(8)
	s.expectWorld(t, 6)

	st := waitStats(t, s.b, "all sent", func(st Stats) bool { return st.SentFrames == 6 })
	if st.HeldFrames != 0 || st.HeldBytes != 0 || st.QueuedFrames != 0 || st.LastSealed != 8 || st.LastReleased != 8 {
		t.Fatalf("stats after release: %+v", st)
	}
	if st.MaxHold <= 0 {
		t.Fatalf("MaxHold %v, want > 0", st.MaxHold)
	}
}

func TestReleaseOfLaterEpochReleasesEarlierOnesFirst(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)
	for e := uint64(1); e <= 3; e++ {
		q.sendSeq(e*10, e*10+2, 64)
		waitStats(t, s.b, "frames of the epoch", func(st Stats) bool { return st.GuestFrames == e*3 })
		s.b.Seal(e)
	}
	s.b.Release(2)
	s.expectWorld(t, 10, 11, 12, 20, 21, 22)
	s.expectWorldQuiet(t, quiet)
	s.b.Release(1) // stale ACK: nothing left to release
	s.expectWorldQuiet(t, quiet)
	s.b.Release(3)
	s.expectWorld(t, 30, 31, 32)
}

// A frame that is only partly in the buffer when Seal runs belongs to the
// later epoch.
func TestSealAttributesInFlightFrameToLaterEpoch(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)
	q.send(mkFrame(1, 80))
	waitStats(t, s.b, "frame 1", func(st Stats) bool { return st.GuestFrames == 1 })

	whole := appendStreamFrame(nil, mkFrame(2, 500))
	q.writeRaw(whole[:HeaderSize+100])
	time.Sleep(quiet) // let the buffer read what it can of frame 2
	if f, _ := s.b.Seal(1); f != 1 {
		t.Fatalf("Seal(1) sealed %d frames, want only the complete frame 1", f)
	}
	q.writeRaw(whole[HeaderSize+100:])
	waitStats(t, s.b, "frame 2", func(st Stats) bool { return st.GuestFrames == 2 })
	s.b.Release(1)
	s.expectWorld(t, 1)
	s.expectWorldQuiet(t, quiet)
	if f, _ := s.b.Seal(2); f != 1 {
		t.Fatalf("Seal(2) sealed %d frames, want 1", f)
	}
	s.b.Release(2)
	s.expectWorld(t, 2)
}

func TestSealMustIncrease(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)
	q.sendSeq(1, 1, 64)
	waitStats(t, s.b, "frame 1", func(st Stats) bool { return st.GuestFrames == 1 })
	if f, _ := s.b.Seal(5); f != 1 {
		t.Fatalf("Seal(5) sealed %d frames, want 1", f)
	}
	q.sendSeq(2, 2, 64)
	waitStats(t, s.b, "frame 2", func(st Stats) bool { return st.GuestFrames == 2 })
	for _, n := range []uint64{5, 4} {
		if f, b := s.b.Seal(n); f != 0 || b != 0 {
			t.Fatalf("repeated/decreasing Seal(%d) sealed %d frames, %d bytes; want it ignored", n, f, b)
		}
	}
	s.b.Release(5)
	s.expectWorld(t, 1)
	// Frame 2 was produced after epoch 5's checkpoint: it must wait.
	s.expectWorldQuiet(t, quiet)
	if st := s.b.Stats(); st.OpenFrames != 1 {
		t.Fatalf("frame 2 should still be open, stats %+v", st)
	}
	s.b.Seal(6)
	s.b.Release(6)
	s.expectWorld(t, 2)
}

func TestPassthrough(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)
	q.sendSeq(1, 2, 64)
	waitStats(t, s.b, "2 frames", func(st Stats) bool { return st.GuestFrames == 2 })
	s.b.Seal(1)
	q.sendSeq(3, 3, 64)
	waitStats(t, s.b, "3 frames", func(st Stats) bool { return st.GuestFrames == 3 })
	<-s.b.Outbound() // drain the pending trigger

	// Turning passthrough on flushes what is held, sealed or not, in order.
	s.b.SetPassthrough(true)
	s.expectWorld(t, 1, 2, 3)
	q.sendSeq(4, 5, 64)
	s.expectWorld(t, 4, 5)
	select {
	case <-s.b.Outbound():
		t.Fatal("passthrough frames must not trigger checkpoints")
	default:
	}
	if st := s.b.Stats(); !st.Passthrough || st.HeldFrames != 0 {
		t.Fatalf("stats in passthrough: %+v", st)
	}

	s.b.SetPassthrough(false)
	q.sendSeq(6, 6, 64)
	waitStats(t, s.b, "frame 6 held", func(st Stats) bool { return st.HeldFrames == 1 })
	s.expectWorldQuiet(t, quiet)
	// A new protection (a re-pairing after degraded mode) numbers its
	// epochs from the start again: epoch 1 is sealed and released anew.
	if f, _ := s.b.Seal(1); f != 1 {
		t.Fatalf("Seal(1) of a new protection sealed %d frames, want 1", f)
	}
	s.b.Release(1)
	s.expectWorld(t, 6)
}

func TestBackpressureAtMaxHeldBytes(t *testing.T) {
	const size = 1000
	const limit = 3 * size
	s := serveBuffer(t, Options{MaxHeldBytes: limit})
	q := dialQEMU(t, s.sock)
	const total = 10
	q.sendSeq(1, total, size)

	var next uint64 = 1
	for epoch := uint64(1); next <= total; epoch++ {
		// The buffer takes frames until it holds MaxHeldBytes, then stops
		// reading: it neither drops nor releases anything early.
		want := min(uint64(limit/size), total-next+1)
		st := waitStats(t, s.b, "the buffer to fill", func(st Stats) bool { return st.HeldFrames == int(want) })
		time.Sleep(quiet)
		st = s.b.Stats()
		if st.HeldFrames != int(want) || st.HeldBytes > limit {
			t.Fatalf("epoch %d: buffer holds %d frames, %d bytes; want %d frames within %d bytes", epoch, st.HeldFrames, st.HeldBytes, want, limit)
		}
		if st.DiscardedFrames != 0 || st.SentFrames != next-1 {
			t.Fatalf("epoch %d: frames dropped or released early: %+v", epoch, st)
		}
		s.expectWorldQuiet(t, quiet)
		s.b.Seal(epoch)
		s.b.Release(epoch)
		s.expectWorld(t, seqRange(next, next+want-1)...)
		next += want
	}
	if st := s.b.Stats(); st.BackpressureStalls == 0 {
		t.Fatalf("no back-pressure stall counted: %+v", st)
	}
}

// The back-pressure reaches QEMU: with the buffer full, QEMU's writes stop
// being accepted once the socket's kernel buffer is full.
func TestBackpressureBlocksTheGuestSide(t *testing.T) {
	const size = 1500
	s := serveBuffer(t, Options{MaxHeldBytes: 10 * size})
	q := dialQEMU(t, s.sock)
	frame := appendStreamFrame(nil, mkFrame(1, size))
	deadline := time.Now().Add(500 * time.Millisecond)
	q.c.SetWriteDeadline(deadline)
	var written int
	var err error
	for time.Now().Before(deadline) {
		var n int
		n, err = q.c.Write(frame)
		written += n
		if err != nil {
			break
		}
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("QEMU side wrote %d bytes without being held back (err %v)", written, err)
	}
	st := s.b.Stats()
	if st.HeldBytes > 11*size {
		t.Fatalf("buffer holds %d bytes, bound is %d plus one frame", st.HeldBytes, 10*size)
	}
	t.Logf("guest side blocked after %d bytes; buffer holds %d frames", written, st.HeldFrames)
}

func TestDisconnectAndReconnectKeepHeldFrames(t *testing.T) {
	s := serveBuffer(t, Options{})
	q1 := dialQEMU(t, s.sock)
	q1.sendSeq(1, 2, 64)
	waitStats(t, s.b, "2 frames", func(st Stats) bool { return st.GuestFrames == 2 })
	s.b.Seal(1)
	q1.sendSeq(3, 3, 64)
	waitStats(t, s.b, "3 frames", func(st Stats) bool { return st.GuestFrames == 3 })
	q1.c.Close() // QEMU died or was stopped
	waitStats(t, s.b, "disconnect", func(st Stats) bool { return !st.Connected })

	// A restored QEMU connects and goes on.
	q2 := dialQEMU(t, s.sock)
	waitStats(t, s.b, "reconnect", func(st Stats) bool { return st.Connected && st.Connections == 2 })
	q2.sendSeq(4, 4, 64)
	waitStats(t, s.b, "4 frames", func(st Stats) bool { return st.GuestFrames == 4 })
	s.b.Seal(2)
	s.b.Release(2)
	s.expectWorld(t, 1, 2, 3, 4)

	// World-to-guest frames go to the new connection.
	ctx := testCtx(t, 10*time.Second)
	if err := s.world.WriteFrame(ctx, mkFrame(100, 90)); err != nil {
		t.Fatal(err)
	}
	f, err := q2.recv()
	if err != nil || frameSeq(f) != 100 || len(f) != 90 {
		t.Fatalf("guest got %d bytes seq %d (err %v), want frame 100 of 90 bytes", len(f), frameSeq(f), err)
	}

	// A third connection replaces the second, which is closed.
	q3 := dialQEMU(t, s.sock)
	waitStats(t, s.b, "replacement", func(st Stats) bool { return st.Connections == 3 })
	expectHangup(t, q2.c)
	q3.sendSeq(5, 5, 64)
	waitStats(t, s.b, "5 frames", func(st Stats) bool { return st.GuestFrames == 5 })
	s.b.Seal(3)
	s.b.Release(3)
	s.expectWorld(t, 5)
}

func TestMalformedStreamDropsConnectionKeepsFrames(t *testing.T) {
	prefix := func(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }
	good := appendStreamFrame(nil, mkFrame(7, 100))
	cases := []struct {
		name  string
		bytes []byte
		close bool // end the stream after the bytes
	}{
		{"zero length", prefix(0), false},
		{"shorter than an Ethernet header", append(prefix(13), make([]byte, 13)...), false},
		{"oversized", prefix(MaxFrameSize + 1), false},
		{"huge", prefix(0xffffffff), false},
		{"truncated prefix", []byte{0, 0}, true},
		{"truncated frame", good[:len(good)-10], true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := serveBuffer(t, Options{})
			q := dialQEMU(t, s.sock)
			q.sendSeq(1, 2, 64)
			waitStats(t, s.b, "2 frames", func(st Stats) bool { return st.GuestFrames == 2 })
			s.b.Seal(1)
			q.sendSeq(3, 3, 64)
			waitStats(t, s.b, "3 frames", func(st Stats) bool { return st.GuestFrames == 3 })
			q.writeRaw(c.bytes)
			if c.close {
				q.c.(*net.UnixConn).CloseWrite()
			}
			st := waitStats(t, s.b, "the stream error", func(st Stats) bool { return st.StreamErrors == 1 })
			if st.Connected || st.HeldFrames != 3 || st.GuestFrames != 3 {
				t.Fatalf("after a bad stream: %+v; want disconnected with 3 frames held", st)
			}
			expectHangup(t, q.c)
			q2 := dialQEMU(t, s.sock)
			q2.sendSeq(4, 4, 64)
			waitStats(t, s.b, "4 frames", func(st Stats) bool { return st.GuestFrames == 4 })
			s.b.Seal(2)
			s.b.Release(2)
			s.expectWorld(t, 1, 2, 3, 4)
		})
	}
}

func TestOutboundCoalesces(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)
	select {
	case <-s.b.Outbound():
		t.Fatal("trigger before any frame")
	default:
	}
	q.sendSeq(1, 5, 64)
	waitStats(t, s.b, "5 frames", func(st Stats) bool { return st.GuestFrames == 5 })
	select {
	case <-s.b.Outbound():
	default:
		t.Fatal("no trigger after guest frames")
	}
	select {
	case <-s.b.Outbound():
		t.Fatal("five frames gave more than one pending trigger")
	default:
	}
	q.sendSeq(6, 6, 64)
	select {
	case <-s.b.Outbound():
	case <-time.After(10 * time.Second):
		t.Fatal("no trigger for a later frame")
	}
}

func TestWorldToGuestPassesAtOnce(t *testing.T) {
	s := serveBuffer(t, Options{})
	ctx := testCtx(t, 10*time.Second)
	// No QEMU yet: the frame is dropped, as by a NIC whose link is down.
	if err := s.world.WriteFrame(ctx, mkFrame(1, 64)); err != nil {
		t.Fatal(err)
	}
	waitStats(t, s.b, "inbound drop", func(st Stats) bool { return st.InboundDropped == 1 })

	q := dialQEMU(t, s.sock)
	waitStats(t, s.b, "connection", func(st Stats) bool { return st.Connected })
	q.sendSeq(10, 11, 64) // held guest output must not delay input
	for i := uint64(2); i <= 4; i++ {
		if err := s.world.WriteFrame(ctx, mkFrame(i, 60+int(i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := uint64(2); i <= 4; i++ {
		f, err := q.recv()
		if err != nil || frameSeq(f) != i || len(f) != 60+int(i) {
			t.Fatalf("guest got seq %d len %d (err %v), want seq %d len %d", frameSeq(f), len(f), err, i, 60+i)
		}
	}
	st := waitStats(t, s.b, "inbound count", func(st Stats) bool { return st.InboundFrames == 3 })
	if st.SentFrames != 0 {
		t.Fatalf("guest output left without a release: %+v", st)
	}
}

func TestDiscardDropsHeldFrames(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)
	q.sendSeq(1, 2, 64)
	waitStats(t, s.b, "2 frames", func(st Stats) bool { return st.GuestFrames == 2 })
	s.b.Seal(1)
	q.sendSeq(3, 3, 64)
	waitStats(t, s.b, "3 frames", func(st Stats) bool { return st.GuestFrames == 3 })
	s.b.Discard()
	st := s.b.Stats()
	if st.HeldFrames != 0 || st.HeldBytes != 0 || st.DiscardedFrames != 3 {
		t.Fatalf("after Discard: %+v", st)
	}
	s.b.Release(1)
	s.expectWorldQuiet(t, quiet)
	q.sendSeq(4, 4, 64)
	waitStats(t, s.b, "4 frames", func(st Stats) bool { return st.GuestFrames == 4 })
	s.b.Seal(2)
	s.b.Release(2)
	s.expectWorld(t, 4)
}

// A released frame counts as queued until the host port has taken it,
// including while egress is writing it: a caller that waits for
// QueuedFrames == 0 (to read a tap's counters, or to know that what it
// released is out) must not see 0 while a write is still under way.
func TestQueuedCountsFramesBeingWritten(t *testing.T) {
	s := serveBuffer(t, Options{})
	q := dialQEMU(t, s.sock)
	const extra = 3
	total := uint64(pipeDepth + extra)
	q.sendSeq(1, total, 64)
	waitStats(t, s.b, "all guest frames", func(st Stats) bool { return st.GuestFrames == total })
	s.b.Seal(1)
	s.b.Release(1)
	// The pipe takes pipeDepth frames; egress then blocks on the next
	// one, with the rest of its batch in hand.
	waitStats(t, s.b, "the pipe to fill", func(st Stats) bool { return st.SentFrames == pipeDepth })
	time.Sleep(quiet)
	if st := s.b.Stats(); st.QueuedFrames != extra || st.QueuedBytes != extra*64 || st.SentFrames != pipeDepth {
		t.Fatalf("with %d frames not yet taken by the host port: %+v", extra, st)
	}
	s.expectWorld(t, seqRange(1, total)...)
	st := waitStats(t, s.b, "all sent", func(st Stats) bool { return st.SentFrames == total })
	if st.QueuedFrames != 0 || st.QueuedBytes != 0 {
		t.Fatalf("after every frame was taken: %+v", st)
	}
}

func TestNewRejectsBadArguments(t *testing.T) {
	host, _ := Pipe()
	dir := t.TempDir()
	file := filepath.Join(dir, "regular")
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		sock string
		host Port
		o    Options
	}{
		{"empty path", "", host, Options{}},
		{"nil host", filepath.Join(dir, "a.sock"), nil, Options{}},
		{"negative bound", filepath.Join(dir, "b.sock"), host, Options{MaxHeldBytes: -1}},
		{"path is a regular file", file, host, Options{}},
	}
	for _, c := range cases {
		b, err := New(c.sock, c.host, c.o)
		if !errors.Is(err, ErrInvalidOptions) {
			if b != nil {
				b.Close()
			}
			t.Errorf("%s: err %v, want ErrInvalidOptions", c.name, err)
		}
	}
	if b, err := New(filepath.Join(dir, "missing", "c.sock"), host, Options{}); err == nil {
		b.Close()
		t.Error("a socket in a missing directory was accepted")
	}
	// A stale socket file is replaced.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	b, err := New(stale, host, Options{})
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	b.Close()
}

func TestServeLifecycle(t *testing.T) {
	host, _ := Pipe()
	b, err := New(filepath.Join(t.TempDir(), "s.sock"), host, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- b.Serve(ctx) }()
	waitStats(t, b, "Serve to start", func(Stats) bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.serving
	})
	if err := b.Serve(ctx); err == nil {
		t.Fatal("a second Serve was accepted")
	}
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
	b.Close()
	b.Close() // idempotent
	if err := b.Serve(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Serve after Close: %v, want ErrClosed", err)
	}
}

// A host port that fails ends Serve with an error naming it.
func TestServeFailsWhenHostPortFails(t *testing.T) {
	host, world := Pipe()
	defer world.Close()
	b, err := New(filepath.Join(t.TempDir(), "s.sock"), host, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	errc := make(chan error, 1)
	go func() { errc <- b.Serve(context.Background()) }()
	host.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Serve: %v, want an error wrapping ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not notice the host port failing")
	}
}

// expectHangup asserts that the buffer closed c: a read ends with EOF, or
// with a reset when the buffer left unread bytes behind.
func expectHangup(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read on a connection the buffer should have closed: %v, want EOF or reset", err)
	}
}
