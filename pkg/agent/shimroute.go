package agent

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

// The primary's side of replica shims (see shim.go): a peer's agent may
// answer a request about a VM with a redirect to the shim that keeps the
// VM's replica. The primary remembers the shim's address per VM and peer
// and sends its later requests there first (a vm-lost report on a new
// link, a re-pairing), so they reach the replica even while the peer's
// agent restarts; when the shim no longer answers there, or refuses, the
// peer's agent is asked again and knows better (it starts a new shim, or
// the shim moved).

// replicaRoutes maps a VM and its peer to the address of the peer's
// replica shim for that VM.
type replicaRoutes struct {
	mu sync.Mutex
	m  map[routeKey]string
}

type routeKey struct{ vm, peer string }

func (r *replicaRoutes) get(vm, peer string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m[routeKey{vm, peer}]
}

func (r *replicaRoutes) set(vm, peer, addr string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[routeKey]string{}
	}
	r.m[routeKey{vm, peer}] = addr
}

// forget drops a route, if it still is addr.
func (r *replicaRoutes) forget(vm, peer, addr string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m[routeKey{vm, peer}] == addr {
		delete(r.m, routeKey{vm, peer})
	}
}

// replicaLink is an open link to the replica side of one VM.
type replicaLink struct {
	conn *watchedConn
	addr string // where it goes
	// routed: addr is a replica shim, not the peer's agent.
	routed bool
	// remembered: addr is a route from an earlier request, which may be
	// stale; a shim the peer's agent has just redirected to is not.
	remembered bool
}

// routeDialTimeout bounds a dial to a remembered replica shim, so that a
// stale route leaves time to ask the peer's agent.
const routeDialTimeout = 3 * time.Second

// maxRedirects bounds the hops of one request (agent → shim, and one
// retry through the agent when a remembered shim failed).
const maxRedirects = 3

// dialReplica opens a link for VM name on peer: to the replica shim a
// redirect named before, else (or when that shim does not answer) to the
// peer's agent.
func (a *Agent) dialReplica(ctx context.Context, name, peer string) (replicaLink, error) {
	if addr := a.replicaRoutes.get(name, peer); addr != "" {
		dctx, cancel := context.WithTimeout(ctx, routeDialTimeout)
		raw, err := wire.Dial(dctx, addr, a.cfg.Credentials)
		cancel()
		if err == nil {
			return replicaLink{conn: newWatchedConn(raw), addr: addr, routed: true, remembered: true}, nil
		}
		a.log.Info("replica shim unreachable; asking its agent", "vm", name, "peer", peer, "shim", addr, "err", err)
		a.replicaRoutes.forget(name, peer, addr)
	}
	addr := peerAddr(peer)
	raw, err := wire.Dial(ctx, addr, a.cfg.Credentials)
	if err != nil {
		return replicaLink{}, err
	}
	return replicaLink{conn: newWatchedConn(raw), addr: addr}, nil
}

// askReplica sends m on l and waits up to wait for the answer, which it
// returns with the link it came on. A redirect is followed (and
// remembered): l's link is closed and m goes again to the shim. A failure
// or refusal on a remembered route makes it ask the peer's agent instead;
// the refusal of a shim the agent has just redirected to is the answer
// (asking the agent again would only send it back there).
// On error the link returned is closed.
func (a *Agent) askReplica(ctx context.Context, l replicaLink, name, peer string, m message, wait time.Duration) (replicaLink, message, error) {
	for hop := 0; ; hop++ {
		reply, err := exchange(ctx, l.conn, m, wait)
		if err == nil && reply.Op == opRedirect {
			l.conn.Close()
			if hop >= maxRedirects {
				return l, reply, fmt.Errorf("%w: %s: too many redirects", ErrPeer, peer)
			}
			addr, rerr := redirectAddr(l.addr, reply.Addr)
			if rerr != nil {
				return l, reply, fmt.Errorf("%w: %s: %w", ErrPeer, peer, rerr)
			}
			raw, derr := wire.Dial(ctx, addr, a.cfg.Credentials)
			if derr != nil {
				return l, reply, fmt.Errorf("%w: %s's replica shim for %s at %s: %w", ErrPeer, peer, name, addr, derr)
			}
			a.replicaRoutes.set(name, peer, addr)
			a.log.Info("redirected to a replica shim", "vm", name, "peer", peer, "shim", addr)
			l = replicaLink{conn: newWatchedConn(raw), addr: addr, routed: true}
			continue
		}
		if l.remembered && (err != nil || reply.Op == opRefused) && hop < maxRedirects {
			// The shim there is stale, or no longer this VM's: its agent
			// decides.
			a.log.Info("replica shim failed; asking its agent", "vm", name, "peer", peer, "shim", l.addr, "err", err, "refusal", reply.Error)
			a.replicaRoutes.forget(name, peer, l.addr)
			raw, derr := wire.Dial(ctx, peerAddr(peer), a.cfg.Credentials)
			if derr == nil {
				l.conn.Close()
				l = replicaLink{conn: newWatchedConn(raw), addr: peerAddr(peer)}
				continue
			}
			if err == nil {
				err = fmt.Errorf("%w: %s refused: %s", ErrPeer, peer, reply.Error)
			}
			err = fmt.Errorf("%w (and its agent: %v)", err, derr)
		}
		if err != nil {
			l.conn.Close()
		}
		return l, reply, err
	}
}

// exchange sends m and waits up to wait for the answer.
func exchange(ctx context.Context, c *watchedConn, m message, wait time.Duration) (message, error) {
	if err := sendMsg(ctx, c, m); err != nil {
		return message{}, err
	}
	rctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	return recvMsg(rctx, c)
}

// redirectAddr is where a redirect sends a primary that dialed dialed: the
// port the redirect names, on the host the primary dialed (the shim
// listens on its agent's address, and the host name the primary knows is
// the one the peer's certificate names).
func redirectAddr(dialed, to string) (string, error) {
	_, port, err := net.SplitHostPort(to)
	if err != nil || port == "" || port == "0" {
		return "", fmt.Errorf("redirect to a bad address %q", to)
	}
	host, _, err := net.SplitHostPort(dialed)
	if err != nil {
		return "", fmt.Errorf("dialed a bad address %q: %w", dialed, err)
	}
	return net.JoinHostPort(host, port), nil
}
