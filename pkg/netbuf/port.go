package netbuf

import (
	"context"
	"fmt"
	"sync"
)

// Port is the host side of the guest's NIC: where released guest frames go
// and where frames for the guest come from. One goroutine may read while
// another writes; concurrent reads (or concurrent writes) are not supported.
//
// ReadFrame blocks until a frame arrives, ctx ends (it then returns ctx's
// error) or the port is closed (ErrClosed). A frame larger than buf is
// consumed and reported with ErrShortBuffer. WriteFrame refuses frames
// outside [MinFrameSize, MaxFrameSize] with ErrBadFrame. After Close both
// return ErrClosed.
type Port interface {
	ReadFrame(ctx context.Context, buf []byte) (int, error)
	WriteFrame(ctx context.Context, frame []byte) error
	Close() error
}

// pipeDepth is how many frames one direction of a Pipe holds before
// WriteFrame blocks, like a NIC's ring.
const pipeDepth = 256

// Pipe returns two connected in-memory Ports: a frame written to one is read
// from the other. It stands in for a tap in tests of code built on Buffer.
// Closing one end closes that end only; the other end's writes then fail
// with ErrClosed.
func Pipe() (Port, Port) {
	ab := make(chan []byte, pipeDepth)
	ba := make(chan []byte, pipeDepth)
	a := &pipeEnd{in: ba, out: ab, closed: make(chan struct{})}
	b := &pipeEnd{in: ab, out: ba, closed: make(chan struct{})}
	a.peer, b.peer = b, a
	return a, b
}

type pipeEnd struct {
	in, out   chan []byte
	peer      *pipeEnd
	closed    chan struct{}
	closeOnce sync.Once
}

func (p *pipeEnd) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	select {
	case <-p.closed:
		return 0, ErrClosed
	default:
	}
	select {
	case f := <-p.in:
		if len(f) > len(buf) {
			return 0, fmt.Errorf("%w: %d-byte frame, %d-byte buffer", ErrShortBuffer, len(f), len(buf))
		}
		return copy(buf, f), nil
	case <-p.closed:
		return 0, ErrClosed
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (p *pipeEnd) WriteFrame(ctx context.Context, frame []byte) error {
	if err := checkFrameSize(len(frame)); err != nil {
		return err
	}
	select {
	case <-p.closed:
		return ErrClosed
	case <-p.peer.closed:
		return fmt.Errorf("%w: the other end of the pipe", ErrClosed)
	default:
	}
	f := append([]byte(nil), frame...)
	select {
	case p.out <- f:
		return nil
	case <-p.closed:
		return ErrClosed
	case <-p.peer.closed:
		return fmt.Errorf("%w: the other end of the pipe", ErrClosed)
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *pipeEnd) Close() error {
	p.closeOnce.Do(func() { close(p.closed) })
	return nil
}
