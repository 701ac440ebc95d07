package wire_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

// refusedThenGood runs a bad peer against a fresh listener, requires the
// listener to report ErrAuth for it, then connects a good peer and requires
// that the first frame the server receives is the good peer's: nothing of the
// bad peer leaked into a link.
func refusedThenGood(t *testing.T, srv, good *wire.Credentials, bad func(addr string) error) (badErr, acceptErr error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, err := wire.Listen(ctx, "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	badc := make(chan error, 1)
	go func() { badc <- bad(ln.Addr().String()) }()
	s, acceptErr := ln.Accept(ctx)
	badErr = <-badc
	if s != nil {
		s.Close()
		t.Fatalf("listener accepted a bad peer (%q)", s.Peer())
	}
	if !errors.Is(acceptErr, wire.ErrAuth) {
		t.Fatalf("server: %v, want ErrAuth", acceptErr)
	}

	sent := make(chan error, 1)
	go func() {
		c, err := wire.Dial(ctx, ln.Addr().String(), good)
		if err == nil {
			err = c.Send(ctx, wire.Frame{Type: wire.TypeControl, Epoch: 77, Payload: []byte("good")})
			defer c.Close()
		}
		sent <- err
	}()
	s, err = ln.Accept(ctx)
	if err != nil {
		t.Fatalf("good peer after a bad one: accept: %v", err)
	}
	defer s.Close()
	f, err := s.Recv(ctx)
	if err != nil {
		t.Fatalf("good peer: recv: %v", err)
	}
	if f.Type != wire.TypeControl || f.Epoch != 77 || string(f.Payload) != "good" {
		t.Fatalf("first frame on the server is %s epoch %d %q, not the good peer's", f.Type, f.Epoch, f.Payload)
	}
	if err := <-sent; err != nil {
		t.Fatalf("good peer: %v", err)
	}
	return badErr, acceptErr
}

func dialWith(cr *wire.Credentials) func(string) error {
	return func(addr string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := wire.Dial(ctx, addr, cr)
		if err == nil {
			// Must not happen; if it does, try to push state.
			c.Send(ctx, wire.Frame{Type: wire.TypeMemory, Epoch: 1, Payload: []byte("evil")})
			c.Close()
		}
		return err
	}
}

func TestAuthRefusals(t *testing.T) {
	ca, err := wire.NewCA("pair-1")
	if err != nil {
		t.Fatal(err)
	}
	other, err := wire.NewCA("pair-2")
	if err != nil {
		t.Fatal(err)
	}
	srv := issue(t, ca, "secondary")
	good := issue(t, ca, "primary")

	expiredPEM, expiredKey, err := ca.IssueCert(wire.CertRequest{
		Name: "primary", Hosts: []string{"127.0.0.1"},
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	expired, err := wire.CredentialsFromPEM(ca.CertPEM(), expiredPEM, expiredKey)
	if err != nil {
		t.Fatal(err)
	}
	foreignPEM, foreignKey, err := other.Issue("primary", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}

	key := bytes.Repeat([]byte{0x5a}, 32)
	pskSrv, err := wire.CredentialsFromPSK("secondary", key)
	if err != nil {
		t.Fatal(err)
	}
	pskGood, err := wire.CredentialsFromPSK("primary", key)
	if err != nil {
		t.Fatal(err)
	}
	pskWrong, err := wire.CredentialsFromPSK("primary", bytes.Repeat([]byte{0x5b}, 32))
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name      string
		srv, good *wire.Credentials
		bad       func(addr string) error
		badMsg    string // in the bad peer's error
		srvMsg    string // in the server's error
	}{
		{name: "WrongCA", srv: srv, good: good, bad: dialWith(issue(t, other, "primary")),
			badMsg: "certificate signed by unknown authority"},
		{name: "CertFromOtherPairsCA", srv: srv, good: good, bad: foreignCert(ca.CertPEM(), foreignPEM, foreignKey),
			srvMsg: "certificate signed by unknown authority"},
		{name: "ExpiredClientCert", srv: srv, good: good, bad: dialWith(expired), srvMsg: "expired"},
		{name: "NoClientCert", srv: srv, good: good, bad: noClientCert(ca.CertPEM()),
			srvMsg: "client didn't provide a certificate"},
		{name: "WrongPSK", srv: pskSrv, good: pskGood, bad: dialWith(pskWrong),
			badMsg: "wrong pre-shared key", srvMsg: "does not know our pre-shared key"},
		{name: "PSKClientMTLSServer", srv: srv, good: good, bad: dialWith(pskGood)},
		{name: "MTLSClientPSKServer", srv: pskSrv, good: pskGood, bad: dialWith(good),
			badMsg: "failed to verify certificate"},
		{name: "PlainTCP", srv: srv, good: good, bad: plainTCP, srvMsg: "does not look like a TLS handshake"},
		{name: "PlainTCPvsPSK", srv: pskSrv, good: pskGood, bad: plainTCP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			badErr, srvErr := refusedThenGood(t, tc.srv, tc.good, tc.bad)
			t.Logf("bad peer: %v\nserver: %v", badErr, srvErr)
			if !errors.Is(badErr, wire.ErrAuth) {
				t.Errorf("bad peer got %v, want ErrAuth", badErr)
			}
			if tc.badMsg != "" && (badErr == nil || !strings.Contains(badErr.Error(), tc.badMsg)) {
				t.Errorf("bad peer's error %q does not say %q", badErr, tc.badMsg)
			}
			if tc.srvMsg != "" && !strings.Contains(srvErr.Error(), tc.srvMsg) {
				t.Errorf("server's error %q does not say %q", srvErr, tc.srvMsg)
			}
		})
	}
}

// noClientCert is a TLS client that trusts the pair's CA but has no
// certificate of its own.
func noClientCert(caPEM []byte) func(string) error {
	return func(addr string) error {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(caPEM)
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1",
			MinVersion: tls.VersionTLS13, NextProtos: []string{wire.ALPN}})
		if err != nil {
			return errors.Join(wire.ErrAuth, err)
		}
		defer c.Close()
		// TLS 1.3 completes the client's side before the server has
		// checked the client; the refusal arrives as an alert.
		c.SetDeadline(time.Now().Add(30 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if err == nil {
			return errors.New("server sent data to a client without certificate")
		}
		return errors.Join(wire.ErrAuth, err)
	}
}

// foreignCert is a TLS client that trusts this pair's CA (its certificate
// is public) and presents a certificate of another pair's CA even though
// the server asks for certificates of this pair (crypto/tls would
// otherwise not send it).
func foreignCert(caPEM, certPEM, keyPEM []byte) func(string) error {
	return func(addr string) error {
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(caPEM)
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1",
			MinVersion: tls.VersionTLS13, NextProtos: []string{wire.ALPN},
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }})
		if err != nil {
			return errors.Join(wire.ErrAuth, err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if err == nil {
			return errors.New("server sent data to a client with a foreign certificate")
		}
		return errors.Join(wire.ErrAuth, err)
	}
}

// plainTCP speaks the frame protocol without TLS.
func plainTCP(addr string) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	stream, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeHello, Payload: []byte{0, 1, 0, 1, 0, 0, 0, 0}})
	stream, _ = wire.AppendFrame(stream, wire.Frame{Type: wire.TypeMemory, Epoch: 1, Payload: []byte("evil")})
	if _, err := c.Write(stream); err != nil {
		return errors.Join(wire.ErrAuth, err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	b, err := io.ReadAll(c)
	if len(b) > 0 && b[0] != 0x15 { // a TLS alert record would be fine
		return errors.New("server answered a plain TCP client")
	}
	return errors.Join(wire.ErrAuth, err, io.EOF)
}

// TestPSKChannelBinding relays a PSK client to the server through a man in
// the middle that terminates TLS on both sides and copies the decrypted
// bytes: without channel binding the relayed proofs would verify.
func TestPSKChannelBinding(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 24)
	srv, _ := wire.CredentialsFromPSK("secondary", key)
	cli, _ := wire.CredentialsFromPSK("primary", key)
	mitmCA, err := wire.NewCA("mitm")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := mitmCA.Issue("mitm", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	mitmCert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, err := wire.Listen(ctx, "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	relay, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	relayed := make(chan error, 1)
	go func() {
		raw, err := relay.Accept()
		if err != nil {
			relayed <- err
			return
		}
		down := tls.Server(raw, &tls.Config{Certificates: []tls.Certificate{mitmCert},
			NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13})
		defer down.Close()
		up, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true,
			NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13})
		if err != nil {
			relayed <- err
			return
		}
		defer up.Close()
		go func() { io.Copy(up, down); up.Close() }()
		io.Copy(down, up)
		relayed <- nil
	}()
	_, dialErr := wire.Dial(ctx, relay.Addr().String(), cli)
	_, acceptErr := ln.Accept(ctx)
	t.Logf("client: %v\nserver: %v", dialErr, acceptErr)
	if !errors.Is(dialErr, wire.ErrAuth) || !errors.Is(acceptErr, wire.ErrAuth) {
		t.Fatalf("relayed PSK exchange: client %v, server %v; want ErrAuth on both", dialErr, acceptErr)
	}
	if !strings.Contains(acceptErr.Error(), "does not know our pre-shared key") {
		t.Fatalf("server refused for another reason: %v", acceptErr)
	}
	if err := <-relayed; err != nil {
		t.Fatalf("the relay itself failed, so the test proved nothing: %v", err)
	}
}

// TestHandshakeTimeout: a peer that connects and says nothing is dropped
// after HandshakeTimeout, and nothing is left running after Close.
func TestHandshakeTimeout(t *testing.T) {
	srv, cli := mtlsCreds(t)
	before := runtime.NumGoroutine()
	srv.HandshakeTimeout = 200 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, err := wire.Listen(ctx, "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	mute, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer mute.Close()
	if _, err := ln.Accept(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("mute peer: accept returned %v, want a handshake deadline", err)
	}
	// A handshake in progress when the listener closes is aborted.
	mute2, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer mute2.Close()
	// A dial against a server that never answers times out by ctx.
	dctx, dcancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer dcancel()
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	if _, err := wire.Dial(dctx, silent.Addr().String(), cli); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial to a silent server returned %v, want context.DeadlineExceeded", err)
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := ln.Accept(ctx); !errors.Is(err, wire.ErrClosed) {
		t.Fatalf("accept after close returned %v, want ErrClosed", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<16)
		t.Fatalf("%d goroutines before, %d after closing:\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
}
