package failover

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Lease is a witness's answer to an acquire or renew.
type Lease struct {
	// Granted: the asking node holds the lease for TTL from now.
	Granted bool
	// Holder is who holds it (the asker when Granted; empty if nobody, as
	// during the witness's grace period after a restart).
	Holder string
	// TTL is the lease's remaining time as the witness saw it.
	TTL time.Duration
	// Sent is when the request left this node. The lease is valid here
	// until Sent+TTL at the latest: the witness started its TTL later.
	Sent time.Time
}

// Leaser acquires and renews a VM's lease from a witness. WitnessClient
// implements it; a later etcd lease can too.
type Leaser interface {
	// Acquire asks for vm's lease. renew says the caller is the running
	// primary and believes it holds the lease.
	Acquire(ctx context.Context, vm string, renew bool) (Lease, error)
}

// WitnessClientConfig configures a WitnessClient.
type WitnessClientConfig struct {
	// Addr of the witness ("host:port").
	Addr string
	// Key shared with the witness.
	Key []byte
	// Node is this agent's name, as the witness records lease holders.
	Node string
	// Timeout bounds one request, including connecting. Default 1 s.
	Timeout time.Duration
	// Netns to connect from (a path); empty is the caller's.
	Netns string
}

// WitnessClient talks to a WitnessServer over one kept-alive connection,
// redialling when it breaks. Safe for concurrent use (requests are
// serialised).
type WitnessClient struct {
	cfg WitnessClientConfig

	mu   sync.Mutex
	conn net.Conn
	br   *bufio.Reader
	chal [wChalLen]byte
}

// NewWitnessClient checks cfg; it connects on the first request.
func NewWitnessClient(cfg WitnessClientConfig) (*WitnessClient, error) {
	if err := checkKey(cfg.Key, "witness"); err != nil {
		return nil, err
	}
	if err := checkName("node", cfg.Node); err != nil {
		return nil, err
	}
	if _, _, err := net.SplitHostPort(cfg.Addr); err != nil {
		return nil, fmt.Errorf("%w: witness address %q: %v", ErrConfig, cfg.Addr, err)
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("%w: witness Timeout %v is negative", ErrConfig, cfg.Timeout)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = time.Second
	}
	cfg.Key = append([]byte(nil), cfg.Key...)
	return &WitnessClient{cfg: cfg}, nil
}

// Node returns the client's node name.
func (c *WitnessClient) Node() string { return c.cfg.Node }

// Close drops the connection.
func (c *WitnessClient) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dropLocked()
	return nil
}

func (c *WitnessClient) dropLocked() {
	if c.conn != nil {
		c.conn.Close()
		c.conn, c.br = nil, nil
	}
}

// Acquire asks for (or renews) vm's lease for this node.
func (c *WitnessClient) Acquire(ctx context.Context, vm string, renew bool) (Lease, error) {
	var flags uint8
	if renew {
		flags = flagRenew
	}
	sent := time.Now()
	r, err := c.do(ctx, wRequest{Op: wOpAcquire, Flags: flags, VM: vm, Node: c.cfg.Node})
	if err != nil {
		return Lease{Sent: sent}, err
	}
	if r.Status != wGranted && r.Status != wHeld {
		return Lease{Sent: sent}, fmt.Errorf("%w: witness answered an acquire with status %d", ErrMalformed, r.Status)
	}
	if r.Status == wGranted && r.Holder != c.cfg.Node {
		return Lease{Sent: sent}, fmt.Errorf("%w: witness granted the lease to %q, not to us", ErrMalformed, r.Holder)
	}
	return Lease{Granted: r.Status == wGranted, Holder: r.Holder, TTL: r.TTL, Sent: sent}, nil
}

// Release gives up vm's lease if this node holds it (a planned
// switchover: the old primary stops its VM, then releases).
func (c *WitnessClient) Release(ctx context.Context, vm string) error {
	r, err := c.do(ctx, wRequest{Op: wOpRelease, VM: vm, Node: c.cfg.Node})
	if err != nil {
		return err
	}
	if r.Status == wHeld {
		return fmt.Errorf("%w: lease of %q is held by %q, not %q", ErrUnsafe, vm, r.Holder, c.cfg.Node)
	}
	return nil
}

func (c *WitnessClient) do(ctx context.Context, req wRequest) (wResponse, error) {
	if err := checkName("vm", req.VM); err != nil {
		return wResponse{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	// A kept-alive connection may have been dropped by the server (idle,
	// restart) without our noticing: one fresh attempt is not a retry of
	// a decision, since a failed exchange changed nothing we know of.
	reused := c.conn != nil
	r, err := c.exchangeLocked(ctx, req)
	if err != nil && reused && ctx.Err() == nil && !errors.Is(err, ErrAuth) {
		r, err = c.exchangeLocked(ctx, req)
	}
	return r, err
}

func (c *WitnessClient) exchangeLocked(ctx context.Context, req wRequest) (wResponse, error) {
	if c.conn == nil {
		if err := c.dialLocked(ctx); err != nil {
			return wResponse{}, err
		}
	}
	conn := c.conn
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	fail := func(err error) (wResponse, error) {
		c.dropLocked()
		if errors.Is(err, ErrAuth) || errors.Is(err, ErrMalformed) {
			return wResponse{}, err
		}
		return wResponse{}, fmt.Errorf("%w: %s: %w", ErrUnreachable, c.cfg.Addr, err)
	}
	if err := writeFrame(conn, encodeWRequest(c.cfg.Key, c.chal, req)); err != nil {
		return fail(err)
	}
	b, err := readFrame(c.br)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("witness closed the connection (wrong key?): %w", err)
		}
		return fail(err)
	}
	r, err := decodeWResponse(c.cfg.Key, c.chal, b)
	if err != nil {
		return fail(err)
	}
	c.chal = r.Next
	return r, nil
}

func (c *WitnessClient) dialLocked(ctx context.Context) error {
	var conn net.Conn
	err := InNetns(c.cfg.Netns, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, "tcp", c.cfg.Addr)
		return err
	})
	if err != nil {
		return fmt.Errorf("%w: dial %s: %w", ErrUnreachable, c.cfg.Addr, err)
	}
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	br := bufio.NewReader(conn)
	hello := make([]byte, len(wMagic)+1+wChalLen)
	if _, err := io.ReadFull(br, hello); err != nil {
		conn.Close()
		return fmt.Errorf("%w: %s: no hello: %w", ErrUnreachable, c.cfg.Addr, err)
	}
	if string(hello[:4]) != wMagic || hello[4] != wVersion {
		conn.Close()
		return fmt.Errorf("%w: %s is not a witness (version %d) ", ErrMalformed, c.cfg.Addr, hello[4])
	}
	c.conn, c.br = conn, br
	copy(c.chal[:], hello[5:])
	return nil
}

// WitnessArbiter asks the witness for the VM's lease: granted means the
// primary's lease expired, and a primary that cannot renew fences itself
// before its lease expires (PrimaryGuard), so this node may promote;
// held by another means the primary is alive and renewing.
type WitnessArbiter struct {
	Lease Leaser
}

// Decide acquires the lease for ev.VM. On Promote the caller now holds the
// lease and must keep renewing it (run a PrimaryGuard) from here on.
func (a WitnessArbiter) Decide(ctx context.Context, ev Evidence) (Decision, error) {
	if a.Lease == nil {
		return Unknown, fmt.Errorf("%w: WitnessArbiter has no witness", ErrConfig)
	}
	l, err := a.Lease.Acquire(ctx, ev.VM, false)
	if err != nil {
		return Unknown, err
	}
	if l.Granted {
		return Promote, nil
	}
	if l.Holder == "" {
		// The witness restarted and waits out leases it may have granted
		// before: it knows nothing yet.
		return Unknown, nil
	}
	return DoNotPromote, nil
}
