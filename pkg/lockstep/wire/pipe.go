package wire

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// Pipe returns the two ends of an in-memory link. Each direction holds at
// most bufFrames frames in flight (at least 1); Send blocks beyond that, so a
// reader that stops reading stops the writer, as on TCP. Payloads are copied
// on Send. The bound counts frames, not bytes: size it to the frames in use.
// Close of either end closes the link for both; frames already in
// flight are still delivered to the other end, as on TCP.
func Pipe(bufFrames int) (Conn, Conn) {
	if bufFrames < 1 {
		bufFrames = 1
	}
	ab := make(chan Frame, bufFrames)
	ba := make(chan Frame, bufFrames)
	a := &pipeEnd{in: ba, out: ab, closed: make(chan struct{}), name: "pipe-a"}
	b := &pipeEnd{in: ab, out: ba, closed: make(chan struct{}), name: "pipe-b"}
	a.peer, b.peer = b, a
	return a, b
}

type pipeEnd struct {
	in     <-chan Frame
	out    chan<- Frame
	closed chan struct{}
	once   sync.Once
	peer   *pipeEnd
	name   string
}

func (p *pipeEnd) Peer() string { return p.peer.name }

func (p *pipeEnd) Close() error {
	p.once.Do(func() { close(p.closed) })
	return nil
}

// Shutdown closes the link and waits until the peer has taken every frame
// sent (or closed its end too). A channel tells no one when it empties, so
// this polls.
func (p *pipeEnd) Shutdown(ctx context.Context) error {
	p.Close()
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for len(p.out) > 0 && !isDone(p.peer.closed) {
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("wire: shutdown: waiting for the peer to take %d frames: %w", len(p.out), ctx.Err())
		}
	}
	return nil
}

func isDone(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (p *pipeEnd) Send(ctx context.Context, f Frame) error {
	if err := f.check(); err != nil {
		return err
	}
	if f.Type.handshake() {
		return fmt.Errorf("%w: %s frames belong to the handshake", ErrInvalid, f.Type)
	}
	if err := p.closedErr(); err != nil {
		return fmt.Errorf("wire: send %s: %w", f.Type, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("wire: send %s: %w", f.Type, err)
	}
	f.Payload = append(make([]byte, 0, len(f.Payload)), f.Payload...)
	select {
	case p.out <- f:
		return nil
	case <-p.closed:
	case <-p.peer.closed:
	case <-ctx.Done():
		return fmt.Errorf("wire: send %s: %w", f.Type, ctx.Err())
	}
	return fmt.Errorf("wire: send %s: %w", f.Type, p.closedErr())
}

func (p *pipeEnd) closedErr() error {
	if isDone(p.closed) {
		return fmt.Errorf("%w: closed locally", ErrClosed)
	}
	if isDone(p.peer.closed) {
		return fmt.Errorf("%w: the peer closed the link", ErrClosed)
	}
	return nil
}

func (p *pipeEnd) Recv(ctx context.Context) (Frame, error) {
	if isDone(p.closed) {
		return Frame{}, fmt.Errorf("wire: recv: %w: closed locally", ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return Frame{}, fmt.Errorf("wire: recv: %w", err)
	}
	select {
	case f := <-p.in:
		return f, nil
	case <-p.closed:
		return Frame{}, fmt.Errorf("wire: recv: %w: closed locally", ErrClosed)
	case <-p.peer.closed:
		select {
		case f := <-p.in: // delivered before the peer closed
			return f, nil
		default:
			return Frame{}, fmt.Errorf("wire: recv: %w: the peer closed the link", ErrClosed)
		}
	case <-ctx.Done():
		return Frame{}, fmt.Errorf("wire: recv: %w", ctx.Err())
	}
}
