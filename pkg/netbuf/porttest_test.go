package netbuf

import (
	"context"
	"errors"
	"testing"
	"time"
)

// portPeer is the far side of a Port under test: the wire, or the host's
// network stack behind a tap.
type portPeer interface {
	// inject makes frame appear at the Port's ReadFrame.
	inject(ctx context.Context, frame []byte) error
	// capture returns the next test frame written through the Port's
	// WriteFrame, skipping frames that are not the test's.
	capture(ctx context.Context) ([]byte, error)
}

// testPortConformance is the suite every Port implementation must pass.
// newPort returns a fresh, open port and its peer; the suite closes the
// port itself.
func testPortConformance(t *testing.T, newPort func(t *testing.T) (Port, portPeer)) {
	// readTest reads until a test frame arrives: a real port may also
	// carry the host's own traffic.
	readTest := func(ctx context.Context, p Port, buf []byte) ([]byte, error) {
		for {
			n, err := p.ReadFrame(ctx, buf)
			if err != nil {
				return nil, err
			}
			if isTestFrame(buf[:n]) {
				return buf[:n], nil
			}
		}
	}
	sizes := []int{60, 64, 1000, 1514}

	t.Run("WriteReachesPeerInOrder", func(t *testing.T) {
		p, peer := newPort(t)
		defer p.Close()
		ctx := testCtx(t, 10*time.Second)
		for i, sz := range sizes {
			if err := p.WriteFrame(ctx, mkFrame(uint64(i), sz)); err != nil {
				t.Fatal(err)
			}
		}
		for i, sz := range sizes {
			f, err := peer.capture(ctx)
			if err != nil {
				t.Fatalf("capture frame %d: %v", i, err)
			}
			if frameSeq(f) != uint64(i) || len(f) != sz || string(f) != string(mkFrame(uint64(i), sz)) {
				t.Fatalf("peer got seq %d len %d, want seq %d len %d, same bytes", frameSeq(f), len(f), i, sz)
			}
		}
	})

	t.Run("PeerFramesAreReadInOrder", func(t *testing.T) {
		p, peer := newPort(t)
		defer p.Close()
		ctx := testCtx(t, 10*time.Second)
		for i, sz := range sizes {
			if err := peer.inject(ctx, mkFrame(uint64(i), sz)); err != nil {
				t.Fatal(err)
			}
		}
		buf := make([]byte, MaxFrameSize)
		for i, sz := range sizes {
			f, err := readTest(ctx, p, buf)
			if err != nil {
				t.Fatalf("read frame %d: %v", i, err)
			}
			if string(f) != string(mkFrame(uint64(i), sz)) {
				t.Fatalf("read seq %d len %d, want seq %d len %d", frameSeq(f), len(f), i, sz)
			}
		}
	})

	t.Run("ReadHonoursContextAndRecovers", func(t *testing.T) {
		p, peer := newPort(t)
		defer p.Close()
		buf := make([]byte, MaxFrameSize)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
		defer cancel()
		for {
			n, err := p.ReadFrame(ctx, buf)
			if err == nil {
				if isTestFrame(buf[:n]) {
					t.Fatal("read a test frame nobody sent")
				}
				continue
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("ReadFrame after its context ended: %v, want DeadlineExceeded", err)
			}
			break
		}
		// A cancelled read leaves no trace: the next one works.
		ctx2 := testCtx(t, 10*time.Second)
		if err := peer.inject(ctx2, mkFrame(7, 100)); err != nil {
			t.Fatal(err)
		}
		f, err := readTest(ctx2, p, buf)
		if err != nil || frameSeq(f) != 7 {
			t.Fatalf("read after a cancelled read: seq %d, err %v", frameSeq(f), err)
		}
	})

	t.Run("ShortBufferIsAnError", func(t *testing.T) {
		p, peer := newPort(t)
		defer p.Close()
		ctx := testCtx(t, 10*time.Second)
		if err := peer.inject(ctx, mkFrame(1, 1000)); err != nil {
			t.Fatal(err)
		}
		small := make([]byte, 100)
		for {
			n, err := p.ReadFrame(ctx, small)
			if errors.Is(err, ErrShortBuffer) {
				break
			}
			if err != nil {
				t.Fatalf("ReadFrame into a short buffer: %v, want ErrShortBuffer", err)
			}
			if isTestFrame(small[:n]) {
				t.Fatalf("a 1000-byte test frame was read into 100 bytes as %d bytes", n)
			}
		}
		if err := peer.inject(ctx, mkFrame(2, 80)); err != nil {
			t.Fatal(err)
		}
		f, err := readTest(ctx, p, make([]byte, MaxFrameSize))
		if err != nil || frameSeq(f) != 2 {
			t.Fatalf("read after a short-buffer error: seq %d, err %v", frameSeq(f), err)
		}
	})

	t.Run("WriteRejectsBadFrames", func(t *testing.T) {
		p, _ := newPort(t)
		defer p.Close()
		ctx := testCtx(t, 10*time.Second)
		for _, n := range []int{0, MinFrameSize - 1, MaxFrameSize + 1} {
			if err := p.WriteFrame(ctx, make([]byte, n)); !errors.Is(err, ErrBadFrame) {
				t.Errorf("WriteFrame of %d bytes: %v, want ErrBadFrame", n, err)
			}
		}
	})

	t.Run("CloseUnblocksAndFails", func(t *testing.T) {
		p, _ := newPort(t)
		errc := make(chan error, 1)
		go func() {
			buf := make([]byte, MaxFrameSize)
			for {
				n, err := p.ReadFrame(context.Background(), buf)
				if err != nil {
					errc <- err
					return
				}
				if isTestFrame(buf[:n]) {
					errc <- errors.New("read a test frame nobody sent")
					return
				}
			}
		}()
		time.Sleep(20 * time.Millisecond) // let the read block
		if err := p.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		select {
		case err := <-errc:
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("blocked ReadFrame after Close: %v, want ErrClosed", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not unblock ReadFrame")
		}
		ctx := testCtx(t, 10*time.Second)
		if _, err := p.ReadFrame(ctx, make([]byte, MaxFrameSize)); !errors.Is(err, ErrClosed) {
			t.Errorf("ReadFrame after Close: %v, want ErrClosed", err)
		}
		if err := p.WriteFrame(ctx, mkFrame(1, 64)); !errors.Is(err, ErrClosed) {
			t.Errorf("WriteFrame after Close: %v, want ErrClosed", err)
		}
		if err := p.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

// pipePeer drives the other end of a Pipe.
type pipePeer struct{ other Port }

func (p pipePeer) inject(ctx context.Context, f []byte) error { return p.other.WriteFrame(ctx, f) }

func (p pipePeer) capture(ctx context.Context) ([]byte, error) {
	buf := make([]byte, MaxFrameSize)
	for {
		n, err := p.other.ReadFrame(ctx, buf)
		if err != nil {
			return nil, err
		}
		if isTestFrame(buf[:n]) {
			return buf[:n], nil
		}
	}
}

func TestPipeConformance(t *testing.T) {
	testPortConformance(t, func(t *testing.T) (Port, portPeer) {
		a, b := Pipe()
		t.Cleanup(func() { b.Close() })
		return a, pipePeer{b}
	})
}
