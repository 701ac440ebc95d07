package wire_test

import (
	"context"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/lockstep/wire/wiretest"
)

func TestConformancePipe(t *testing.T) {
	wiretest.TestConn(t, func(t *testing.T) (wire.Conn, wire.Conn) { return wire.Pipe(4) })
}

func TestConformanceTCPMutualTLS(t *testing.T) {
	srv, cli := mtlsCreds(t)
	wiretest.TestConn(t, func(t *testing.T) (wire.Conn, wire.Conn) {
		c, s, err := connect(t, srv, cli)
		if err != nil {
			t.Fatal(err)
		}
		if c.Peer() != "secondary" || s.Peer() != "primary" {
			t.Fatalf("peers: client sees %q, server sees %q", c.Peer(), s.Peer())
		}
		return c, s
	})
}

func TestConformanceTCPPSK(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	srv, err := wire.CredentialsFromPSK("node-b", key)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := wire.CredentialsFromPSK("node-a", key)
	if err != nil {
		t.Fatal(err)
	}
	wiretest.TestConn(t, func(t *testing.T) (wire.Conn, wire.Conn) {
		c, s, err := connect(t, srv, cli)
		if err != nil {
			t.Fatal(err)
		}
		if c.Peer() != "node-b" || s.Peer() != "node-a" {
			t.Fatalf("peers: client sees %q, server sees %q", c.Peer(), s.Peer())
		}
		return c, s
	})
}

// mtlsCreds makes a pair's CA and the credentials of both agents.
func mtlsCreds(t testing.TB) (srv, cli *wire.Credentials) {
	t.Helper()
	ca, err := wire.NewCA("pair-1")
	if err != nil {
		t.Fatal(err)
	}
	return issue(t, ca, "secondary"), issue(t, ca, "primary")
}

func issue(t testing.TB, ca *wire.CA, name string) *wire.Credentials {
	t.Helper()
	certPEM, keyPEM, err := ca.Issue(name, []string{"127.0.0.1", "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	cr, err := wire.CredentialsFromPEM(ca.CertPEM(), certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return cr
}

type result struct {
	c   wire.Conn
	err error
}

// connect dials a fresh listener on 127.0.0.1 with cli and accepts with
// srv. On success both ends are returned; otherwise the client's and the
// server's errors are joined in the order client, server.
func connect(t testing.TB, srv, cli *wire.Credentials) (client, server wire.Conn, err error) {
	t.Helper()
	c, s, cerr, serr := connectBoth(t, srv, cli)
	if cerr != nil || serr != nil {
		return nil, nil, joinSides(cerr, serr)
	}
	return c, s, nil
}

func connectBoth(t testing.TB, srv, cli *wire.Credentials) (client, server wire.Conn, cerr, serr error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, err := wire.Listen(ctx, "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	dialed := make(chan result, 1)
	go func() {
		c, err := wire.Dial(ctx, ln.Addr().String(), cli)
		dialed <- result{c, err}
	}()
	s, serr := ln.Accept(ctx)
	d := <-dialed
	for _, c := range []wire.Conn{s, d.c} {
		if c != nil {
			t.Cleanup(func() { c.Close() })
		}
	}
	return d.c, s, d.err, serr
}

type sideErr struct{ client, server error }

func (e sideErr) Error() string {
	return "client: " + errString(e.client) + "; server: " + errString(e.server)
}

func (e sideErr) Unwrap() []error {
	var errs []error
	for _, err := range []error{e.client, e.server} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

func joinSides(c, s error) error { return sideErr{c, s} }
