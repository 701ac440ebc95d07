// Package checker owns the client side of the test guest's TCP service
// (cmd/ftguest, workload tcp): its checksummed reply protocol (a global
// sequence number and a per-connection hash chain over every request line,
// see Hello and NextSum), and a client that keeps one long-lived connection
// and many short ones against a (protected) VM, verifies every reply, and
// tells after a failover whether a connection was reset or any acknowledged
// request went missing. `ftctl demo` and the randomized kill test run it
// from the client's network namespace (Config.Dial).
//
// What "acknowledged" and "missing" mean. A request is acknowledged when
// its reply arrived and verified: it echoes the request, its seq is above
// every seq the client had verified before sending the request, and its sum
// equals the client's own chain S(i) over requests 1..i of the connection.
// Since S(i) covers every earlier request, each later verified reply on the
// same connection proves again that the server still holds all requests
// before it, acknowledged or not, exactly once and in order. An
// acknowledged request i is missing when a later reply to request m > i
// carries S(x) chained with line(m) for some x < i: the server's state went
// back to before request i (Report.AckedLost, ErrLost). After a failover,
// Verify waits for the long-lived connection that was open at the failover
// to acknowledge a request sent after it: the connection survived, and by
// the chain nothing acknowledged before the failover is missing.
package checker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for zero Config fields.
const (
	DefaultInterval      = 50 * time.Millisecond
	DefaultTimeout       = 5 * time.Second
	DefaultShortRequests = 3
)

// maxOutstanding bounds the requests the long-lived connection sends
// without a reply (a long outage): they are kept in memory and in the
// socket buffers, and every one of them is answered after a failover.
const maxOutstanding = 2048

// maxEvents bounds the detailed events kept per kind.
const maxEvents = 16

// maxGaps bounds the remembered gaps between replies.
const maxGaps = 1024

// Config configures a Checker.
type Config struct {
	// Addr is the service's host:port.
	Addr string
	// Interval is how often the long-lived connection sends a request,
	// and the pause of each short-connection worker between connections.
	// Default DefaultInterval.
	Interval time.Duration
	// Timeout bounds a dial, a write, and the wait for a reply. The
	// long-lived connection counts a timeout when its oldest unanswered
	// request is older than this but keeps waiting: after a failover the
	// reply must still come. A short connection gives up and closes.
	// Default DefaultTimeout.
	Timeout time.Duration
	// ShortConns is how many workers run short connections in parallel
	// (each: connect, 1..ShortRequests requests, close, repeat); 0: none.
	ShortConns int
	// ShortRequests is the most requests per short connection. Default
	// DefaultShortRequests.
	ShortRequests int
	// Dial opens connections, e.g. from inside a network namespace.
	// Default: a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Logger receives connection events and every error. Default: none.
	Logger *slog.Logger
}

// Checker runs and checks the client traffic. It is safe for concurrent
// use; Run is called once.
type Checker struct {
	cfg     Config
	log     *slog.Logger
	started atomic.Bool

	mu        sync.Mutex
	start     time.Time
	sent      uint64
	replies   uint64
	acked     uint64
	ackedLost uint64
	maxSeq    uint64
	errs      map[Kind]uint64
	events    []Event
	longConns int
	longReset bool
	long      *stream // the current long-lived connection's stream
	longOld   *stream // the one before it, for Verify
	shortDone []time.Time
	shortOK   uint64
	shortBad  uint64
	shortN    int
	lastAck   Ack
	lastReply time.Time // last verified reply, any connection
	gaps      []Gap     // longer than 2*Interval, newest last
	longest   Gap
	changed   chan struct{} // closed and replaced on every ack or error
	stopped   bool          // Run returned
}

// New checks cfg and returns a Checker for it.
func New(cfg Config) (*Checker, error) {
	if _, _, err := net.SplitHostPort(cfg.Addr); err != nil {
		return nil, fmt.Errorf("%w: Addr %q: %v", ErrConfig, cfg.Addr, err)
	}
	switch {
	case cfg.Interval < 0:
		return nil, fmt.Errorf("%w: Interval %v is negative", ErrConfig, cfg.Interval)
	case cfg.Timeout < 0:
		return nil, fmt.Errorf("%w: Timeout %v is negative", ErrConfig, cfg.Timeout)
	case cfg.ShortConns < 0 || cfg.ShortConns > 1024:
		return nil, fmt.Errorf("%w: ShortConns %d not in 0..1024", ErrConfig, cfg.ShortConns)
	case cfg.ShortRequests < 0 || cfg.ShortRequests > 1000:
		return nil, fmt.Errorf("%w: ShortRequests %d not in 0..1000", ErrConfig, cfg.ShortRequests)
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.ShortRequests == 0 {
		cfg.ShortRequests = DefaultShortRequests
	}
	if cfg.Dial == nil {
		cfg.Dial = (&net.Dialer{}).DialContext
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Checker{cfg: cfg, log: log.With("addr", cfg.Addr), errs: map[Kind]uint64{}, changed: make(chan struct{})}, nil
}

// Run sends and checks traffic until ctx ends, then returns the final
// report's Err: nil when no violation was seen. It keeps redialling while
// the service is unreachable, so it may start before the VM is up.
func (c *Checker) Run(ctx context.Context) error {
	if !c.started.CompareAndSwap(false, true) {
		return errors.New("checker: Run called twice")
	}
	c.mu.Lock()
	c.start = time.Now()
	c.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { c.longLoop(ctx) })
	for range c.cfg.ShortConns {
		wg.Go(func() { c.shortLoop(ctx) })
	}
	wg.Wait()
	c.mu.Lock()
	c.stopped = true
	c.notifyLocked()
	c.mu.Unlock()
	return c.Snapshot().Err()
}

// Snapshot returns the report so far.
func (c *Checker) Snapshot() Report {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reportLocked(time.Now())
}

func (c *Checker) reportLocked(now time.Time) Report {
	r := Report{
		Addr: c.cfg.Addr, Start: c.start, Sent: c.sent, Replies: c.replies, Acked: c.acked,
		AckedLost: c.ackedLost, MaxSeq: c.maxSeq, Errors: make(map[Kind]uint64, len(c.errs)),
		Events: append([]Event(nil), c.events...), LongConns: c.longConns, LongReset: c.longReset,
		LastAck: c.lastAck, ShortDone: c.shortOK, ShortFailed: c.shortBad, LongestGap: c.longest,
	}
	if !c.start.IsZero() {
		r.Elapsed = now.Sub(c.start)
	}
	for k, n := range c.errs {
		r.Errors[k] = n
	}
	if c.long != nil {
		r.LongAcked = c.long.acks
	}
	if !c.lastReply.IsZero() {
		r.CurrentGap = now.Sub(c.lastReply)
	}
	return r
}

// notifyLocked wakes Verify.
func (c *Checker) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// recordLocked counts an error of kind k on conn.
func (c *Checker) recordLocked(now time.Time, conn string, k Kind, detail string) {
	c.errs[k]++
	n := 0
	for _, e := range c.events {
		if e.Kind == k {
			n++
		}
	}
	if n < maxEvents {
		c.events = append(c.events, Event{Time: now, Conn: conn, Kind: k, Detail: detail})
	}
	if k.Violation() {
		c.log.Warn("checker: violation", "conn", conn, "kind", string(k), "detail", detail)
	} else {
		c.log.Info("checker: error", "conn", conn, "kind", string(k), "detail", detail)
	}
	c.notifyLocked()
}

// replyLocked checks one reply line received on s at now; it reports
// whether the connection can go on.
func (c *Checker) replyLocked(s *stream, line []byte, now time.Time) bool {
	c.replies++
	r, err := ParseReply(line)
	if err != nil {
		c.recordLocked(now, s.id, KindCorrupt, err.Error())
		return false
	}
	v := s.check(r, now)
	for _, f := range v.findings {
		c.recordLocked(now, s.id, f.kind, f.detail)
	}
	c.ackedLost += v.ackedLost
	if v.ack != nil {
		c.acked++
		c.maxSeq = max(c.maxSeq, v.ack.Seq)
		if s == c.long {
			c.lastAck = *v.ack
		}
		// Readers stamp a reply before taking the lock, so stamps can
		// come in slightly out of order: a gap only ends at a newer one.
		if !c.lastReply.IsZero() && now.After(c.lastReply) {
			g := Gap{Start: c.lastReply, End: now}
			if g.Len() > c.longest.Len() {
				c.longest = g
			}
			if g.Len() > 2*c.cfg.Interval {
				if len(c.gaps) == maxGaps {
					c.gaps = append(c.gaps[:0], c.gaps[1:]...)
				}
				c.gaps = append(c.gaps, g)
			}
		}
		if now.After(c.lastReply) {
			c.lastReply = now
		}
		c.notifyLocked()
	}
	return !v.desync
}

// endLocked marks s closed; k is empty when the checker closed it itself.
func (c *Checker) endLocked(s *stream, now time.Time, k Kind, msg string) {
	if s.closed {
		return
	}
	s.closed, s.endKind, s.endMsg = true, k, msg
	if k != "" {
		c.recordLocked(now, s.id, k, msg)
		if k == KindReset && s == c.long {
			c.longReset = true
		}
	}
	c.notifyLocked()
}

// stopLocked marks s closed when the checker's own ctx ended (stopped),
// else as given up after a violation already counted.
func (c *Checker) stopLocked(ctx context.Context, s *stream, now time.Time) {
	if !s.closed && ctx.Err() != nil {
		s.stopped = true
	}
	c.endLocked(s, now, "", "")
}

// open dials and opts into the checksummed protocol.
func (c *Checker) open(ctx context.Context, id string) (net.Conn, *bufio.Reader, error) {
	dctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	conn, err := c.cfg.Dial(dctx, "tcp", c.cfg.Addr)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrDial, err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	conn.SetDeadline(time.Now().Add(c.cfg.Timeout))
	rd := bufio.NewReaderSize(conn, 4096)
	if _, err := io.WriteString(conn, Hello+"\n"); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("%w: send hello: %v", ErrDial, err)
	}
	line, err := readLine(rd)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("%w: hello reply: %v", ErrDial, err)
	}
	if got := string(trimEOL(line)); got != HelloReply {
		conn.Close()
		return nil, nil, fmt.Errorf("%w: server answered %.80q to %q, want %q: it does not speak the checksummed protocol (an older ftguest?)",
			ErrCorrupt, got, Hello, HelloReply)
	}
	conn.SetDeadline(time.Time{})
	c.log.Debug("checker: connected", "conn", id, "local", conn.LocalAddr())
	return conn, rd, nil
}

// dialFailed counts a failed open and waits before the next try.
func (c *Checker) dialFailed(ctx context.Context, id string, err error, wait time.Duration) {
	if ctx.Err() != nil {
		return
	}
	k := KindDial
	if errors.Is(err, ErrCorrupt) {
		k = KindCorrupt
	}
	c.mu.Lock()
	c.recordLocked(time.Now(), id, k, err.Error())
	c.mu.Unlock()
	sleep(ctx, wait)
}

func (c *Checker) longLoop(ctx context.Context) {
	backoff := c.cfg.Interval
	for n := 1; ctx.Err() == nil; n++ {
		id := fmt.Sprintf("L%d", n)
		conn, rd, err := c.open(ctx, id)
		if err != nil {
			c.dialFailed(ctx, id, err, backoff)
			backoff = min(2*backoff, time.Second)
			n--
			continue
		}
		backoff = c.cfg.Interval
		s := newStream(id, time.Now())
		c.mu.Lock()
		c.longConns++
		c.longOld, c.long = c.long, s
		c.notifyLocked()
		c.mu.Unlock()
		c.runLong(ctx, conn, rd, s)
		sleep(ctx, c.cfg.Interval)
	}
}

// runLong drives one long-lived connection until it breaks or ctx ends:
// a reader checks replies as they come; this goroutine sends a request
// every interval without waiting for replies, so requests queue up in an
// outage and all of them must be answered after it.
func (c *Checker) runLong(ctx context.Context, conn net.Conn, rd *bufio.Reader, s *stream) {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(cctx, func() { conn.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		defer cancel()
		for {
			line, err := readLine(rd)
			now := time.Now()
			c.mu.Lock()
			switch {
			case err == nil:
				if !c.replyLocked(s, line, now) {
					c.endLocked(s, now, "", "")
					c.mu.Unlock()
					return
				}
				c.mu.Unlock()
				continue
			case cctx.Err() != nil:
				c.stopLocked(ctx, s, now)
			case errors.Is(err, errTooLong):
				c.endLocked(s, now, KindCorrupt, err.Error())
			default:
				c.endLocked(s, now, KindReset, readErr(err))
			}
			c.mu.Unlock()
			return
		}
	})
	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	var buf []byte
	for {
		select {
		case <-cctx.Done():
			c.mu.Lock()
			c.stopLocked(ctx, s, time.Now())
			c.mu.Unlock()
			return
		case <-t.C:
		}
		now := time.Now()
		c.mu.Lock()
		if s.outstanding() > 0 && !s.stalled {
			if age := now.Sub(s.at(s.next).sent); age > c.cfg.Timeout {
				s.stalled = true
				c.recordLocked(now, s.id, KindTimeout, fmt.Sprintf("no reply to request %d for %v (%d unanswered); still waiting", s.next, age.Round(time.Millisecond), s.outstanding()))
			}
		}
		if s.outstanding() >= maxOutstanding {
			c.mu.Unlock()
			continue
		}
		line := fmt.Sprintf("%s-%d %08x", s.id, s.sent+1, rand.Uint32())
		s.add(line, now, c.maxSeq)
		c.sent++
		c.mu.Unlock()
		buf = append(append(buf[:0], line...), '\n')
		conn.SetWriteDeadline(now.Add(c.cfg.Timeout))
		if _, err := conn.Write(buf); err != nil {
			if cctx.Err() == nil {
				var ne net.Error
				k := KindReset
				if errors.As(err, &ne) && ne.Timeout() {
					// A partial line would corrupt the stream: give
					// the connection up.
					k = KindTimeout
				}
				c.mu.Lock()
				c.endLocked(s, time.Now(), k, "send: "+err.Error())
				c.mu.Unlock()
			}
			return
		}
	}
}

func (c *Checker) shortLoop(ctx context.Context) {
	for ctx.Err() == nil {
		c.mu.Lock()
		c.shortN++
		id := fmt.Sprintf("S%d", c.shortN)
		c.mu.Unlock()
		conn, rd, err := c.open(ctx, id)
		if err != nil {
			c.dialFailed(ctx, id, err, c.cfg.Interval)
			continue
		}
		s := newStream(id, time.Now())
		ok := c.runShort(ctx, conn, rd, s, 1+rand.IntN(c.cfg.ShortRequests))
		conn.Close()
		c.mu.Lock()
		if ok {
			c.shortOK++
			c.shortDone = append(c.shortDone, s.opened)
			if len(c.shortDone) > maxGaps {
				c.shortDone = append(c.shortDone[:0], c.shortDone[len(c.shortDone)/2:]...)
			}
			c.notifyLocked()
		} else if ctx.Err() == nil {
			c.shortBad++
		}
		c.mu.Unlock()
		sleep(ctx, c.cfg.Interval/2+rand.N(c.cfg.Interval))
	}
}

// runShort sends n requests one at a time on a fresh connection and
// checks each reply; it reports whether all verified.
func (c *Checker) runShort(ctx context.Context, conn net.Conn, rd *bufio.Reader, s *stream, n int) bool {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	for range n {
		now := time.Now()
		c.mu.Lock()
		line := fmt.Sprintf("%s-%d %08x", s.id, s.sent+1, rand.Uint32())
		s.add(line, now, c.maxSeq)
		c.sent++
		c.mu.Unlock()
		conn.SetDeadline(now.Add(c.cfg.Timeout))
		_, err := io.WriteString(conn, line+"\n")
		var reply []byte
		if err == nil {
			reply, err = readLine(rd)
		}
		now = time.Now()
		c.mu.Lock()
		if err != nil {
			if ctx.Err() == nil {
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout():
					c.recordLocked(now, s.id, KindTimeout, fmt.Sprintf("no reply to request %d within %v; closing", s.sent, c.cfg.Timeout))
				case errors.Is(err, errTooLong):
					c.recordLocked(now, s.id, KindCorrupt, err.Error())
				default:
					c.recordLocked(now, s.id, KindReset, readErr(err))
				}
			}
			c.mu.Unlock()
			return false
		}
		ok := c.replyLocked(s, reply, now) && s.acks == s.sent
		c.mu.Unlock()
		if !ok {
			return false
		}
	}
	return true
}

var errTooLong = fmt.Errorf("%w: reply line longer than %d bytes", ErrCorrupt, maxReply)

// readLine reads one line, newline included, of at most maxReply bytes.
// The result is valid until the next read.
func readLine(rd *bufio.Reader) ([]byte, error) {
	var acc []byte
	for {
		b, err := rd.ReadSlice('\n')
		switch {
		case err == nil && acc == nil:
			return b, nil
		case err == nil:
			return append(acc, b...), nil
		case !errors.Is(err, bufio.ErrBufferFull):
			return nil, err
		}
		acc = append(acc, b...)
		if len(acc) > maxReply {
			return nil, errTooLong
		}
	}
}

func trimEOL(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
	}
	if n := len(b); n > 0 && b[n-1] == '\r' {
		b = b[:n-1]
	}
	return b
}

func readErr(err error) string {
	if errors.Is(err, io.EOF) {
		return "closed by the server"
	}
	return err.Error()
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
