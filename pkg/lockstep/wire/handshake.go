package wire

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
)

// alpn names the protocol inside TLS, so an ftctl endpoint never completes a
// handshake with some other TLS service that trusts the same keys.
const alpn = "ftctl-wire"

// minVersion is the oldest protocol version this package can speak.
const minVersion = 1

func tlsConfig(cr *Credentials, server bool, serverName string) *tls.Config {
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{alpn},
		Certificates: []tls.Certificate{cr.cert},
		// Links are long-lived; resumption would only add state.
		SessionTicketsDisabled: true,
	}
	switch {
	case cr.mode == modeTLS && server:
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = cr.roots
	case cr.mode == modeTLS:
		cfg.RootCAs = cr.roots
		cfg.ServerName = serverName
	case cr.mode == modePSK && !server:
		// The throwaway certificate proves nothing; the PSK exchange,
		// bound to this TLS session, authenticates the server instead.
		cfg.InsecureSkipVerify = true
	}
	return cfg
}

// handshake runs on a fresh TCP connection: TLS, then (PSK) the key proof,
// then hello. On error raw is closed. The server speaks first at every step
// after TLS, so a client the server refused reads the refusal rather than
// racing it with its own writes.
func handshake(ctx context.Context, raw net.Conn, cr *Credentials, server bool, serverName string) (Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, cr.handshakeTimeout())
	defer cancel()
	var tc *tls.Conn
	if server {
		tc = tls.Server(raw, tlsConfig(cr, true, ""))
	} else {
		tc = tls.Client(raw, tlsConfig(cr, false, serverName))
	}
	peerAddr := raw.RemoteAddr()
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("wire: TLS handshake with %s: %w", peerAddr, ctx.Err())
		}
		return nil, fmt.Errorf("%w: TLS handshake with %s: %w", ErrAuth, peerAddr, err)
	}
	c := newStreamConn(tc, raw)
	var err error
	st := tc.ConnectionState()
	switch cr.mode {
	case modeTLS:
		if len(st.PeerCertificates) == 0 { // crypto/tls guarantees one; be explicit
			err = fmt.Errorf("%w: %s presented no certificate", ErrAuth, peerAddr)
		} else {
			c.peer = st.PeerCertificates[0].Subject.CommonName
		}
	case modePSK:
		c.peer, err = pskExchange(ctx, c, &st, cr, server)
	}
	if err == nil {
		err = hello(ctx, c, server)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("wire: handshake with %s: %w", peerAddr, handshakeErr(err))
	}
	c.establish()
	return c, nil
}

// handshakeErr classifies a failure after TLS: a peer that aborts or hangs
// up before the handshake is done has refused us.
func handshakeErr(err error) error {
	switch {
	case errors.Is(err, ErrAuth), errors.Is(err, ErrVersion), isCtxErr(err):
		return err
	case isRemoteAlert(err):
		return fmt.Errorf("%w: the peer refused the TLS session: %w", ErrAuth, err)
	case errors.Is(err, ErrClosed):
		return fmt.Errorf("%w: the peer closed the link before the handshake completed (it may have refused our credentials): %w", ErrAuth, err)
	}
	return err
}

// PSK exchange messages (payloads of TypeAuth frames).
const (
	authChallenge = 1 // server: nonce(32) idlen(1) id
	authResponse  = 2 // client: nonce(32) idlen(1) id mac(32)
	authProof     = 3 // server: mac(32)
	authRefuse    = 4 // either: reason text
	nonceLen      = 32
	exporterLabel = "EXPORTER-ftctl-wire-psk-v1"
)

// pskMAC proves knowledge of the key for one role, bound to this TLS
// session through its exported keying material: a man in the middle runs
// two sessions with different material and cannot relay the proof.
func pskMAC(key, binding []byte, role string, nonceS, nonceC []byte, idS, idC string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("ftctl-wire psk v1 " + role))
	m.Write(binding)
	m.Write(nonceS)
	m.Write(nonceC)
	m.Write([]byte{byte(len(idS))})
	m.Write([]byte(idS))
	m.Write([]byte{byte(len(idC))})
	m.Write([]byte(idC))
	return m.Sum(nil)
}

func refuse(ctx context.Context, c *streamConn, reason string) {
	_ = c.Send(ctx, Frame{Type: TypeAuth, Payload: append([]byte{authRefuse}, reason...)})
}

// recvHandshake reads the next handshake frame of type want. A refusal
// from the peer is ErrAuth; any other frame is a protocol violation by a
// peer we have not accepted.
func recvHandshake(ctx context.Context, c *streamConn, want Type) ([]byte, error) {
	f, err := c.Recv(ctx)
	if err != nil {
		return nil, err
	}
	if f.Type == TypeAuth && len(f.Payload) > 0 && f.Payload[0] == authRefuse {
		return nil, fmt.Errorf("%w: the peer refused us: %q", ErrAuth, f.Payload[1:])
	}
	if f.Type != want {
		if want == TypeAuth {
			return nil, fmt.Errorf("%w: the peer sent a %s frame before authenticating", ErrAuth, f.Type)
		}
		return nil, fmt.Errorf("%w: expected a %s frame during the handshake, got %s", ErrCorrupt, want, f.Type)
	}
	return f.Payload, nil
}

func pskExchange(ctx context.Context, c *streamConn, st *tls.ConnectionState, cr *Credentials, server bool) (string, error) {
	binding, err := st.ExportKeyingMaterial(exporterLabel, nil, 32)
	if err != nil {
		return "", fmt.Errorf("%w: TLS keying material: %w", ErrAuth, err)
	}
	if server {
		nonceS := make([]byte, nonceLen)
		_, _ = rand.Read(nonceS)
		msg := append([]byte{authChallenge}, nonceS...)
		msg = append(append(msg, byte(len(cr.name))), cr.name...)
		if err := c.Send(ctx, Frame{Type: TypeAuth, Payload: msg}); err != nil {
			return "", err
		}
		p, err := recvHandshake(ctx, c, TypeAuth)
		if err != nil {
			return "", err
		}
		nonceC, idC, mac, ok := parseAuth(p, authResponse, true)
		if !ok {
			refuse(ctx, c, "malformed PSK response")
			return "", fmt.Errorf("%w: malformed PSK response (%d bytes)", ErrAuth, len(p))
		}
		want := pskMAC(cr.psk, binding, "client", nonceS, nonceC, cr.name, idC)
		if !hmac.Equal(mac, want) {
			refuse(ctx, c, "wrong pre-shared key")
			return "", fmt.Errorf("%w: peer %q does not know our pre-shared key (its proof does not verify)", ErrAuth, idC)
		}
		proof := pskMAC(cr.psk, binding, "server", nonceS, nonceC, cr.name, idC)
		if err := c.Send(ctx, Frame{Type: TypeAuth, Payload: append([]byte{authProof}, proof...)}); err != nil {
			return "", err
		}
		return idC, nil
	}
	p, err := recvHandshake(ctx, c, TypeAuth)
	if err != nil {
		return "", err
	}
	nonceS, idS, _, ok := parseAuth(p, authChallenge, false)
	if !ok {
		refuse(ctx, c, "malformed PSK challenge")
		return "", fmt.Errorf("%w: malformed PSK challenge (%d bytes)", ErrAuth, len(p))
	}
	nonceC := make([]byte, nonceLen)
	_, _ = rand.Read(nonceC)
	msg := append([]byte{authResponse}, nonceC...)
	msg = append(append(msg, byte(len(cr.name))), cr.name...)
	msg = append(msg, pskMAC(cr.psk, binding, "client", nonceS, nonceC, idS, cr.name)...)
	if err := c.Send(ctx, Frame{Type: TypeAuth, Payload: msg}); err != nil {
		return "", err
	}
	p, err = recvHandshake(ctx, c, TypeAuth)
	if err != nil {
		return "", err
	}
	if len(p) != 1+sha256.Size || p[0] != authProof {
		refuse(ctx, c, "malformed PSK proof")
		return "", fmt.Errorf("%w: malformed PSK proof (%d bytes)", ErrAuth, len(p))
	}
	if !hmac.Equal(p[1:], pskMAC(cr.psk, binding, "server", nonceS, nonceC, idS, cr.name)) {
		refuse(ctx, c, "wrong pre-shared key")
		return "", fmt.Errorf("%w: peer %q does not know our pre-shared key (its proof does not verify)", ErrAuth, idS)
	}
	return idS, nil
}

// parseAuth splits a challenge or response: step | nonce | idlen | id [| mac].
func parseAuth(p []byte, step byte, withMAC bool) (nonce []byte, id string, mac []byte, ok bool) {
	if len(p) < 1+nonceLen+1 || p[0] != step {
		return nil, "", nil, false
	}
	nonce = p[1 : 1+nonceLen]
	n := int(p[1+nonceLen])
	rest := p[2+nonceLen:]
	if n == 0 || len(rest) < n {
		return nil, "", nil, false
	}
	id, rest = string(rest[:n]), rest[n:]
	if withMAC {
		if len(rest) != sha256.Size {
			return nil, "", nil, false
		}
		return nonce, id, rest, true
	}
	return nonce, id, nil, len(rest) == 0
}

// Hello payload: lowest u16 | highest u16 protocol version spoken | 4
// reserved bytes. Longer payloads are accepted (later versions may add
// fields). The server sends first; each side agrees on the highest common
// version or fails with ErrVersion.
const helloLen = 8

func encodeHello(lo, hi uint16) []byte {
	b := make([]byte, helloLen)
	binary.BigEndian.PutUint16(b[0:], lo)
	binary.BigEndian.PutUint16(b[2:], hi)
	return b
}

func hello(ctx context.Context, c *streamConn, server bool) error {
	mine := Frame{Type: TypeHello, Payload: encodeHello(minVersion, Version)}
	if server {
		if err := c.Send(ctx, mine); err != nil {
			return err
		}
	}
	p, err := recvHandshake(ctx, c, TypeHello)
	if err != nil {
		return err
	}
	if !server {
		// Send ours even if we cannot agree, so the server reports the
		// same ErrVersion instead of a hang-up.
		if err := c.Send(ctx, mine); err != nil {
			return err
		}
	}
	_, err = agreeVersion(p)
	return err
}

// agreeVersion picks the highest version both sides speak.
func agreeVersion(p []byte) (uint16, error) {
	if len(p) < helloLen {
		return 0, fmt.Errorf("%w: hello payload of %d bytes, want at least %d", ErrCorrupt, len(p), helloLen)
	}
	lo, hi := binary.BigEndian.Uint16(p[0:]), binary.BigEndian.Uint16(p[2:])
	if lo > hi {
		return 0, fmt.Errorf("%w: hello offers versions %d..%d, an empty range", ErrCorrupt, lo, hi)
	}
	v := min(hi, uint16(Version))
	if v < max(lo, minVersion) {
		return 0, fmt.Errorf("%w: the peer speaks versions %d..%d, this agent %d..%d", ErrVersion, lo, hi, minVersion, Version)
	}
	return v, nil
}
