package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Client is a QMP connection. Create it with Dial or New.
type Client struct {
	conn     net.Conn
	opts     options
	log      *slog.Logger
	greeting Greeting

	writeMu sync.Mutex // one writer at a time; a message is never interleaved

	mu      sync.Mutex
	pending map[uint64]chan message
	lastID  uint64 // highest id sent; a reply at or below it that is not pending is late
	err     error  // set once, when the connection ends

	done       chan struct{}
	readerDone chan struct{}

	subsMu     sync.Mutex
	subs       map[*subscription]struct{}
	subsClosed bool
	dropped    atomic.Uint64
}

type subscription struct {
	names []string // nil means all
	ch    chan Event
}

// connError is the terminal error of a connection. It always matches
// ErrClosed; when the cause was bad input it also matches ErrProtocol.
type connError struct {
	cause error
}

func (e *connError) Error() string {
	if errors.Is(e.cause, ErrProtocol) {
		return e.cause.Error() + " (connection closed)"
	}
	if e.cause == ErrClosed {
		return ErrClosed.Error()
	}
	return ErrClosed.Error() + ": " + e.cause.Error()
}

func (e *connError) Is(target error) bool { return target == ErrClosed }
func (e *connError) Unwrap() error        { return e.cause }

// Dial connects to a QMP server on network ("unix" or "tcp") at addr, reads
// the greeting and negotiates capabilities. ctx bounds the whole handshake.
func Dial(ctx context.Context, network, addr string, opts ...Option) (*Client, error) {
	switch network {
	case "unix", "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("qmp: dial: unsupported network %q (want unix or tcp)", network)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s %s: %w", network, addr, err)
	}
	c, err := New(ctx, conn, opts...)
	if err != nil {
		return nil, fmt.Errorf("qmp: %s %s: %w", network, addr, err)
	}
	return c, nil
}

// New runs the QMP handshake over conn and starts the client. On error conn
// is closed. The client owns conn from here on.
func New(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	if conn == nil {
		return nil, errors.New("qmp: New: nil connection")
	}
	o := defaultOptions()
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	c := &Client{
		conn:       conn,
		opts:       o,
		log:        o.logger,
		pending:    make(map[uint64]chan message),
		done:       make(chan struct{}),
		readerDone: make(chan struct{}),
		subs:       make(map[*subscription]struct{}),
	}
	lr := newLineReader(conn, o.maxMessage)

	g, err := readGreeting(ctx, conn, lr)
	if err != nil {
		conn.Close()
		return nil, err
	}
	c.greeting = g
	go c.readLoop(lr)

	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("qmp: capabilities negotiation: %w", err)
	}
	return c, nil
}

// readGreeting reads the server's first message, giving up when ctx ends.
func readGreeting(ctx context.Context, conn net.Conn, lr *lineReader) (Greeting, error) {
	// A read deadline in the past is the only portable way to interrupt a
	// blocked Read; it is cleared again before the read loop starts.
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	line, err := lr.next()
	if !stop() {
		return Greeting{}, fmt.Errorf("qmp: waiting for greeting: %w", context.Cause(ctx))
	}
	if err != nil {
		if errors.Is(err, ErrProtocol) {
			return Greeting{}, fmt.Errorf("qmp: reading greeting: %w", err)
		}
		return Greeting{}, fmt.Errorf("qmp: reading greeting: %w: %w", ErrClosed, err)
	}
	m, err := decodeMessage(line)
	if err != nil {
		return Greeting{}, fmt.Errorf("qmp: reading greeting: %w", err)
	}
	if m.kind != kindGreeting {
		return Greeting{}, fmt.Errorf("qmp: reading greeting: %w: got %s instead: %s", ErrProtocol, m.kind, snippet(line))
	}
	return m.greeting, nil
}

// Greeting returns what the server announced on connect.
func (c *Client) Greeting() Greeting { return c.greeting }

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err says why the connection ended; nil while it is open. The error wraps
// ErrClosed, and also ErrProtocol when bad input ended it.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the connection. Pending calls fail with ErrClosed and
// subscriber channels are closed. Close is idempotent.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	<-c.readerDone
	return nil
}

// DroppedEvents counts events not delivered because a subscriber's buffer
// was full.
func (c *Client) DroppedEvents() uint64 { return c.dropped.Load() }

// fail ends the connection with cause (once); later causes are ignored.
func (c *Client) fail(cause error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = &connError{cause: cause}
	c.pending = nil
	close(c.done)
	c.mu.Unlock()

	if cause != ErrClosed {
		c.log.Warn("qmp connection ended", "err", cause)
	}
	c.conn.Close()

	c.subsMu.Lock()
	c.subsClosed = true
	for s := range c.subs {
		close(s.ch)
	}
	clear(c.subs)
	c.subsMu.Unlock()
}

// readLoop is the single reader. It never blocks on anything but the socket:
// replies go to 1-buffered channels, events to non-blocking sends.
func (c *Client) readLoop(lr *lineReader) {
	defer close(c.readerDone)
	c.conn.SetReadDeadline(time.Time{})
	for {
		line, err := lr.next()
		if err != nil {
			if errors.Is(err, ErrProtocol) {
				c.fail(err)
			} else {
				c.fail(fmt.Errorf("read: %w", err))
			}
			return
		}
		m, err := decodeMessage(line)
		if err != nil {
			c.fail(err)
			return
		}
		switch m.kind {
		case kindEvent:
			c.dispatch(m.event)
		case kindReturn, kindError:
			if err := c.deliver(m, line); err != nil {
				c.fail(err)
				return
			}
		case kindGreeting:
			c.fail(fmt.Errorf("%w: unexpected second greeting", ErrProtocol))
			return
		}
	}
}

// deliver hands a reply to its waiting caller.
func (c *Client) deliver(m message, line []byte) error {
	if m.id == nil {
		// QEMU omits the id only when it could not parse a request, so
		// our output stream is damaged; nothing later can be trusted.
		return fmt.Errorf("%w: %s without id: %s", ErrProtocol, m.kind, snippet(line))
	}
	id, ok := parseID(m.id)
	c.mu.Lock()
	ch, pending := c.pending[id]
	last := c.lastID
	if pending && ok {
		delete(c.pending, id)
	}
	c.mu.Unlock()
	switch {
	case ok && pending:
		ch <- m // 1-buffered and only this reply is ever sent on it
		return nil
	case ok && id > 0 && id <= last:
		c.log.Debug("qmp: ignoring late reply to abandoned request", "id", id)
		return nil
	default:
		return fmt.Errorf("%w: %s with unknown id %.40s", ErrProtocol, m.kind, m.id)
	}
}

// dispatch fans an event out without ever blocking.
func (c *Client) dispatch(ev Event) {
	c.subsMu.Lock()
	defer c.subsMu.Unlock()
	for s := range c.subs {
		if s.names != nil && !slices.Contains(s.names, ev.Name) {
			continue
		}
		select {
		case s.ch <- ev:
		default:
			n := c.dropped.Add(1)
			c.log.Debug("qmp: subscriber buffer full, dropping event", "event", ev.Name, "dropped_total", n)
		}
	}
}

// Subscribe returns a channel receiving the events whose name is in names
// (all events if names is empty), and a func that ends the subscription and
// closes the channel. The channel is also closed when the connection ends.
// Events that arrive while the channel's buffer is full are dropped and
// counted in DroppedEvents; they never delay command replies.
func (c *Client) Subscribe(names ...string) (<-chan Event, func()) {
	s := &subscription{ch: make(chan Event, c.opts.eventBuffer)}
	if len(names) > 0 {
		s.names = slices.Clone(names)
	}
	c.subsMu.Lock()
	if c.subsClosed {
		close(s.ch)
		c.subsMu.Unlock()
		return s.ch, func() {}
	}
	c.subs[s] = struct{}{}
	c.subsMu.Unlock()

	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			c.subsMu.Lock()
			defer c.subsMu.Unlock()
			if _, ok := c.subs[s]; ok {
				delete(c.subs, s)
				close(s.ch)
			}
		})
	}
}

// Execute runs command with args (marshalled to JSON; nil for none) and
// decodes the reply's return value into result (nil to discard it). A QMP
// error reply is returned as *Error.
//
// When ctx ends first, Execute returns ctx's error, but QEMU may still run
// the command: a timed-out "stop" can have stopped the guest. Events that
// QEMU sent before the reply (e.g. STOP before the reply to "stop") are in
// the subscriber channels, buffer permitting, by the time Execute returns.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	return c.execute(ctx, command, args, -1, result)
}

// ExecuteFD is Execute that also passes fd to QEMU in the same sendmsg, as
// SCM_RIGHTS ancillary data (as getfd and add-fd expect). It needs a unix
// socket connection. The caller keeps ownership of fd; QEMU gets a copy.
func (c *Client) ExecuteFD(ctx context.Context, command string, args any, fd int, result any) error {
	if fd < 0 {
		return fmt.Errorf("qmp: %s: invalid file descriptor %d", command, fd)
	}
	return c.execute(ctx, command, args, fd, result)
}

type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
	ID        uint64          `json:"id"`
}

func (c *Client) execute(ctx context.Context, command string, args any, fd int, result any) error {
	if command == "" {
		return errors.New("qmp: empty command name")
	}
	if ctx == nil {
		return fmt.Errorf("qmp: %s: nil context", command)
	}
	var uc *net.UnixConn
	if fd >= 0 {
		var ok bool
		if uc, ok = c.conn.(*net.UnixConn); !ok {
			return fmt.Errorf("qmp: %s: passing a file descriptor needs a unix socket, have %T: %w",
				command, c.conn, errors.ErrUnsupported)
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("qmp: %s: %w", command, err)
	}

	var argsJSON json.RawMessage
	if args != nil {
		a, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("qmp: %s: encoding arguments: %w", command, err)
		}
		if string(a) != "null" { // a nil pointer or map means no arguments
			if a[0] != '{' {
				return fmt.Errorf("qmp: %s: arguments must encode to a JSON object, %T gives %s", command, args, snippet(a))
			}
			argsJSON = a
		}
	}

	// Register before writing so a fast reply always finds its caller.
	ch := make(chan message, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp: %s: %w", command, err)
	}
	c.lastID++
	id := c.lastID
	c.pending[id] = ch
	c.mu.Unlock()

	forget := func() {
		c.mu.Lock()
		delete(c.pending, id) // no-op on a nil map after fail
		c.mu.Unlock()
	}

	b, err := json.Marshal(request{Execute: command, Arguments: argsJSON, ID: id})
	if err != nil { // cannot happen: every field is already valid JSON
		forget()
		return fmt.Errorf("qmp: %s: encoding request: %w", command, err)
	}
	b = append(b, '\n')

	if err := c.write(ctx, command, b, uc, fd); err != nil {
		forget()
		return err
	}

	select {
	case m := <-ch:
		return c.finish(command, m, result)
	case <-ctx.Done():
		forget()
		// The reply may have raced in with the cancellation; prefer it.
		select {
		case m := <-ch:
			return c.finish(command, m, result)
		default:
		}
		return fmt.Errorf("qmp: %s: no reply: %w", command, context.Cause(ctx))
	case <-c.done:
		select {
		case m := <-ch:
			return c.finish(command, m, result)
		default:
		}
		return fmt.Errorf("qmp: %s: %w", command, c.Err())
	}
}

func (c *Client) finish(command string, m message, result any) error {
	if m.kind == kindError {
		return &Error{Command: command, Class: m.errClass, Desc: m.errDesc}
	}
	if result == nil {
		return nil
	}
	if err := json.Unmarshal(m.ret, result); err != nil {
		return fmt.Errorf("%w: %s: decoding reply %s into %T: %v", ErrProtocol, command, snippet(m.ret), result, err)
	}
	return nil
}

// write sends one whole request under the writer lock, honouring ctx. A
// write cut short part-way leaves half a request in QEMU's parser, so the
// connection is ended rather than reused.
func (c *Client) write(ctx context.Context, command string, b []byte, uc *net.UnixConn, fd int) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()

	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetWriteDeadline(dl)
	}
	// Interrupt a blocked write on cancellation. The callback may still be
	// running when stop reports false, so wait for it before clearing the
	// deadline, or it could hit the next writer.
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		c.conn.SetWriteDeadline(time.Unix(1, 0))
	})
	defer func() {
		if !stop() {
			<-fired
		}
		c.conn.SetWriteDeadline(time.Time{})
	}()

	var n int
	var err error
	if uc != nil {
		n, _, err = uc.WriteMsgUnix(b, unix.UnixRights(fd), nil)
		if err == nil && n < len(b) {
			var m int
			m, err = uc.Write(b[n:])
			n += m
		}
	} else {
		n, err = c.conn.Write(b)
	}
	if err == nil {
		return nil
	}
	// The socket deadline is ctx's deadline, so a timeout here is ctx
	// ending even if ctx has not noticed yet.
	timedOut := errors.Is(err, os.ErrDeadlineExceeded)
	if timedOut {
		if ctx.Err() != nil {
			err = context.Cause(ctx)
		} else {
			err = context.DeadlineExceeded
		}
	}
	if n > 0 {
		c.fail(fmt.Errorf("write of %s cut off after %d of %d bytes: %w", command, n, len(b), err))
		return fmt.Errorf("qmp: %s: %w", command, c.Err())
	}
	if timedOut {
		return fmt.Errorf("qmp: %s: sending: %w", command, err)
	}
	// Any other write error (closed, EPIPE, ECONNRESET, ...) means the
	// connection is gone; fail is a no-op if it already ended.
	c.fail(fmt.Errorf("write: %w", err))
	return fmt.Errorf("qmp: %s: %w", command, c.Err())
}
