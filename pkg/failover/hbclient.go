package failover

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"time"
)

// HeartbeatClientConfig configures a HeartbeatClient.
type HeartbeatClientConfig struct {
	// Key is the pair's shared heartbeat key, at least MinKeyLen bytes.
	Key []byte
	// Interval between pings. Default DefaultInterval.
	Interval time.Duration
	// Heard is called for every authentic pong answering a recent ping,
	// with its round-trip time: wire it to Detector.Heard(ctx, PathMgmt).
	// It must not block.
	Heard func(rtt time.Duration)
}

// window of pings a pong may answer: older pongs are refused as stale.
const hbOutstanding = 64

// HeartbeatClient pings a HeartbeatServer every Interval and reports each
// valid pong.
type HeartbeatClient struct {
	conn    net.PacketConn
	remote  net.Addr
	cfg     HeartbeatClientConfig
	session uint64
	ctr     hbCounters

	mu       sync.Mutex
	seq      uint64 // last ping sent
	nonce    uint64 // server nonce to echo
	sentAt   [hbOutstanding]time.Time
	answered replayWindow
	rtt      rttStats
	ran      bool
}

type rttStats struct {
	n            int
	last, lo, hi time.Duration
	sum          float64
}

// DialHeartbeat opens a UDP socket (on local, "host:port", or any address
// if empty) for pinging the server at remote.
func DialHeartbeat(ctx context.Context, local, remote string, cfg HeartbeatClientConfig) (*HeartbeatClient, error) {
	if err := checkKey(cfg.Key, "heartbeat"); err != nil {
		return nil, err
	}
	raddr, err := net.ResolveUDPAddr("udp", remote)
	if err != nil {
		return nil, fmt.Errorf("%w: heartbeat server address %q: %v", ErrConfig, remote, err)
	}
	if local == "" {
		local = ":0"
	}
	var lc net.ListenConfig
	conn, err := lc.ListenPacket(ctx, "udp", local)
	if err != nil {
		return nil, fmt.Errorf("heartbeat client listen on %q: %w", local, err)
	}
	c, err := NewHeartbeatClient(conn, raddr, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// NewHeartbeatClient returns a client sending from conn, which it takes
// over, to remote.
func NewHeartbeatClient(conn net.PacketConn, remote net.Addr, cfg HeartbeatClientConfig) (*HeartbeatClient, error) {
	if err := checkKey(cfg.Key, "heartbeat"); err != nil {
		return nil, err
	}
	if remote == nil {
		return nil, fmt.Errorf("%w: heartbeat client has no server address", ErrConfig)
	}
	if cfg.Interval < 0 {
		return nil, fmt.Errorf("%w: heartbeat Interval %v is negative", ErrConfig, cfg.Interval)
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	cfg.Key = append([]byte(nil), cfg.Key...)
	return &HeartbeatClient{conn: conn, remote: remote, cfg: cfg, session: randNonZero()}, nil
}

// LocalAddr returns the client's socket address.
func (c *HeartbeatClient) LocalAddr() net.Addr { return c.conn.LocalAddr() }

// Stats returns the client's counters and RTT figures.
func (c *HeartbeatClient) Stats() HeartbeatStats {
	st := c.ctr.stats()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rtt.n > 0 {
		st.LastRTT, st.MinRTT, st.MaxRTT = c.rtt.last, c.rtt.lo, c.rtt.hi
		st.MeanRTT = time.Duration(c.rtt.sum / float64(c.rtt.n))
	}
	return st
}

// Close closes the socket; Run returns.
func (c *HeartbeatClient) Close() error { return c.conn.Close() }

// Run pings until ctx is done or the client is closed, then closes the
// socket. Send errors (no route yet, ICMP unreachable) are not fatal: a
// path that is down is what the detector is for.
func (c *HeartbeatClient) Run(ctx context.Context) error {
	c.mu.Lock()
	if c.ran {
		c.mu.Unlock()
		return fmt.Errorf("%w: heartbeat Run called twice", ErrConfig)
	}
	c.ran = true
	c.mu.Unlock()
	defer c.conn.Close()
	stop := context.AfterFunc(ctx, func() { c.conn.Close() })
	defer stop()

	readErr := make(chan error, 1)
	go func() { readErr <- c.readLoop(ctx) }()

	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	out := make([]byte, 0, hbLen)
	for {
		c.mu.Lock()
		c.seq++
		p := hbPacket{Type: hbPing, Session: c.session, Seq: c.seq, Nonce: c.nonce}
		c.sentAt[p.Seq%hbOutstanding] = time.Now()
		c.mu.Unlock()
		out = appendHeartbeat(out[:0], c.cfg.Key, p)
		if _, err := c.conn.WriteTo(out, c.remote); err == nil {
			c.ctr.sent.Add(1)
		} else if errors.Is(err, net.ErrClosed) {
			c.conn.Close()
			return <-readErr
		}
		select {
		case <-t.C:
		case err := <-readErr:
			return err
		}
	}
}

func (c *HeartbeatClient) readLoop(ctx context.Context) error {
	buf := make([]byte, 2*hbLen)
	for {
		n, _, err := c.conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// ECONNREFUSED from an earlier send's ICMP error, and the like.
			if isTransient(err) {
				continue
			}
			return fmt.Errorf("heartbeat client read: %w", err)
		}
		rtt, err := c.handle(buf[:n])
		if err != nil {
			c.ctr.count(err)
			continue
		}
		c.ctr.accepted.Add(1)
		if c.cfg.Heard != nil {
			c.cfg.Heard(rtt)
		}
	}
}

func (c *HeartbeatClient) handle(b []byte) (time.Duration, error) {
	p, err := decodeHeartbeat(c.cfg.Key, b)
	if err != nil {
		return 0, err
	}
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case p.Type != hbPong:
		return 0, fmt.Errorf("%w: client got a heartbeat of type %d", ErrReplay, p.Type)
	case p.Session != c.session:
		return 0, fmt.Errorf("%w: pong for session %x, not ours", ErrReplay, p.Session)
	case p.Seq > c.seq || c.seq-p.Seq >= hbOutstanding:
		return 0, fmt.Errorf("%w: pong for ping %d, last sent %d", ErrReplay, p.Seq, c.seq)
	case p.Nonce == 0:
		return 0, fmt.Errorf("%w: pong without a nonce", ErrMalformed)
	case !c.answered.accept(p.Seq):
		return 0, fmt.Errorf("%w: ping %d already answered", ErrReplay, p.Seq)
	}
	c.nonce = p.Nonce
	rtt := now.Sub(c.sentAt[p.Seq%hbOutstanding])
	r := &c.rtt
	r.last = rtt
	if r.n == 0 || rtt < r.lo {
		r.lo = rtt
	}
	r.hi = max(r.hi, rtt)
	r.n++
	r.sum += float64(rtt)
	if r.n == math.MaxInt {
		r.n, r.sum = 1, float64(rtt)
	}
	return rtt, nil
}
