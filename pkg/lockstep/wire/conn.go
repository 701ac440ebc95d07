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
// closed or the link is lost, both return errors wrapping ErrClosed; Recv
// first returns the frames that had arrived. A failed Send does not cost the
// frames that had arrived either (a peer that closed after its last message
// makes the next Send fail): Recv returns them, then ErrClosed.
//
// Close ends the link in order and at once for the caller: frames sent
// before it reach the peer ahead of the end of the stream, even while
// frames of the peer's lie unread here (on TCP this side half-closes and
// reads and discards what the peer still sends for a short while, rather
// than resetting the connection, which would throw away frames not yet
// delivered). Shutdown does the same and waits for the peer to end its
// side, for a last message that must not be lost to this process exiting.
type Conn interface {
	Send(ctx context.Context, f Frame) error
	Recv(ctx context.Context) (Frame, error)
	Close() error
	// Shutdown closes the link like Close and waits until the peer has
	// ended its side too (it has read everything up to the end of the
	// stream, or closed on its own), or ctx ends. It returns nil if the
	// peer ended its side in order, an error wrapping ErrClosed if the
	// link was lost or reset instead, or ctx's error.
	Shutdown(ctx context.Context) error
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

	// dlMu orders deadline changes with Close, so an operation arming its
	// deadline cannot undo the past deadline by which Close interrupts it.
	dlMu sync.Mutex
	// readLimit, once a write failed, bounds how long Recv still waits for
	// frames the peer sent before the link broke (zero: no bound).
	readLimit time.Time
	// writeErr is the error of the failed write that ended sending.
	writeErr error // guarded by sendMu
	// torn: a write failed, so the stream may end inside a frame (or a TLS
	// record); the orderly close then sends no close_notify.
	torn bool // guarded by sendMu

	// gone is closed once the socket is closed; peerErr says how the
	// peer's side ended (nil: in order).
	gone    chan struct{}
	peerErr error
}

const streamBuf = 64 << 10

// Bounds of the orderly close on TCP. The peer normally ends its side at
// once (its Recv sees the end of the stream and closes); one that does not
// is reset after lingerTimeout, or once it has sent lingerBytes more, as it
// is then streaming, not ending.
const (
	lingerTimeout = 2 * time.Second
	lingerBytes   = 4 << 20
)

// halfCloser is a stream whose write side can end alone (TCP FIN).
type halfCloser interface {
	io.Reader
	CloseWrite() error
}

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
		gone:   make(chan struct{}),
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
		c.dlMu.Lock()
		close(c.closed)
		if c.dl != nil {
			// Interrupt the operations in progress; they see "closed
			// locally" and leave the stream to the orderly close.
			past := time.Unix(1, 0)
			_ = c.dl.SetReadDeadline(past)
			_ = c.dl.SetWriteDeadline(past)
		}
		c.dlMu.Unlock()
		hc, ok := c.raw.(halfCloser)
		if !ok || c.dl == nil {
			// Nothing to end in order (an in-memory stream in tests).
			if c.raw != nil {
				c.closeErr = c.raw.Close()
			}
			c.peerErr = fmt.Errorf("%w: closed without waiting for the peer", ErrClosed)
			close(c.gone)
			return
		}
		go c.linger(hc)
	})
	if c.closeErr != nil && !errors.Is(c.closeErr, net.ErrClosed) {
		return fmt.Errorf("wire: close: %w", c.closeErr)
	}
	return nil
}

// linger ends a TCP link in order: it sends TLS close_notify and a FIN after
// the last frame, and reads and discards what the peer still sends until the
// peer ends its side too, within bounds. Closing a socket with unread data
// instead makes the kernel reset the connection, dropping whatever this side
// had sent but not yet delivered; and a peer whose write then fails could
// give up before reading frames that had arrived.
func (c *streamConn) linger(hc halfCloser) {
	defer close(c.gone)
	deadline := time.Now().Add(lingerTimeout)
	// Both operations in progress were interrupted by Close; none can
	// start again, so the stream is this goroutine's from here.
	c.recvMu <- struct{}{}
	c.sendMu <- struct{}{}
	torn := c.torn
	// Read while writing the end: a peer blocked writing to us (we were not
	// reading) would otherwise never read our close_notify.
	_ = c.dl.SetReadDeadline(deadline)
	drained := make(chan error, 1)
	go func() { drained <- drain(hc, lingerBytes) }()
	if !torn {
		_ = c.dl.SetWriteDeadline(deadline)
		if tc, ok := c.rw.(interface{ CloseWrite() error }); ok && any(c.rw) != any(c.raw) {
			_ = tc.CloseWrite() // TLS close_notify (crypto/tls bounds it too)
		}
	}
	_ = hc.CloseWrite()
	err := <-drained
	if err != nil {
		c.peerErr = fmt.Errorf("%w: the peer did not end its side in order: %w", ErrClosed, err)
	}
	// An error closing a socket nobody uses any more helps no one.
	_ = c.raw.Close()
}

// drain reads and discards r until it ends; nil means it ended in order
// (EOF), within max bytes.
func drain(r io.Reader, max int64) error {
	n, err := io.Copy(io.Discard, io.LimitReader(r, max))
	switch {
	case err != nil:
		return err
	case n >= max:
		return fmt.Errorf("it sent %d bytes more and goes on", n)
	}
	return nil
}

func (c *streamConn) Shutdown(ctx context.Context) error {
	_ = c.Close()
	select {
	case <-c.gone:
		if c.peerErr != nil {
			return fmt.Errorf("wire: shutdown: %w", c.peerErr)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wire: shutdown: waiting for the peer to end its side: %w", ctx.Err())
	}
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
// I/O. limit, if not zero, bounds the I/O as well.
func (c *streamConn) arm(ctx context.Context, set func(time.Time) error, limit time.Time) (disarm func()) {
	past := time.Unix(1, 0)
	c.dlMu.Lock()
	dl, hasDL := ctx.Deadline()
	if !limit.IsZero() && (!hasDL || limit.Before(dl)) {
		dl, hasDL = limit, true
	}
	switch {
	case c.isClosed():
		_ = set(past)
	case hasDL:
		_ = set(dl)
	}
	c.dlMu.Unlock()
	var stop func() bool
	fired := make(chan struct{})
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, func() {
			_ = set(past)
			close(fired)
		})
	}
	return func() {
		if stop != nil && !stop() {
			<-fired // the past deadline must not land after we clear it
		}
		c.dlMu.Lock()
		if !c.isClosed() {
			_ = set(time.Time{})
		}
		c.dlMu.Unlock()
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
	if c.writeErr != nil {
		return fmt.Errorf("wire: send %s: %w", f.Type, c.writeErr)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("wire: send %s: %w", f.Type, err)
	}
	var disarm func()
	if c.dl != nil {
		disarm = c.arm(ctx, c.dl.SetWriteDeadline, time.Time{})
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
	// refuses all writes after a write timeout): nothing more can be sent.
	c.torn = true
	err = c.ioErr(ctx, err)
	if isCtxErr(err) || c.dl == nil {
		// The peer is fine, we gave up: the link ends here.
		_ = c.Close()
	} else {
		// The link broke (typically the peer closed after its last
		// message and our write met its reset). What it sent before
		// has arrived and is still for Recv to read; the failure of the
		// stream will end Recv too, and readLimit makes sure of it.
		c.writeErr = err
		c.dlMu.Lock()
		c.readLimit = time.Now().Add(lingerTimeout)
		c.dlMu.Unlock()
	}
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
		c.dlMu.Lock()
		limit := c.readLimit
		c.dlMu.Unlock()
		disarm = c.arm(ctx, c.dl.SetReadDeadline, limit)
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
	case errors.Is(err, os.ErrDeadlineExceeded) && c.pastReadLimit():
		return fmt.Errorf("%w: link lost: nothing more arrived after a write failed", ErrClosed)
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

// pastReadLimit reports whether the bound that a failed write put on
// reading has passed.
func (c *streamConn) pastReadLimit() bool {
	c.dlMu.Lock()
	defer c.dlMu.Unlock()
	return !c.readLimit.IsZero() && !time.Now().Before(c.readLimit)
}

// isRemoteAlert reports whether err is a TLS alert sent by the peer
// (crypto/tls reports those as a net.OpError with Op "remote error").
func isRemoteAlert(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "remote error"
}
