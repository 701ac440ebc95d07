package wire_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

func wantInvalid(t *testing.T, err error, msg string) {
	t.Helper()
	if !errors.Is(err, wire.ErrInvalid) || !strings.Contains(err.Error(), msg) {
		t.Fatalf("got %v, want ErrInvalid saying %q", err, msg)
	}
}

// TestCertFilesRoundTrip does what `ftctl cert` will: make a CA, save it,
// load it back, issue both agents' certificates into files, and link the
// agents with credentials read from those files.
func TestCertFilesRoundTrip(t *testing.T) {
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	ca, err := wire.NewCA("pair-7")
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.Save(p("ca.pem"), p("ca.key")); err != nil {
		t.Fatal(err)
	}
	loaded, err := wire.LoadCAFiles(p("ca.pem"), p("ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Cert.Equal(ca.Cert) {
		t.Fatal("loaded CA certificate differs")
	}
	for _, name := range []string{"a", "b"} {
		certPEM, keyPEM, err := loaded.Issue("agent-"+name, []string{"127.0.0.1", "::1", "host-" + name + ".example"})
		if err != nil {
			t.Fatal(err)
		}
		if err := wire.SaveKeyPair(p(name+".pem"), p(name+".key"), certPEM, keyPEM); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(p(name + ".key"))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Fatalf("key saved with mode %04o, want 0600", st.Mode().Perm())
		}
	}
	blk, _ := pem.Decode(mustRead(t, p("a.pem")))
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if leaf.Subject.CommonName != "agent-a" ||
		!slices.Equal(leaf.DNSNames, []string{"agent-a", "host-a.example"}) ||
		len(leaf.IPAddresses) != 2 || !leaf.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) ||
		!slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) ||
		!slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Fatalf("certificate names/usages: CN %q DNS %v IP %v EKU %v", leaf.Subject.CommonName, leaf.DNSNames, leaf.IPAddresses, leaf.ExtKeyUsage)
	}
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life != wire.CertValidity {
		t.Fatalf("validity %v, want %v", life, wire.CertValidity)
	}
	if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Fatalf("key %T, want ECDSA P-256", leaf.PublicKey)
	}

	a, err := wire.CredentialsFromFiles(p("ca.pem"), p("a.pem"), p("a.key"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := wire.CredentialsFromFiles(p("ca.pem"), p("b.pem"), p("b.key"))
	if err != nil {
		t.Fatal(err)
	}
	if s := a.String(); !strings.Contains(s, "agent-a") {
		t.Fatalf("String() = %q", s)
	}
	c, s, err := connect(t, b, a)
	if err != nil {
		t.Fatal(err)
	}
	if c.Peer() != "agent-b" || s.Peer() != "agent-a" {
		t.Fatalf("peers %q %q", c.Peer(), s.Peer())
	}

	// ServerName overrides the dialed host: a name not in b's
	// certificate is refused.
	a.ServerName = "host-x.example"
	if _, _, err := connect(t, b, a); !errors.Is(err, wire.ErrAuth) || !strings.Contains(err.Error(), "host-x.example") {
		t.Fatalf("dial expecting another server name: %v, want ErrAuth", err)
	}
	a.ServerName = "host-b.example"
	if _, _, err := connect(t, b, a); err != nil {
		t.Fatalf("dial expecting b's DNS name: %v", err)
	}

	// A private key others can read is refused, like ssh does.
	if err := os.Chmod(p("a.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = wire.CredentialsFromFiles(p("ca.pem"), p("a.pem"), p("a.key"))
	wantInvalid(t, err, "chmod 600")
	if err := os.Chmod(p("ca.key"), 0o640); err != nil {
		t.Fatal(err)
	}
	_, err = wire.LoadCAFiles(p("ca.pem"), p("ca.key"))
	wantInvalid(t, err, "accessible by group or others (mode 0640)")
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCredentialsRefuseBadInput(t *testing.T) {
	ca, err := wire.NewCA("pair-1")
	if err != nil {
		t.Fatal(err)
	}
	other, err := wire.NewCA("pair-2")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := other.Issue("primary", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = wire.CredentialsFromPEM(ca.CertPEM(), certPEM, keyPEM)
	wantInvalid(t, err, `certificate "primary" is not signed by CA "pair-1"`)
	_, err = wire.CredentialsFromPEM(certPEM, certPEM, keyPEM)
	wantInvalid(t, err, "is not a CA")
	_, err = wire.CredentialsFromPEM([]byte("junk"), certPEM, keyPEM)
	wantInvalid(t, err, "CA certificate")
	_, otherKey, _ := ca.Issue("x", nil)
	_, err = wire.CredentialsFromPEM(other.CertPEM(), certPEM, otherKey)
	wantInvalid(t, err, "certificate and key")

	caKey, err := other.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	_, err = wire.LoadCA(ca.CertPEM(), caKey)
	wantInvalid(t, err, `CA key does not belong to CA certificate "pair-1"`)

	_, err = wire.NewCA("")
	wantInvalid(t, err, "name")
	_, _, err = ca.Issue("ok", []string{"not a host"})
	wantInvalid(t, err, `host "not a host"`)
	_, _, err = ca.IssueCert(wire.CertRequest{Name: "x", NotBefore: time.Now(), NotAfter: time.Now().Add(-time.Hour)})
	wantInvalid(t, err, "is not after NotBefore")

	_, err = wire.CredentialsFromPSK("a", make([]byte, 15))
	wantInvalid(t, err, "pre-shared key has 15 bytes, need at least 16")
	_, err = wire.CredentialsFromPSK("", make([]byte, 16))
	wantInvalid(t, err, "PSK id")
	_, err = wire.Listen(context.Background(), "127.0.0.1:0", nil)
	wantInvalid(t, err, "credentials missing")
	_, err = wire.Dial(context.Background(), "127.0.0.1:1", &wire.Credentials{})
	wantInvalid(t, err, "credentials missing")
}

func TestPSKFiles(t *testing.T) {
	dir := t.TempDir()
	key, err := wire.NewPSK()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "psk")
	if err := wire.WritePSKFile(path, key); err != nil {
		t.Fatal(err)
	}
	got, err := wire.ReadPSKFile(path)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("hex round trip: %x, %v", got, err)
	}
	cr, err := wire.CredentialsFromPSK("agent-a", got)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(cr.String(), hex.EncodeToString(key)) || !strings.Contains(cr.String(), "agent-a") {
		t.Fatalf("String() = %q", cr.String())
	}

	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // umask may have masked bits
			t.Fatal(err)
		}
		return p
	}
	got, err = wire.ReadPSKFile(write("b64", base64.StdEncoding.EncodeToString(key)+"\n", 0o600))
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("base64 key: %x, %v", got, err)
	}
	_, err = wire.ReadPSKFile(write("open", hex.EncodeToString(key), 0o644))
	wantInvalid(t, err, "mode 0644")
	_, err = wire.ReadPSKFile(write("short", hex.EncodeToString(key[:8]), 0o600))
	wantInvalid(t, err, "holds 8 bytes, need at least 16")
	_, err = wire.ReadPSKFile(write("junk", "this is not a key!", 0o600))
	wantInvalid(t, err, "neither hex nor base64")
	_, err = wire.ReadPSKFile(filepath.Join(dir, "missing"))
	wantInvalid(t, err, "no such file")

	// Rewriting a file that had loose permissions tightens them.
	loose := write("loose", "x", 0o644)
	if err := wire.WritePSKFile(loose, key); err != nil {
		t.Fatal(err)
	}
	if _, err := wire.ReadPSKFile(loose); err != nil {
		t.Fatalf("rewritten key file: %v", err)
	}
}
