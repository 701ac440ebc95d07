package failover

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// HeartbeatStats counts what a heartbeat endpoint saw.
type HeartbeatStats struct {
	Sent      uint64 // datagrams sent (pings by a client, pongs by a server)
	Accepted  uint64 // authentic, fresh packets counted as a sign of life
	Unproven  uint64 // server: authentic pings with an old nonce, answered but not counted
	Refused   uint64 // failed authentication
	Replayed  uint64 // authentic but seen before, or not for an outstanding ping
	Malformed uint64 // not a heartbeat packet
	// RTT statistics of accepted pongs (client only).
	LastRTT, MinRTT, MaxRTT, MeanRTT time.Duration
}

type hbCounters struct {
	sent, accepted, unproven, refused, replayed, malformed atomic.Uint64
}

func (c *hbCounters) count(err error) {
	switch {
	case errors.Is(err, ErrAuth):
		c.refused.Add(1)
	case errors.Is(err, ErrReplay):
		c.replayed.Add(1)
	default:
		c.malformed.Add(1)
	}
}

func (c *hbCounters) stats() HeartbeatStats {
	return HeartbeatStats{
		Sent: c.sent.Load(), Accepted: c.accepted.Load(), Unproven: c.unproven.Load(),
		Refused: c.refused.Load(), Replayed: c.replayed.Load(), Malformed: c.malformed.Load(),
	}
}

// HeartbeatServerConfig configures a HeartbeatServer.
type HeartbeatServerConfig struct {
	// Key is the pair's shared heartbeat key, at least MinKeyLen bytes.
	Key []byte
	// Heard is called for every authentic, fresh ping: wire it to
	// Detector.Heard(ctx, PathMgmt). It must not block.
	Heard func()
	// Rotate is how often the server changes its nonce; a recorded ping is
	// worthless after two rotations. Default 10 s.
	Rotate time.Duration
	// Clock defaults to RealClock.
	Clock Clock
}

// maxSessions bounds the server's per-session state. Only authentic
// packets create state, so this is a guard against a misbehaving peer.
const maxSessions = 1024

// HeartbeatServer answers authenticated pings on a UDP socket and reports
// each fresh one as a sign of life of the client.
type HeartbeatServer struct {
	conn net.PacketConn
	cfg  HeartbeatServerConfig
	ctr  hbCounters

	mu        sync.Mutex
	nonce     [2]uint64 // current, previous
	gen       uint64    // generation of nonce[0]
	rotatedAt time.Time
	sessions  map[uint64]*hbSession
	served    bool
}

type hbSession struct {
	win replayWindow
	gen uint64 // generation of the last nonce accepted from it
}

// ListenHeartbeat opens a UDP socket on addr ("host:port") and returns a
// server on it; call Serve.
func ListenHeartbeat(ctx context.Context, addr string, cfg HeartbeatServerConfig) (*HeartbeatServer, error) {
	if err := checkKey(cfg.Key, "heartbeat"); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	conn, err := lc.ListenPacket(ctx, "udp", addr)
	if err != nil {
		return nil, fmt.Errorf("heartbeat server listen on %q: %w", addr, err)
	}
	s, err := NewHeartbeatServer(conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

// NewHeartbeatServer returns a server on conn, which it takes over (for
// instance a socket opened inside a network namespace with InNetns).
func NewHeartbeatServer(conn net.PacketConn, cfg HeartbeatServerConfig) (*HeartbeatServer, error) {
	if err := checkKey(cfg.Key, "heartbeat"); err != nil {
		return nil, err
	}
	if cfg.Rotate < 0 {
		return nil, fmt.Errorf("%w: heartbeat Rotate %v is negative", ErrConfig, cfg.Rotate)
	}
	if cfg.Rotate == 0 {
		cfg.Rotate = 10 * time.Second
	}
	cfg.Clock = clockOr(cfg.Clock)
	cfg.Key = append([]byte(nil), cfg.Key...)
	s := &HeartbeatServer{conn: conn, cfg: cfg, sessions: make(map[uint64]*hbSession)}
	s.nonce[0] = randNonZero()
	s.rotatedAt = cfg.Clock.Now()
	return s, nil
}

// Addr returns the server's local address.
func (s *HeartbeatServer) Addr() net.Addr { return s.conn.LocalAddr() }

// Stats returns the server's counters.
func (s *HeartbeatServer) Stats() HeartbeatStats { return s.ctr.stats() }

// Close closes the socket; Serve returns.
func (s *HeartbeatServer) Close() error { return s.conn.Close() }

// Serve answers pings until ctx is done or the server is closed; it closes
// the socket when it returns, and returns nil after a Close or ctx's end.
func (s *HeartbeatServer) Serve(ctx context.Context) error {
	s.mu.Lock()
	if s.served {
		s.mu.Unlock()
		return fmt.Errorf("%w: heartbeat Serve called twice", ErrConfig)
	}
	s.served = true
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { s.conn.Close() })
	defer stop()
	defer s.conn.Close()
	buf := make([]byte, 2*hbLen) // a longer datagram arrives truncated and is refused by length
	out := make([]byte, 0, hbLen)
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("heartbeat server read: %w", err)
		}
		reply, err := s.handle(buf[:n])
		if err != nil {
			s.ctr.count(err)
			continue
		}
		out = appendHeartbeat(out[:0], s.cfg.Key, reply)
		if _, err := s.conn.WriteTo(out, from); err == nil {
			s.ctr.sent.Add(1)
		}
	}
}

// handle checks one datagram and returns the pong to send.
func (s *HeartbeatServer) handle(b []byte) (hbPacket, error) {
	p, err := decodeHeartbeat(s.cfg.Key, b)
	if err != nil {
		return p, err
	}
	if p.Type != hbPing {
		return p, fmt.Errorf("%w: server got a heartbeat of type %d", ErrReplay, p.Type)
	}
	s.mu.Lock()
	now := s.cfg.Clock.Now()
	if now.Sub(s.rotatedAt) >= s.cfg.Rotate {
		s.rotateLocked(now)
	}
	reply := hbPacket{Type: hbPong, Session: p.Session, Seq: p.Seq, Nonce: s.nonce[0]}
	var gen uint64
	switch p.Nonce {
	case 0: // the client has no nonce yet; nonce[1] is 0 before the first rotation
		s.mu.Unlock()
		s.ctr.unproven.Add(1)
		return reply, nil
	case s.nonce[0]:
		gen = s.gen
	case s.nonce[1]:
		gen = s.gen - 1
	default:
		// A first ping, or one from before the last two rotations: answer,
		// so the client learns the nonce, but it proves nothing.
		s.mu.Unlock()
		s.ctr.unproven.Add(1)
		return reply, nil
	}
	sess := s.sessions[p.Session]
	if sess == nil {
		if len(s.sessions) >= maxSessions {
			s.mu.Unlock()
			return p, fmt.Errorf("%w: too many heartbeat sessions", ErrReplay)
		}
		sess = &hbSession{}
		s.sessions[p.Session] = sess
	}
	if !sess.win.accept(p.Seq) {
		s.mu.Unlock()
		return p, fmt.Errorf("%w: ping %d of session %x seen before", ErrReplay, p.Seq, p.Session)
	}
	sess.gen = max(sess.gen, gen)
	s.mu.Unlock()
	s.ctr.accepted.Add(1)
	if s.cfg.Heard != nil {
		s.cfg.Heard()
	}
	return reply, nil
}

// rotateLocked starts a new nonce period. Sessions not heard with either
// valid nonce are forgotten: their old pings are refused by nonce now.
func (s *HeartbeatServer) rotateLocked(now time.Time) {
	s.nonce[1] = s.nonce[0]
	s.nonce[0] = randNonZero()
	s.gen++
	s.rotatedAt = now
	for id, sess := range s.sessions {
		if sess.gen+1 < s.gen {
			delete(s.sessions, id)
		}
	}
}

func randNonZero() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:]) // never fails (crypto/rand panics internally if the OS source breaks)
		if v := binary.BigEndian.Uint64(b[:]); v != 0 {
			return v
		}
	}
}
