package wire

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// maxPendingHandshakes bounds the handshakes a Listener runs at once, so
// peers that connect and stall cannot exhaust it, and one such peer cannot
// hold up the real one.
const maxPendingHandshakes = 8

// Listener accepts authenticated links on TCP. Handshakes run in the
// background, several at a time, each bounded by the credentials'
// HandshakeTimeout.
type Listener struct {
	ln      net.Listener
	cr      *Credentials
	results chan acceptResult
	done    chan struct{}
	cancel  context.CancelFunc
	once    sync.Once
	wg      sync.WaitGroup
}

type acceptResult struct {
	c   Conn
	err error
}

// Listen listens on the TCP address addr (e.g. "127.0.0.1:0"). ctx bounds
// only the call itself; the Listener lives until Close.
func Listen(ctx context.Context, addr string, cr *Credentials) (*Listener, error) {
	if err := cr.valid(); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("wire: listen on %s: %w", addr, err)
	}
	base, cancel := context.WithCancel(context.Background())
	l := &Listener{
		ln:      ln,
		cr:      cr,
		results: make(chan acceptResult),
		done:    make(chan struct{}),
		cancel:  cancel,
	}
	l.wg.Add(1)
	go l.loop(base)
	return l, nil
}

func (l *Listener) loop(ctx context.Context) {
	defer l.wg.Done()
	sem := make(chan struct{}, maxPendingHandshakes)
	backoff := 5 * time.Millisecond
	for {
		select {
		case sem <- struct{}{}:
		case <-l.done:
			return
		}
		raw, err := l.ln.Accept()
		if err != nil {
			<-sem
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait and retry
			// rather than spin or give up on the pair.
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-l.done:
				t.Stop()
				return
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			c, err := handshake(ctx, raw, l.cr, true, "")
			<-sem
			select {
			case l.results <- acceptResult{c, err}:
			case <-l.done:
				if c != nil {
					c.Close()
				}
			}
		}()
	}
}

// Accept returns the next link whose peer passed authentication and hello.
// A peer that failed is reported too, as an error wrapping ErrAuth,
// ErrVersion or a context error (its handshake timed out); the Listener
// stays open, so call Accept again. After Close, Accept returns ErrClosed.
func (l *Listener) Accept(ctx context.Context) (Conn, error) {
	select {
	case r := <-l.results:
		if r.err != nil {
			return nil, fmt.Errorf("wire: accept: %w", r.err)
		}
		return r.c, nil
	case <-l.done:
		return nil, fmt.Errorf("wire: accept: %w: listener closed", ErrClosed)
	case <-ctx.Done():
		return nil, fmt.Errorf("wire: accept: %w", ctx.Err())
	}
}

// Addr is the address the Listener listens on.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Close stops listening, aborts handshakes in progress and closes links
// not yet accepted. Links already returned by Accept stay open.
func (l *Listener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.done)
		l.cancel()
		err = l.ln.Close()
		l.wg.Wait()
	})
	if err != nil {
		return fmt.Errorf("wire: close listener: %w", err)
	}
	return nil
}

// Dial connects to a Listener at the TCP address addr, authenticates both
// ends and agrees on the version. ctx bounds the whole setup, as does the
// credentials' HandshakeTimeout. A refused peer yields ErrAuth, a peer of
// another protocol version ErrVersion.
func Dial(ctx context.Context, addr string, cr *Credentials) (Conn, error) {
	if err := cr.valid(); err != nil {
		return nil, err
	}
	serverName := cr.ServerName
	if serverName == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("%w: dial address %q: %w", ErrInvalid, addr, err)
		}
		serverName = host
	}
	dctx, cancel := context.WithTimeout(ctx, cr.handshakeTimeout())
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("wire: dial %s: %w", addr, err)
	}
	c, err := handshake(ctx, raw, cr, false, serverName)
	if err != nil {
		return nil, fmt.Errorf("wire: dial %s: %w", addr, err)
	}
	return c, nil
}
