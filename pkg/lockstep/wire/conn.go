package wire

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Conn is one authenticated, framed, bidirectional link.
//
// Send blocks while the peer is slow (back-pressure, never unbounded
// buffering) and returns once the frame is handed to the transport; the
// caller may reuse the payload afterwards. Recv returns the next verified
// frame; its payload belongs to the caller.
//
// Sends are serialized with each other and Recvs with each other, so one
// goroutine may send heartbeats while another sends an epoch. A Recv
// interrupted by ctx leaves the link usable (the next Recv continues the
// same frame); a Send interrupted by ctx may have left half a frame on the
// stream, so on TCP it closes the link. After Close, or once the peer has
// closed or the link is lost, both return errors wrapping ErrClosed (on TCP,
// Recv first returns the frames that had arrived).
type Conn interface {
	Send(ctx context.Context, f Frame) error
	Recv(ctx context.Context) (Frame, error)
	Close() error
	// Peer is the authenticated identity of the other end: the common name
	// of its certificate, or its pre-shared-key id.
	Peer() string
}

// deadliner is the part of net.Conn that lets ctx interrupt blocked I/O.
type deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// streamConn is a Conn over a byte stream (TLS over TCP, or a raw stream in
// tests and benchmarks).
type streamConn struct {
	rw   io.ReadWriter
	dl   deadliner // nil if the stream has no deadlines
	raw  io.Closer // closing it interrupts blocked I/O at once
	peer string

	bw  *bufio.Writer
	enc *Encoder
	dec *Decoder

	sendMu chan struct{} // 1-slot semaphores: ctx-aware mutexes
	recvMu chan struct{}

	established atomic.Bool // handshake done: handshake frames now refused
	closed      chan struct{}
	closeOnce   sync.Once
	closeErr    error
}

const streamBuf = 64 << 10

// newStreamConn wraps rw. raw is closed by Close; it should be the
// underlying TCP connection so that Close never blocks on a TLS
// close_notify to a peer that has stopped reading.
func newStreamConn(rw io.ReadWriter, raw io.Closer) *streamConn {
	c := &streamConn{
		rw:     rw,
		raw:    raw,
		bw:     bufio.NewWriterSize(rw, streamBuf),
		sendMu: make(chan struct{}, 1),
		recvMu: make(chan struct{}, 1),
		closed: make(chan struct{}),
	}
	c.dl, _ = rw.(deadliner)
	c.enc = NewEncoder(c.bw)
	// Until the handshake is done the peer is a stranger: small frames only.
	c.dec = NewDecoder(bufio.NewReaderSize(rw, streamBuf), handshakeMaxPayload)
	return c
}

// establish ends the handshake: full-size frames are accepted from now on,
// handshake frames refused.
func (c *streamConn) establish() {
	c.dec.SetMaxPayload(MaxPayload)
	c.established.Store(true)
}

func (c *streamConn) Peer() string { return c.peer }

func (c *streamConn) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		if c.raw != nil {
			c.closeErr = c.raw.Close()
		}
	})
	if c.closeErr != nil && !errors.Is(c.closeErr, net.ErrClosed) {
		return fmt.Errorf("wire: close: %w", c.closeErr)
	}
	return nil
}

func (c *streamConn) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

func lock(ctx context.Context, mu chan struct{}, closed chan struct{}) error {
	select {
	case mu <- struct{}{}:
		return nil
	case <-closed:
		return fmt.Errorf("%w: closed locally", ErrClosed)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// arm makes ctx interrupt I/O on the stream through set (a deadline
// setter); the returned func undoes it and must be called before the next
// I/O.
func (c *streamConn) arm(ctx context.Context, set func(time.Time) error) (disarm func()) {
	if c.dl == nil {
		return func() {}
	}
	dl, hasDL := ctx.Deadline()
	if hasDL {
		_ = set(dl)
	}
	if ctx.Done() == nil {
		return func() {}
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = set(time.Unix(1, 0))
		close(fired)
	})
	return func() {
		if !stop() {
			<-fired // the past deadline must not land after we clear it
		}
		_ = set(time.Time{})
	}
}

func (c *streamConn) Send(ctx context.Context, f Frame) error {
	if err := f.check(); err != nil {
		return err
	}
	if f.Type.handshake() && c.established.Load() {
		return fmt.Errorf("%w: %s frames belong to the handshake", ErrInvalid, f.Type)
	}
	if err := lock(ctx, c.sendMu, c.closed); err != nil {
		return fmt.Errorf("wire: send %s: %w", f.Type, err)
	}
	defer func() { <-c.sendMu }()
	if c.isClosed() {
		return fmt.Errorf("wire: send %s: %w: closed locally", f.Type, ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("wire: send %s: %w", f.Type, err)
	}
	var disarm func()
	if c.dl != nil {
		disarm = c.arm(ctx, c.dl.SetWriteDeadline)
	}
	err := c.enc.WriteFrame(f)
	if err == nil {
		err = c.bw.Flush()
	}
	if disarm != nil {
		disarm()
	}
	if err == nil {
		return nil
	}
	// A failed write may have put part of a frame on the stream (and TLS
	// refuses all writes after a write timeout): the link is unusable.
	err = c.ioErr(ctx, err)
	_ = c.Close()
	return fmt.Errorf("wire: send %s frame of epoch %d: %w", f.Type, f.Epoch, err)
}

func (c *streamConn) Recv(ctx context.Context) (Frame, error) {
	if err := lock(ctx, c.recvMu, c.closed); err != nil {
		return Frame{}, fmt.Errorf("wire: recv: %w", err)
	}
	defer func() { <-c.recvMu }()
	f, err := c.recvLocked(ctx)
	if err != nil {
		return Frame{}, fmt.Errorf("wire: recv: %w", err)
	}
	return f, nil
}

func (c *streamConn) recvLocked(ctx context.Context) (Frame, error) {
	if c.isClosed() {
		return Frame{}, fmt.Errorf("%w: closed locally", ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return Frame{}, err
	}
	var disarm func()
	if c.dl != nil {
		disarm = c.arm(ctx, c.dl.SetReadDeadline)
	}
	f, err := c.dec.ReadFrame()
	if disarm != nil {
		disarm()
	}
	if err != nil {
		err = c.ioErr(ctx, err)
		if !isCtxErr(err) {
			// Corruption desynchronizes the stream and a lost link stays
			// lost: nothing more may be read from it.
			_ = c.Close()
		}
		return Frame{}, err
	}
	if f.Type.handshake() && c.established.Load() {
		_ = c.Close()
		return Frame{}, fmt.Errorf("%w: unexpected %s frame after the handshake", ErrCorrupt, f.Type)
	}
	return f, nil
}

func isCtxErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// ioErr maps an error of the underlying stream to this package's errors.
func (c *streamConn) ioErr(ctx context.Context, err error) error {
	switch {
	case errors.Is(err, ErrCorrupt), errors.Is(err, ErrVersion):
		return err
	case c.isClosed():
		return fmt.Errorf("%w: closed locally", ErrClosed)
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, os.ErrDeadlineExceeded):
		// The ctx deadline reached the socket a moment before ctx.Err().
		return context.DeadlineExceeded
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w: the peer closed the link", ErrClosed)
	case isRemoteAlert(err):
		return fmt.Errorf("%w: the peer aborted TLS: %w", ErrClosed, err)
	}
	return fmt.Errorf("%w: link lost: %w", ErrClosed, err)
}

// isRemoteAlert reports whether err is a TLS alert sent by the peer
// (crypto/tls reports those as a net.OpError with Op "remote error").
func isRemoteAlert(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "remote error"
}
