// Package wiretest owns the conformance suite that every wire.Conn
// implementation must pass: the in-memory pipe and TCP with either kind of
// authentication run the same tests, so the lockstep coordinator can be
// tested on the pipe and trusted on TCP.
package wiretest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

// patience bounds every wait of the suite. It is generous on purpose: the
// suite asserts behaviour, never speed, and runs on loaded machines.
const patience = 60 * time.Second

// NewPair returns two connected ends of a fresh link. The suite closes them.
type NewPair func(t *testing.T) (a, b wire.Conn)

// TestConn runs the conformance suite on links made by newPair.
func TestConn(t *testing.T, newPair NewPair) {
	tests := []struct {
		name string
		fn   func(*testing.T, NewPair)
	}{
		{"OrderedAllTypesAndSizes", testOrdered},
		{"BothDirections", testBothDirections},
		{"BackPressure", testBackPressure},
		{"CancelBlockedRecv", testCancelRecv},
		{"CancelBlockedSend", testCancelSend},
		{"CloseWakesPeer", testCloseWakesPeer},
		{"CloseWakesLocal", testCloseWakesLocal},
		{"CloseWakesBlockedSender", testCloseWakesBlockedSender},
		{"DeliversBeforeClose", testDeliversBeforeClose},
		{"FinalFrameDespiteUnreadTraffic", testFinalFrameDespiteUnreadTraffic},
		{"ShutdownWaitsForPeer", testShutdown},
		{"RefusesInvalidFrames", testInvalid},
		{"Epochs", testEpochs},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newPair) })
	}
}

func pair(t *testing.T, newPair NewPair) (a, b wire.Conn) {
	t.Helper()
	a, b = newPair(t)
	t.Cleanup(func() {
		a.Close()
		b.Close()
	})
	if a.Peer() == "" || b.Peer() == "" {
		t.Errorf("Peer() is empty: a=%q b=%q", a.Peer(), b.Peer())
	}
	return a, b
}

func bounded(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	t.Cleanup(cancel)
	return ctx
}

// fill writes a pattern that identifies frame i at every offset, so a
// misplaced, mixed or stale byte shows.
func fill(buf []byte, i int) {
	for j := range buf {
		buf[j] = byte(i*131 + j*7 + j>>8)
	}
	if len(buf) >= 8 {
		binary.BigEndian.PutUint64(buf, uint64(i))
	}
}

func pattern(n, i int) []byte {
	b := make([]byte, n)
	fill(b, i)
	return b
}

func checkFrame(t *testing.T, got wire.Frame, typ wire.Type, epoch uint64, size, i int) {
	t.Helper()
	if got.Type != typ || got.Epoch != epoch || len(got.Payload) != size {
		t.Fatalf("frame %d: got %s epoch %d with %d bytes, want %s epoch %d with %d bytes",
			i, got.Type, got.Epoch, len(got.Payload), typ, epoch, size)
	}
	if want := pattern(size, i); !bytes.Equal(got.Payload, want) {
		t.Fatalf("frame %d (%s, %d bytes): payload differs from what was sent", i, typ, size)
	}
}

var sendable = []wire.Type{wire.TypeManifest, wire.TypeMemory, wire.TypeDevState, wire.TypeEnd,
	wire.TypeAck, wire.TypeHeartbeat, wire.TypeControl, wire.TypeBlock}

var sizes = []int{0, 1, 7, 8, 4095, 4096, 65535, 65536 + 3, 360 << 10, 1 << 20, 3<<20 + 5}

func testOrdered(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	type want struct {
		typ   wire.Type
		epoch uint64
		size  int
	}
	var plan []want
	for round := range 2 {
		for k, n := range sizes {
			plan = append(plan, want{sendable[(round*len(sizes)+k)%len(sendable)], uint64(1<<40 + k), n})
		}
	}
	errc := make(chan error, 1)
	go func() {
		// One buffer reused for every frame: a Conn must not keep
		// referring to a payload after Send returns.
		buf := make([]byte, 3<<20+5)
		for i, w := range plan {
			p := buf[:w.size]
			fill(p, i)
			if err := a.Send(ctx, wire.Frame{Type: w.typ, Epoch: w.epoch, Payload: p}); err != nil {
				errc <- fmt.Errorf("send %d: %w", i, err)
				return
			}
			clear(p)
		}
		errc <- nil
	}()
	for i, w := range plan {
		f, err := b.Recv(ctx)
		if err != nil {
			t.Fatalf("recv %d: %v", i, err)
		}
		checkFrame(t, f, w.typ, w.epoch, w.size, i)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func testBothDirections(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	const n = 150
	size := func(i int) int { return (i * 7919) % (256 << 10) }
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, ends := range [][2]wire.Conn{{a, b}, {b, a}} {
		from, to := ends[0], ends[1]
		wg.Add(2)
		go func() {
			defer wg.Done()
			for i := range n {
				f := wire.Frame{Type: sendable[i%len(sendable)], Epoch: uint64(i), Payload: pattern(size(i), i)}
				if err := from.Send(ctx, f); err != nil {
					errs <- fmt.Errorf("send %d: %w", i, err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			for i := range n {
				f, err := to.Recv(ctx)
				if err != nil {
					errs <- fmt.Errorf("recv %d: %w", i, err)
					return
				}
				if f.Type != sendable[i%len(sendable)] || f.Epoch != uint64(i) || !bytes.Equal(f.Payload, pattern(size(i), i)) {
					errs <- fmt.Errorf("frame %d arrived as %s epoch %d with %d bytes, or with other content",
						i, f.Type, f.Epoch, len(f.Payload))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// blockingSender sends numbered frames until told to stop, recording how
// many Sends returned and whether one is in progress.
type blockingSender struct {
	done   chan error
	sent   atomic.Int64
	inSend atomic.Bool
}

const (
	pressFrame = 256 << 10
	// pressFrames is far beyond any kernel, TLS or pipe buffering: if all
	// of them are accepted with nobody reading, there is no back-pressure.
	pressFrames = 256
)

func startSender(ctx context.Context, c wire.Conn) *blockingSender {
	s := &blockingSender{done: make(chan error, 1)}
	go func() {
		buf := make([]byte, pressFrame)
		for i := range pressFrames {
			fill(buf, i)
			s.inSend.Store(true)
			err := c.Send(ctx, wire.Frame{Type: wire.TypeMemory, Epoch: uint64(i), Payload: buf})
			s.inSend.Store(false)
			if err != nil {
				s.done <- fmt.Errorf("send %d: %w", i, err)
				return
			}
			s.sent.Add(1)
		}
		s.done <- nil
	}()
	return s
}

// waitBlocked waits until the sender is inside a Send that makes no
// progress. It fails the test if the sender gets everything through.
func (s *blockingSender) waitBlocked(t *testing.T) {
	t.Helper()
	const quiet = 25 // polls without progress: the sender is stuck, not slow
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(patience)
	last, still := int64(-1), 0
	for {
		select {
		case err := <-s.done:
			if err != nil {
				t.Fatalf("sender failed before blocking: %v", err)
			}
			t.Fatalf("no back-pressure: all %d frames (%d MiB) were accepted while nobody read",
				pressFrames, pressFrames*pressFrame>>20)
		case <-deadline:
			t.Fatalf("sender neither blocked nor finished within %v (sent %d)", patience, s.sent.Load())
		case <-tick.C:
		}
		n := s.sent.Load()
		if n == last && s.inSend.Load() {
			still++
		} else {
			still = 0
		}
		last = n
		if still >= quiet {
			return
		}
	}
}

func testBackPressure(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	s := startSender(ctx, a)
	s.waitBlocked(t)
	blockedAt := s.sent.Load()
	t.Logf("Send blocked after %d frames (%d KiB) while the peer was not reading", blockedAt, blockedAt*pressFrame>>10)
	select {
	case err := <-s.done:
		t.Fatalf("sender finished while blocked: %v", err)
	default:
	}
	buf := make([]byte, pressFrame)
	for i := range pressFrames {
		f, err := b.Recv(ctx)
		if err != nil {
			t.Fatalf("recv %d after resuming: %v", i, err)
		}
		fill(buf, i)
		if f.Type != wire.TypeMemory || f.Epoch != uint64(i) || !bytes.Equal(f.Payload, buf) {
			t.Fatalf("frame %d arrived as %s epoch %d with %d bytes, or with other content", i, f.Type, f.Epoch, len(f.Payload))
		}
	}
	if err := <-s.done; err != nil {
		t.Fatalf("sender after the reader resumed: %v", err)
	}
	if s.sent.Load() <= blockedAt {
		t.Fatalf("sender did not proceed after the reader resumed")
	}
}

func testCancelRecv(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	rctx, cancel := context.WithCancel(ctx)
	got := make(chan error, 1)
	go func() {
		_, err := b.Recv(rctx)
		got <- err
	}()
	time.Sleep(50 * time.Millisecond) // let Recv block; the result does not depend on it
	cancel()
	select {
	case err := <-got:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("canceled Recv returned %v, want context.Canceled", err)
		}
	case <-time.After(patience):
		t.Fatal("canceled Recv did not return")
	}
	// A deadline works the same way.
	dctx, dcancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer dcancel()
	if _, err := b.Recv(dctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Recv past its deadline returned %v, want context.DeadlineExceeded", err)
	}
	// The link survives an interrupted Recv.
	if err := a.Send(ctx, wire.Frame{Type: wire.TypeHeartbeat, Epoch: 9, Payload: pattern(100, 9)}); err != nil {
		t.Fatalf("send after canceled recv: %v", err)
	}
	f, err := b.Recv(ctx)
	if err != nil {
		t.Fatalf("recv after canceled recv: %v", err)
	}
	checkFrame(t, f, wire.TypeHeartbeat, 9, 100, 9)
}

func testCancelSend(t *testing.T, newPair NewPair) {
	a, _ := pair(t, newPair)
	ctx, cancel := context.WithCancel(bounded(t))
	s := startSender(ctx, a)
	s.waitBlocked(t)
	cancel()
	select {
	case err := <-s.done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("canceled Send returned %v, want context.Canceled", err)
		}
	case <-time.After(patience):
		t.Fatal("canceled Send did not return")
	}
}

func recvErr(c wire.Conn) chan error {
	ch := make(chan error, 1)
	go func() {
		for {
			_, err := c.Recv(context.Background())
			if err != nil {
				ch <- err
				return
			}
		}
	}()
	return ch
}

func wantClosed(t *testing.T, what string, ch chan error) {
	t.Helper()
	select {
	case err := <-ch:
		if !errors.Is(err, wire.ErrClosed) {
			t.Fatalf("%s returned %v, want ErrClosed", what, err)
		}
	case <-time.After(patience):
		t.Fatalf("%s was not woken by Close", what)
	}
}

func testCloseWakesPeer(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ch := recvErr(b)
	time.Sleep(20 * time.Millisecond)
	if err := a.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	wantClosed(t, "peer's blocked Recv", ch)
	ctx := bounded(t)
	if err := a.Send(ctx, wire.Frame{Type: wire.TypeHeartbeat}); !errors.Is(err, wire.ErrClosed) {
		t.Fatalf("Send after Close returned %v, want ErrClosed", err)
	}
	if _, err := a.Recv(ctx); !errors.Is(err, wire.ErrClosed) {
		t.Fatalf("Recv after Close returned %v, want ErrClosed", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func testCloseWakesLocal(t *testing.T, newPair NewPair) {
	a, _ := pair(t, newPair)
	ch := recvErr(a)
	time.Sleep(20 * time.Millisecond)
	a.Close()
	wantClosed(t, "blocked Recv", ch)
}

func testCloseWakesBlockedSender(t *testing.T, newPair NewPair) {
	for _, side := range []string{"peer", "local"} {
		t.Run(side, func(t *testing.T) {
			a, b := pair(t, newPair)
			s := startSender(bounded(t), a)
			s.waitBlocked(t)
			if side == "peer" {
				b.Close()
			} else {
				a.Close()
			}
			wantClosed(t, "blocked Send", s.done)
		})
	}
}

func testDeliversBeforeClose(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	for i := range 3 {
		if err := a.Send(ctx, wire.Frame{Type: wire.TypeControl, Epoch: uint64(i), Payload: pattern(1000*i, i)}); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	a.Close()
	for i := range 3 {
		f, err := b.Recv(ctx)
		if err != nil {
			t.Fatalf("recv %d of the frames sent before Close: %v", i, err)
		}
		checkFrame(t, f, wire.TypeControl, uint64(i), 1000*i, i)
	}
	if _, err := b.Recv(ctx); !errors.Is(err, wire.ErrClosed) {
		t.Fatalf("Recv after the last frame returned %v, want ErrClosed", err)
	}
}

// testFinalFrameDespiteUnreadTraffic: one end sends a last control frame
// and closes while frames its peer sent (acks, heartbeats) lie unread; the
// peer keeps writing and reads only later (it was busy). It must still
// receive the last frame, then ErrClosed. On TCP, closing with unread data
// resets the connection; a peer whose write then fails must not drop what
// had already arrived, and the closing end should not reset at all.
func testFinalFrameDespiteUnreadTraffic(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	// b's acks, unread by a. b stops writing at its first failure.
	const before = 3 // within any link's buffering
	var acked atomic.Int64
	werr := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				werr <- nil
				return
			default:
			}
			if err := b.Send(ctx, wire.Frame{Type: wire.TypeAck, Epoch: uint64(i)}); err != nil {
				werr <- err
				return
			}
			acked.Add(1)
			time.Sleep(time.Millisecond)
		}
	}()
	for acked.Load() < before {
		time.Sleep(time.Millisecond)
	}
	if err := a.Send(ctx, wire.Frame{Type: wire.TypeBlock, Epoch: 1, Payload: pattern(5000, 1)}); err != nil {
		t.Fatalf("send: %v", err)
	}
	if err := a.Send(ctx, wire.Frame{Type: wire.TypeControl, Epoch: 2, Payload: pattern(300, 2)}); err != nil {
		t.Fatalf("send the last frame: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	// b goes on writing for a while before it reads (or blocks: a does
	// not read): a write failing in that time must not cost b the frames
	// that had arrived.
	var sendErr error
	select {
	case sendErr = <-werr:
	case <-time.After(100 * time.Millisecond):
	}
	if sendErr != nil {
		t.Logf("b's write after a's Close failed: %v", sendErr)
	}
	for i, want := range []struct {
		typ  wire.Type
		size int
	}{{wire.TypeBlock, 5000}, {wire.TypeControl, 300}} {
		f, err := b.Recv(ctx)
		if err != nil {
			t.Fatalf("recv frame %d sent before the peer closed (b's writer: %v): %v", i+1, sendErr, err)
		}
		checkFrame(t, f, want.typ, uint64(i+1), want.size, i+1)
	}
	if _, err := b.Recv(ctx); !errors.Is(err, wire.ErrClosed) {
		t.Fatalf("Recv after the last frame returned %v, want ErrClosed", err)
	}
	close(stop)
	if sendErr == nil {
		<-werr
	}
}

// testShutdown: Shutdown returns once the peer has taken the last frame and
// seen the end of the link.
func testShutdown(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	if err := a.Send(ctx, wire.Frame{Type: wire.TypeControl, Epoch: 7, Payload: pattern(300, 7)}); err != nil {
		t.Fatalf("send: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Shutdown(ctx) }()
	f, err := b.Recv(ctx)
	if err != nil {
		t.Fatalf("recv the frame sent before Shutdown: %v", err)
	}
	checkFrame(t, f, wire.TypeControl, 7, 300, 7)
	if _, err := b.Recv(ctx); !errors.Is(err, wire.ErrClosed) {
		t.Fatalf("Recv after the last frame returned %v, want ErrClosed", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown, the peer having read everything: %v", err)
	}
	if err := a.Send(ctx, wire.Frame{Type: wire.TypeHeartbeat}); !errors.Is(err, wire.ErrClosed) {
		t.Fatalf("Send after Shutdown returned %v, want ErrClosed", err)
	}
}

func testInvalid(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	for _, f := range []wire.Frame{
		{Type: 0},
		{Type: 200},
		{Type: wire.TypeHello, Payload: []byte{0, 1, 0, 1, 0, 0, 0, 0}},
		{Type: wire.TypeAuth},
		{Type: wire.TypeMemory, Payload: make([]byte, wire.MaxPayload+1)},
	} {
		if err := a.Send(ctx, f); !errors.Is(err, wire.ErrInvalid) {
			t.Errorf("Send(%s with %d bytes) returned %v, want ErrInvalid", f.Type, len(f.Payload), err)
		}
	}
	// Nothing of the refused frames reached the peer: the link goes on.
	if err := a.Send(ctx, wire.Frame{Type: wire.TypeBlock, Epoch: 4, Payload: pattern(10, 4)}); err != nil {
		t.Fatalf("send after refused frames: %v", err)
	}
	f, err := b.Recv(ctx)
	if err != nil {
		t.Fatalf("recv after refused frames: %v", err)
	}
	checkFrame(t, f, wire.TypeBlock, 4, 10, 4)
}

func testEpochs(t *testing.T, newPair NewPair) {
	a, b := pair(t, newPair)
	ctx := bounded(t)
	const first, count = 41, 6
	type content struct {
		typ  wire.Type
		size int
	}
	epochContent := func(n uint64) []content {
		c := []content{{wire.TypeManifest, 40}}
		for k := range int(n % 4) {
			c = append(c, content{wire.TypeMemory, (k + 1) * 70000})
		}
		if n%3 != 0 {
			c = append(c, content{wire.TypeDevState, 366 << 10})
		}
		return c
	}
	sendErr := make(chan error, 1)
	acks := make(chan uint64, count)
	ackErr := make(chan error, 1)
	go func() {
		// Acks are read while epochs are still being sent, as the
		// coordinator does; reading them only afterwards could deadlock
		// a link whose buffers are smaller than the acks in flight.
		for range count {
			f, err := a.Recv(ctx)
			if err != nil {
				ackErr <- err
				return
			}
			if f.Type != wire.TypeAck {
				ackErr <- fmt.Errorf("primary got %s, want ack", f.Type)
				return
			}
			acks <- f.Epoch
		}
		ackErr <- nil
	}()
	go func() {
		es := wire.NewEpochSender(a)
		for n := uint64(first); n < first+count; n++ {
			if err := es.Begin(n); err != nil {
				sendErr <- err
				return
			}
			for i, c := range epochContent(n) {
				if err := es.Send(ctx, c.typ, pattern(c.size, int(n)*100+i)); err != nil {
					sendErr <- err
					return
				}
				if i == 0 {
					// Out-of-band frames may interleave with an epoch.
					for _, t := range []wire.Type{wire.TypeHeartbeat, wire.TypeBlock} {
						if err := a.Send(ctx, wire.Frame{Type: t, Epoch: n, Payload: pattern(int(n), int(n))}); err != nil {
							sendErr <- err
							return
						}
					}
				}
			}
			if err := es.End(ctx); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	er := wire.NewEpochReceiver(b)
	oobs := 0
	for n := uint64(first); n < first+count; {
		ep, oob, err := er.Next(ctx)
		if err != nil {
			t.Fatalf("epoch %d: %v", n, err)
		}
		if oob != nil {
			want := []wire.Type{wire.TypeHeartbeat, wire.TypeBlock}[oobs%2]
			checkFrame(t, *oob, want, n, int(n), int(n))
			oobs++
			continue
		}
		if ep.N != n {
			t.Fatalf("got epoch %d, want %d", ep.N, n)
		}
		want := epochContent(n)
		if len(ep.Frames) != len(want) {
			t.Fatalf("epoch %d has %d frames, want %d", n, len(ep.Frames), len(want))
		}
		for i, c := range want {
			checkFrame(t, ep.Frames[i], c.typ, n, c.size, int(n)*100+i)
		}
		if err := b.Send(ctx, wire.Frame{Type: wire.TypeAck, Epoch: n}); err != nil {
			t.Fatalf("ack %d: %v", n, err)
		}
		n++
	}
	if oobs != 2*count {
		t.Fatalf("got %d out-of-band frames, want %d", oobs, 2*count)
	}
	if last, ok := er.Last(); !ok || last != first+count-1 {
		t.Fatalf("Last() = %d, %v; want %d", last, ok, first+count-1)
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	if err := <-ackErr; err != nil {
		t.Fatal(err)
	}
	for n := uint64(first); n < first+count; n++ {
		if got := <-acks; got != n {
			t.Fatalf("ack for %d, want %d", got, n)
		}
	}
}
