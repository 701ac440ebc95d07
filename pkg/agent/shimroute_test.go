package agent

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

func TestRedirectAddr(t *testing.T) {
	for _, c := range []struct{ dialed, to, want string }{
		{"10.0.0.2:7480", "10.0.0.2:41000", "10.0.0.2:41000"},
		{"10.0.0.2:7480", "0.0.0.0:41000", "10.0.0.2:41000"},
		// The host the primary knows (and the peer's certificate names)
		// wins over the one the shim reports.
		{"host-b:7480", "[::]:41000", "host-b:41000"},
		{"[fd00::2]:7480", "[fd00::2]:41000", "[fd00::2]:41000"},
	} {
		got, err := redirectAddr(c.dialed, c.to)
		if err != nil || got != c.want {
			t.Errorf("redirectAddr(%q, %q) = %q, %v; want %q", c.dialed, c.to, got, err, c.want)
		}
	}
	for _, to := range []string{"", "nope", "10.0.0.2:0", "10.0.0.2:"} {
		if got, err := redirectAddr("10.0.0.2:7480", to); err == nil {
			t.Errorf("redirect to %q accepted as %q", to, got)
		}
	}
}

func TestReplicaRoutesForgetOnlyTheStaleOne(t *testing.T) {
	var r replicaRoutes
	if got := r.get("web", "b"); got != "" {
		t.Fatalf("empty routes give %q", got)
	}
	r.set("web", "b", "b:1")
	r.set("db", "b", "b:2")
	r.forget("web", "b", "b:9") // a newer redirect replaced what failed
	if got := r.get("web", "b"); got != "b:1" {
		t.Fatalf("forgetting another address dropped the route: %q", got)
	}
	r.forget("web", "b", "b:1")
	if got := r.get("web", "b"); got != "" {
		t.Fatalf("forgotten route still there: %q", got)
	}
	if got := r.get("db", "b"); got != "b:2" {
		t.Fatalf("another VM's route went too: %q", got)
	}
}

// fakePeer answers each request on a real authenticated listener with
// what answer says, counting requests.
type fakePeer struct {
	ln   *wire.Listener
	reqs atomic.Int32
}

func newFakePeer(t *testing.T, creds *wire.Credentials, answer func(message) message) *fakePeer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ln, err := wire.Listen(ctx, "127.0.0.1:0", creds)
	if err != nil {
		t.Fatal(err)
	}
	p := &fakePeer{ln: ln}
	t.Cleanup(func() { cancel(); ln.Close() })
	go func() {
		for {
			c, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				m, err := recvMsg(ctx, c)
				if err != nil {
					return
				}
				p.reqs.Add(1)
				sendMsg(ctx, c, answer(m))
				// Hold the link until the other side is done with it.
				recvMsg(ctx, c)
			}()
		}
	}()
	return p
}

func (p *fakePeer) addr() string { return p.ln.Addr().String() }

// TestAskReplicaFollowsAndRemembersRedirects: the peer's agent redirects
// a request to the replica's shim; the request is sent there again, and
// the next one goes straight to the shim. When the shim is gone, the
// agent is asked again; when a shim refuses (it is not this VM's any
// more), so is the agent.
func TestAskReplicaFollowsAndRemembersRedirects(t *testing.T) {
	ca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	creds := func(name string) *wire.Credentials {
		cert, key, err := ca.Issue(name, []string{"127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		c, err := wire.CredentialsFromPEM(ca.CertPEM(), cert, key)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	bCreds := creds("host-b")
	shim := newFakePeer(t, bCreds, func(m message) message { return message{Op: opReady, VM: m.VM} })
	var redirectTo atomic.Value
	redirectTo.Store(shim.addr())
	agentB := newFakePeer(t, bCreds, func(m message) message {
		return message{Op: opRedirect, VM: m.VM, Addr: redirectTo.Load().(string)}
	})
	dir := t.TempDir()
	a, err := New(Config{Name: "host-a", StateDir: filepath.Join(dir, "s"), RunDir: filepath.Join(dir, "r"), RAMDir: dir, Credentials: creds("host-a")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	peer := agentB.addr()
	ask := func() message {
		t.Helper()
		l, err := a.dialReplica(ctx, "web", peer)
		if err != nil {
			t.Fatal(err)
		}
		l, reply, err := a.askReplica(ctx, l, "web", peer, message{Op: opVMLost, VM: "web"}, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		l.conn.Close()
		return reply
	}

	if r := ask(); r.Op != opReady || agentB.reqs.Load() != 1 || shim.reqs.Load() != 1 {
		t.Fatalf("first request: %+v; agent saw %d, shim %d", r, agentB.reqs.Load(), shim.reqs.Load())
	}
	if got := a.replicaRoutes.get("web", peer); got != shim.addr() {
		t.Fatalf("route after the redirect: %q, want %q", got, shim.addr())
	}
	if r := ask(); r.Op != opReady || agentB.reqs.Load() != 1 || shim.reqs.Load() != 2 {
		t.Fatalf("second request: %+v; agent saw %d, shim %d (want it straight to the shim)", r, agentB.reqs.Load(), shim.reqs.Load())
	}

	// The shim is gone; the agent sends the request to a new one.
	shim.ln.Close()
	shim2 := newFakePeer(t, bCreds, func(m message) message { return message{Op: opReady, VM: m.VM} })
	redirectTo.Store(shim2.addr())
	if r := ask(); r.Op != opReady || agentB.reqs.Load() != 2 || shim2.reqs.Load() != 1 {
		t.Fatalf("after the shim died: %+v; agent saw %d, new shim %d", r, agentB.reqs.Load(), shim2.reqs.Load())
	}

	// A remembered shim that refuses: the agent decides (here it sends
	// the request to yet another shim).
	refusing := newFakePeer(t, bCreds, func(m message) message { return message{Op: opRefused, VM: m.VM, Error: "not this VM's shim"} })
	a.replicaRoutes.set("web", peer, refusing.addr())
	shim3 := newFakePeer(t, bCreds, func(m message) message { return message{Op: opReady, VM: m.VM} })
	redirectTo.Store(shim3.addr())
	if r := ask(); r.Op != opReady || refusing.reqs.Load() != 1 || agentB.reqs.Load() != 3 || shim3.reqs.Load() != 1 {
		t.Fatalf("after a refusal: %+v; refusing %d, agent %d, shim3 %d", r, refusing.reqs.Load(), agentB.reqs.Load(), shim3.reqs.Load())
	}

	// Redirects that never end are cut short.
	redirectTo.Store(agentB.addr())
	a.replicaRoutes.forget("web", peer, shim3.addr())
	l, err := a.dialReplica(ctx, "web", peer)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.askReplica(ctx, l, "web", peer, message{Op: opVMLost, VM: "web"}, 5*time.Second); err == nil {
		t.Fatal("an endless redirect loop succeeded")
	}
}

func TestParsePortRange(t *testing.T) {
	for in, want := range map[string]PortRange{"7490-7599": {7490, 7599}, "7490": {7490, 7490}, " 1 - 65535 ": {1, 65535}} {
		if got, err := ParsePortRange(in); err != nil || got != want {
			t.Errorf("ParsePortRange(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-", "a-b", "9-3", "0-10", "65000-70000", "1-2-3"} {
		if got, err := ParsePortRange(in); !errors.Is(err, ErrBadRequest) {
			t.Errorf("ParsePortRange(%q) = %v, %v; want ErrBadRequest", in, got, err)
		}
	}
}

// TestShimPeerPorts: a replica shim's listener takes a free port of
// Config.ShimPorts, and says so when none is free.
func TestShimPeerPorts(t *testing.T) {
	ca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.Issue("host-b", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	creds, err := wire.CredentialsFromPEM(ca.CertPEM(), cert, key)
	if err != nil {
		t.Fatal(err)
	}
	// A port the system just handed out, most likely still free.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	shim := func(r PortRange) *Agent {
		dir := t.TempDir()
		a, err := New(Config{Name: "host-b", StateDir: filepath.Join(dir, "s"), RunDir: filepath.Join(dir, "r"), RAMDir: dir,
			Credentials: creds, PeerAddr: "127.0.0.1:7480", ShimPorts: r})
		if err != nil {
			t.Fatal(err)
		}
		a.shimOf = "web"
		return a
	}
	ctx := context.Background()
	r := PortRange{port, port}
	l, err := shim(r).listenPeer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if got := l.Addr().(*net.TCPAddr).Port; got != port {
		t.Fatalf("listening on port %d, want %d (of %v)", got, port, r)
	}
	// Every port of the range taken: a clear error naming it.
	if l2, err := shim(r).listenPeer(ctx); err == nil {
		l2.Close()
		t.Fatalf("listened on %v although every port of %v was taken", l2.Addr(), r)
	} else if !strings.Contains(err.Error(), r.String()) {
		t.Fatalf("error does not name the range: %v", err)
	}
	if _, err := New(Config{Name: "x", StateDir: t.TempDir(), RunDir: t.TempDir(), RAMDir: t.TempDir(), ShimPorts: PortRange{5, 1}}); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("a reversed range was accepted: %v", err)
	}
}
