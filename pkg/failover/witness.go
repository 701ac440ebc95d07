package failover

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// The witness protocol runs over TCP. The server opens with a hello
// ("FTWI", version 1, a 16-byte challenge); then each request gets one
// response, and each response carries the challenge for the next request,
// so every message is bound to a challenge the server chose and a
// recorded request or response is useless. Framing: a 2-byte big-endian
// length, then the body.
//
//	request:  op u8 | flags u8 | len u8 | vm | len u8 | node | mac[32]
//	          mac = HMAC(key, "ftwq" | challenge | body before mac)
//	response: status u8 | len u8 | holder | ttl_ms u32 | next challenge[16] | mac[32]
//	          mac = HMAC(key, "ftwr" | challenge | body before mac)
const (
	wMagic     = "FTWI"
	wVersion   = 1
	wChalLen   = 16
	wMaxFrame  = 1024
	wIdle      = 60 * time.Second // the server drops connections idle this long
	flagRenew  = 1                // the requester believes it holds the lease
	wOpAcquire = 1
	wOpRelease = 2
)

// Witness response statuses.
const (
	wGranted  = 1
	wHeld     = 2 // by someone else (or, during the grace period, by nobody known)
	wReleased = 3
)

type wRequest struct {
	Op, Flags uint8
	VM, Node  string
}

type wResponse struct {
	Status uint8
	Holder string
	TTL    time.Duration
	Next   [wChalLen]byte
}

func checkName(what, s string) error {
	if len(s) == 0 || len(s) > 255 {
		return fmt.Errorf("%w: %s name must be 1..255 bytes, got %d", ErrConfig, what, len(s))
	}
	for _, c := range []byte(s) {
		if c < 0x21 || c > 0x7e {
			return fmt.Errorf("%w: %s name %q has a byte outside printable ASCII", ErrConfig, what, s)
		}
	}
	return nil
}

func wMAC(key []byte, dir string, chal [wChalLen]byte, body []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(dir))
	m.Write(chal[:])
	m.Write(body)
	return m.Sum(nil)
}

func encodeWRequest(key []byte, chal [wChalLen]byte, r wRequest) []byte {
	b := []byte{r.Op, r.Flags, byte(len(r.VM))}
	b = append(b, r.VM...)
	b = append(b, byte(len(r.Node)))
	b = append(b, r.Node...)
	return append(b, wMAC(key, "ftwq", chal, b)...)
}

func decodeWRequest(key []byte, chal [wChalLen]byte, b []byte) (wRequest, error) {
	var r wRequest
	if len(b) < 2+1+1+1+1+sha256.Size {
		return r, fmt.Errorf("%w: witness request of %d bytes", ErrMalformed, len(b))
	}
	body, mac := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if !hmac.Equal(wMAC(key, "ftwq", chal, body), mac) {
		return r, fmt.Errorf("%w: witness request MAC mismatch (wrong key, or replayed)", ErrAuth)
	}
	r.Op, r.Flags = body[0], body[1]
	rest := body[2:]
	var err error
	if r.VM, rest, err = takeName(rest, "vm"); err != nil {
		return r, err
	}
	if r.Node, rest, err = takeName(rest, "node"); err != nil {
		return r, err
	}
	if len(rest) != 0 {
		return r, fmt.Errorf("%w: %d trailing bytes in witness request", ErrMalformed, len(rest))
	}
	if r.Op != wOpAcquire && r.Op != wOpRelease {
		return r, fmt.Errorf("%w: witness op %d", ErrMalformed, r.Op)
	}
	if r.Flags&^flagRenew != 0 {
		return r, fmt.Errorf("%w: witness flags %#x", ErrMalformed, r.Flags)
	}
	if err := checkName("vm", r.VM); err != nil {
		return r, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if err := checkName("node", r.Node); err != nil {
		return r, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return r, nil
}

func takeName(b []byte, what string) (string, []byte, error) {
	if len(b) < 1 || len(b) < 1+int(b[0]) {
		return "", nil, fmt.Errorf("%w: witness %s name truncated", ErrMalformed, what)
	}
	n := int(b[0])
	return string(b[1 : 1+n]), b[1+n:], nil
}

func encodeWResponse(key []byte, chal [wChalLen]byte, r wResponse) []byte {
	b := []byte{r.Status, byte(len(r.Holder))}
	b = append(b, r.Holder...)
	b = binary.BigEndian.AppendUint32(b, uint32(r.TTL/time.Millisecond))
	b = append(b, r.Next[:]...)
	return append(b, wMAC(key, "ftwr", chal, b)...)
}

func decodeWResponse(key []byte, chal [wChalLen]byte, b []byte) (wResponse, error) {
	var r wResponse
	if len(b) < 2+4+wChalLen+sha256.Size {
		return r, fmt.Errorf("%w: witness response of %d bytes", ErrMalformed, len(b))
	}
	body, mac := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if !hmac.Equal(wMAC(key, "ftwr", chal, body), mac) {
		return r, fmt.Errorf("%w: witness response MAC mismatch (wrong key, or replayed)", ErrAuth)
	}
	r.Status = body[0]
	n := int(body[1])
	if len(body) != 2+n+4+wChalLen {
		return r, fmt.Errorf("%w: witness response length %d for a holder of %d bytes", ErrMalformed, len(body), n)
	}
	r.Holder = string(body[2 : 2+n])
	r.TTL = time.Duration(binary.BigEndian.Uint32(body[2+n:])) * time.Millisecond
	copy(r.Next[:], body[2+n+4:])
	if r.Status < wGranted || r.Status > wReleased {
		return r, fmt.Errorf("%w: witness status %d", ErrMalformed, r.Status)
	}
	return r, nil
}

func writeFrame(w io.Writer, body []byte) error {
	b := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(body)), uint16(len(body)))
	_, err := w.Write(append(b, body...))
	return err
}

func readFrame(r io.Reader) ([]byte, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(h[:]))
	if n > wMaxFrame {
		return nil, fmt.Errorf("%w: witness frame of %d bytes", ErrMalformed, n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return b, nil
}

func newChallenge() (c [wChalLen]byte) {
	rand.Read(c[:])
	return c
}

// WitnessConfig configures a WitnessServer.
type WitnessConfig struct {
	// Key shared by the witness and the agents, at least MinKeyLen bytes.
	Key []byte
	// LeaseTTL is how long a grant lasts without renewal. Default
	// DefaultLeaseTTL.
	LeaseTTL time.Duration
	// Grace after the server starts, during which only renewals (by a node
	// that believes it holds the lease) are granted: a lease granted by an
	// earlier run of the witness may still be valid. Default LeaseTTL.
	Grace time.Duration
	// Clock defaults to RealClock.
	Clock Clock
}

// DefaultLeaseTTL is the witness lease duration; see the package doc.
const DefaultLeaseTTL = 2 * time.Second

// WitnessServer is a third party that grants, per VM, a lease to at most
// one node: the first to ask after the lease expired wins, and the holder
// keeps it by renewing. The active primary renews through its
// PrimaryGuard; a secondary asks (WitnessArbiter) only when its detector
// lost the primary.
type WitnessServer struct {
	ln      net.Listener
	cfg     WitnessConfig
	started time.Time
	refused atomic.Uint64

	mu     sync.Mutex
	leases map[string]wLease
	conns  map[net.Conn]struct{}
	served bool
	closed bool
}

type wLease struct {
	holder string
	expiry time.Time
}

// ListenWitness opens a TCP listener on addr and returns a server on it.
func ListenWitness(ctx context.Context, addr string, cfg WitnessConfig) (*WitnessServer, error) {
	if err := checkKey(cfg.Key, "witness"); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("witness listen on %q: %w", addr, err)
	}
	s, err := NewWitnessServer(ln, cfg)
	if err != nil {
		ln.Close()
		return nil, err
	}
	return s, nil
}

// NewWitnessServer returns a server on ln, which it takes over.
func NewWitnessServer(ln net.Listener, cfg WitnessConfig) (*WitnessServer, error) {
	if err := checkKey(cfg.Key, "witness"); err != nil {
		return nil, err
	}
	if cfg.LeaseTTL < 0 || cfg.Grace < 0 {
		return nil, fmt.Errorf("%w: negative witness LeaseTTL or Grace", ErrConfig)
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.LeaseTTL < time.Millisecond || cfg.LeaseTTL > time.Hour {
		return nil, fmt.Errorf("%w: witness LeaseTTL %v outside 1ms..1h", ErrConfig, cfg.LeaseTTL)
	}
	if cfg.Grace == 0 {
		cfg.Grace = cfg.LeaseTTL
	}
	cfg.Clock = clockOr(cfg.Clock)
	cfg.Key = append([]byte(nil), cfg.Key...)
	return &WitnessServer{
		ln: ln, cfg: cfg, started: cfg.Clock.Now(),
		leases: make(map[string]wLease), conns: make(map[net.Conn]struct{}),
	}, nil
}

// Addr returns the listener's address.
func (s *WitnessServer) Addr() net.Addr { return s.ln.Addr() }

// Refused counts requests that failed authentication or decoding.
func (s *WitnessServer) Refused() uint64 { return s.refused.Load() }

// Holder returns the current holder of vm's lease and its expiry, or ""
// if the lease is free.
func (s *WitnessServer) Holder(vm string) (string, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.leases[vm]
	if !ok || !s.cfg.Clock.Now().Before(l.expiry) {
		return "", time.Time{}
	}
	return l.holder, l.expiry
}

// Close stops the listener and drops all connections; Serve returns.
func (s *WitnessServer) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	return err
}

// Serve accepts connections until ctx is done or Close; it returns nil
// then.
func (s *WitnessServer) Serve(ctx context.Context) error {
	s.mu.Lock()
	if s.served {
		s.mu.Unlock()
		return fmt.Errorf("%w: witness Serve called twice", ErrConfig)
	}
	s.served = true
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			s.Close()
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("witness accept: %w", err)
		}
		s.mu.Lock()
		if s.closed {
			c.Close() // accepted while Close ran
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(c)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

func (s *WitnessServer) serveConn(c net.Conn) {
	chal := newChallenge()
	hello := append([]byte(wMagic), wVersion)
	c.SetDeadline(time.Now().Add(wIdle))
	if _, err := c.Write(append(hello, chal[:]...)); err != nil {
		return
	}
	br := bufio.NewReader(c)
	for {
		c.SetDeadline(time.Now().Add(wIdle))
		b, err := readFrame(br)
		if err != nil {
			if errors.Is(err, ErrMalformed) {
				s.refused.Add(1)
			}
			return
		}
		req, err := decodeWRequest(s.cfg.Key, chal, b)
		if err != nil {
			// A client that cannot authenticate gets nothing, not even an
			// error it could use to probe.
			s.refused.Add(1)
			return
		}
		resp := s.apply(req)
		used := chal
		chal = newChallenge()
		resp.Next = chal
		if err := writeFrame(c, encodeWResponse(s.cfg.Key, used, resp)); err != nil {
			return
		}
	}
}

// apply runs one request against the lease table.
func (s *WitnessServer) apply(r wRequest) wResponse {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.cfg.Clock.Now()
	l, ok := s.leases[r.VM]
	live := ok && now.Before(l.expiry)
	switch r.Op {
	case wOpRelease:
		if live && l.holder == r.Node {
			delete(s.leases, r.VM)
			return wResponse{Status: wReleased}
		}
		if live {
			return wResponse{Status: wHeld, Holder: l.holder, TTL: l.expiry.Sub(now)}
		}
		return wResponse{Status: wReleased}
	default: // wOpAcquire
		if live && l.holder != r.Node {
			return wResponse{Status: wHeld, Holder: l.holder, TTL: l.expiry.Sub(now)}
		}
		inGrace := now.Sub(s.started) < s.cfg.Grace
		if !live && inGrace && r.Flags&flagRenew == 0 {
			// A lease from before this witness started may still be valid
			// at its holder; only that holder (renewing) may take it now.
			return wResponse{Status: wHeld, TTL: s.cfg.Grace - now.Sub(s.started)}
		}
		s.leases[r.VM] = wLease{holder: r.Node, expiry: now.Add(s.cfg.LeaseTTL)}
		return wResponse{Status: wGranted, Holder: r.Node, TTL: s.cfg.LeaseTTL}
	}
}
