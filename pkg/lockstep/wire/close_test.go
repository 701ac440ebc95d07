package wire

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// TestRecvAfterPeerReset: a peer that sends its last frames and resets
// the connection (as the kernel does when a socket is closed with unread
// data, or a process dies) makes this side's next write fail. The frames
// that had arrived must still come out of Recv, then ErrClosed.
func TestRecvAfterPeerReset(t *testing.T) {
	a, b := tlsPair(t)
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 3 {
		if err := a.Send(ctx, Frame{Type: TypeControl, Epoch: uint64(i), Payload: []byte("last words")}); err != nil {
			t.Fatal(err)
		}
	}
	raw := a.(*streamConn).raw.(*net.TCPConn)
	if err := raw.SetLinger(0); err != nil { // close sends RST
		t.Fatal(err)
	}
	raw.Close()
	// b writes until its write meets the reset.
	var werr error
	for i := 0; werr == nil; i++ {
		werr = b.Send(ctx, Frame{Type: TypeAck, Epoch: uint64(i)})
		time.Sleep(time.Millisecond)
	}
	if !errors.Is(werr, ErrClosed) {
		t.Fatalf("write after the reset: %v, want ErrClosed", werr)
	}
	for i := range 3 {
		f, err := b.Recv(ctx)
		if err != nil {
			t.Fatalf("frame %d, which arrived before the reset, lost after the failed write: %v", i, err)
		}
		if f.Type != TypeControl || f.Epoch != uint64(i) || string(f.Payload) != "last words" {
			t.Fatalf("frame %d arrived as %s %d %q", i, f.Type, f.Epoch, f.Payload)
		}
	}
	if _, err := b.Recv(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Recv after the last frame: %v, want ErrClosed", err)
	}
	if err := b.Send(ctx, Frame{Type: TypeAck}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Send after the link ended: %v, want ErrClosed", err)
	}
}

// TestShutdownWaitsForPeer: Shutdown returns once the peer has read to the
// end of the stream and closed, and reports a peer that never does.
func TestShutdownWaitsForPeer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Run("peer reads to the end", func(t *testing.T) {
		a, b := tlsPair(t)
		defer b.Close()
		if err := a.Send(ctx, Frame{Type: TypeControl, Payload: []byte("bye")}); err != nil {
			t.Fatal(err)
		}
		got := make(chan error, 1)
		go func() {
			for {
				// The peer's Recv closes its end when the stream ends.
				if _, err := b.Recv(ctx); err != nil {
					got <- err
					return
				}
			}
		}()
		if err := a.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown with a reading peer: %v", err)
		}
		if err := <-got; !errors.Is(err, ErrClosed) {
			t.Fatalf("peer's Recv at the end: %v", err)
		}
	})
	t.Run("peer silent", func(t *testing.T) {
		a, b := tlsPair(t)
		defer b.Close()
		sctx, scancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer scancel()
		if err := a.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown with a peer that never reads: %v, want DeadlineExceeded", err)
		}
	})
}
