package failover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"
)

// TCPProbeConfig configures a TCPProbe.
type TCPProbeConfig struct {
	// Addr is the VM's address.
	Addr netip.Addr
	// Ports to try; a completed handshake on any of them means alive.
	Ports []uint16
	// Netns is the network namespace to connect from (a path); empty is
	// the caller's.
	Netns string
	// Timeout for the whole probe. Default DefaultProbeTimeout.
	Timeout time.Duration
	// RefusedIsAlive counts a refused connection (an RST from the address)
	// as alive: the VM's kernel answered although its service did not. Off
	// by default, since an RST may also come from a router or firewall.
	RefusedIsAlive bool
}

// TCPProbe connects to the VM's service ports, as a client would.
type TCPProbe struct {
	cfg TCPProbeConfig
	by  string
}

// NewTCPProbe checks cfg.
func NewTCPProbe(cfg TCPProbeConfig) (*TCPProbe, error) {
	if !cfg.Addr.IsValid() || cfg.Addr.IsUnspecified() {
		return nil, fmt.Errorf("%w: TCP probe needs the VM's address, got %v", ErrConfig, cfg.Addr)
	}
	if len(cfg.Ports) == 0 {
		return nil, fmt.Errorf("%w: TCP probe of %v has no ports", ErrConfig, cfg.Addr)
	}
	for _, p := range cfg.Ports {
		if p == 0 {
			return nil, fmt.Errorf("%w: TCP probe of %v: port 0", ErrConfig, cfg.Addr)
		}
	}
	var err error
	if cfg.Timeout, _, err = probeTimings(cfg.Timeout, 0, "TCP"); err != nil {
		return nil, err
	}
	return &TCPProbe{cfg: cfg, by: fmt.Sprintf("tcp %v%v", cfg.Addr, cfg.Ports)}, nil
}

// Probe connects to every port at once and reports the first handshake.
func (p *TCPProbe) Probe(ctx context.Context) (Result, error) {
	start := time.Now()
	pctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	type out struct {
		port     uint16
		alive    bool
		detail   string
		err      error
		answered time.Time
	}
	ch := make(chan out, len(p.cfg.Ports))
	for _, port := range p.cfg.Ports {
		go func() {
			o := out{port: port}
			addr := net.JoinHostPort(p.cfg.Addr.String(), strconv.Itoa(int(port)))
			o.err = InNetns(p.cfg.Netns, func() error {
				var d net.Dialer
				c, err := d.DialContext(pctx, "tcp", addr)
				o.answered = time.Now()
				if err == nil {
					c.Close()
					o.alive, o.detail = true, "connected to port "+strconv.Itoa(int(port))
					return nil
				}
				switch {
				case errors.Is(err, syscall.ECONNREFUSED):
					o.alive = p.cfg.RefusedIsAlive
					o.detail = fmt.Sprintf("port %d refused the connection", port)
				case ctx.Err() == nil && (pctx.Err() != nil || isTimeout(err)),
					errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ETIMEDOUT):
					// The probe's own deadline (the dialer may notice it
					// before the context does) or a failed neighbour
					// lookup: the address did not answer.
					o.detail = fmt.Sprintf("port %d: %v", port, err)
				default:
					return fmt.Errorf("%w: tcp connect %s: %w", ErrProbe, addr, err)
				}
				return nil
			})
			ch <- o
		}()
	}
	var errs []error
	var details []string
	for range p.cfg.Ports {
		o := <-ch
		if o.err != nil {
			errs = append(errs, o.err)
			continue
		}
		if o.alive {
			cancel()
			return Result{Alive: true, By: p.by, Detail: o.detail, RTT: o.answered.Sub(start)}, nil
		}
		details = append(details, o.detail)
	}
	if ctx.Err() != nil {
		return probeOutcome(ctx, p.by)
	}
	if len(errs) > 0 {
		return Result{By: p.by}, errors.Join(errs...)
	}
	return Result{By: p.by, Detail: fmt.Sprint(details)}, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
