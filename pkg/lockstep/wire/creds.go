package wire

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"strings"
	"time"

	"github.com/ftctl/ftctl/internal/fsutil"
)

// Certificate lifetimes. A pair's CA outlives the certificates it issues;
// `ftctl cert` re-issues before they expire.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	CertValidity = 2 * 365 * 24 * time.Hour
	// clockSkew backdates NotBefore so hosts with slightly different
	// clocks accept a fresh certificate.
	clockSkew = time.Hour
	// MinPSKLen is the shortest pre-shared key accepted, in bytes.
	MinPSKLen = 16
	// DefaultHandshakeTimeout bounds TLS, authentication and hello when
	// neither ctx nor Credentials give an earlier limit.
	DefaultHandshakeTimeout = 10 * time.Second
)

type credMode int

const (
	modeTLS credMode = iota + 1
	modePSK
)

// Credentials authenticate this agent to its peer and the peer to it:
// either a certificate issued by the pair's CA (mutual TLS), or a
// pre-shared key. Build them with CredentialsFromPEM, CredentialsFromFiles
// or CredentialsFromPSK, and set the exported fields before first use; one
// Credentials may serve any number of Listen and Dial calls.
type Credentials struct {
	// ServerName is the name Dial requires in the listener's certificate
	// (mutual TLS only). Empty means the host part of the dialed address.
	ServerName string
	// HandshakeTimeout bounds one connection's TLS handshake,
	// authentication and hello. Zero means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration

	mode  credMode
	cert  tls.Certificate
	roots *x509.CertPool
	name  string // our identity: certificate CN or PSK id
	psk   []byte
}

// String describes the credentials without revealing any secret.
func (c *Credentials) String() string {
	switch {
	case c == nil:
		return "no credentials"
	case c.mode == modeTLS:
		return fmt.Sprintf("mutual TLS as %q", c.name)
	case c.mode == modePSK:
		return fmt.Sprintf("pre-shared key id %q", c.name)
	}
	return "invalid credentials"
}

func (c *Credentials) valid() error {
	if c == nil || (c.mode != modeTLS && c.mode != modePSK) {
		return fmt.Errorf("%w: credentials missing or not built by a Credentials constructor", ErrInvalid)
	}
	return nil
}

func (c *Credentials) handshakeTimeout() time.Duration {
	if c.HandshakeTimeout > 0 {
		return c.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

// CredentialsFromPEM returns mutual-TLS credentials: caPEM is the pair's CA
// certificate, certPEM and keyPEM this agent's certificate and key issued by
// it. The certificate must be signed by the CA (its dates are checked at
// handshake time).
func CredentialsFromPEM(caPEM, certPEM, keyPEM []byte) (*Credentials, error) {
	ca, err := parseCertPEM(caPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: CA certificate: %w", ErrInvalid, err)
	}
	if !ca.IsCA {
		return nil, fmt.Errorf("%w: CA certificate %q is not a CA", ErrInvalid, ca.Subject.CommonName)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate and key: %w", ErrInvalid, err)
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return nil, fmt.Errorf("%w: certificate: %w", ErrInvalid, err)
		}
	}
	if err := leaf.CheckSignatureFrom(ca); err != nil {
		return nil, fmt.Errorf("%w: certificate %q is not signed by CA %q: %w",
			ErrInvalid, leaf.Subject.CommonName, ca.Subject.CommonName, err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &Credentials{mode: modeTLS, cert: pair, roots: pool, name: leaf.Subject.CommonName}, nil
}

// CredentialsFromFiles is CredentialsFromPEM reading PEM files. The key file
// must not be accessible by group or others.
func CredentialsFromFiles(caPath, certPath, keyPath string) (*Credentials, error) {
	caPEM, err := os.ReadFile(caPath)
	if err != nil {
		return nil, fmt.Errorf("%w: read CA certificate: %w", ErrInvalid, err)
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("%w: read certificate: %w", ErrInvalid, err)
	}
	keyPEM, err := readPrivateFile(keyPath)
	if err != nil {
		return nil, err
	}
	return CredentialsFromPEM(caPEM, certPEM, keyPEM)
}

// CredentialsFromPSK returns pre-shared-key credentials: id names this agent
// to the peer, key (at least MinPSKLen bytes, the same on both agents)
// proves it. The link is still TLS-encrypted, with throwaway certificates;
// the key authenticates both ends, bound to the TLS session.
func CredentialsFromPSK(id string, key []byte) (*Credentials, error) {
	if id == "" || len(id) > 255 || strings.ContainsFunc(id, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return nil, fmt.Errorf("%w: PSK id %q must be 1-255 printable bytes", ErrInvalid, id)
	}
	if len(key) < MinPSKLen {
		return nil, fmt.Errorf("%w: pre-shared key has %d bytes, need at least %d", ErrInvalid, len(key), MinPSKLen)
	}
	cert, err := throwawayCert()
	if err != nil {
		return nil, err
	}
	return &Credentials{mode: modePSK, cert: cert, name: id, psk: bytes.Clone(key)}, nil
}

// NewPSK returns a fresh random 32-byte pre-shared key.
func NewPSK() ([]byte, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("wire: generate key: %w", err)
	}
	return k, nil
}

// ReadPSKFile reads a pre-shared key stored as hex or base64 text. Like ssh,
// it refuses a file that group or others may access.
func ReadPSKFile(path string) ([]byte, error) {
	b, err := readPrivateFile(path)
	if err != nil {
		return nil, err
	}
	s := strings.TrimSpace(string(b))
	var key []byte
	if k, err := hex.DecodeString(s); err == nil {
		key = k
	} else if k, err := base64.StdEncoding.DecodeString(s); err == nil {
		key = k
	} else if k, err := base64.RawStdEncoding.DecodeString(s); err == nil {
		key = k
	} else {
		return nil, fmt.Errorf("%w: key file %s holds neither hex nor base64", ErrInvalid, path)
	}
	if len(key) < MinPSKLen {
		return nil, fmt.Errorf("%w: key file %s holds %d bytes, need at least %d", ErrInvalid, path, len(key), MinPSKLen)
	}
	return key, nil
}

// WritePSKFile stores key as hex in a new file readable only by its owner.
func WritePSKFile(path string, key []byte) error {
	if len(key) < MinPSKLen {
		return fmt.Errorf("%w: pre-shared key has %d bytes, need at least %d", ErrInvalid, len(key), MinPSKLen)
	}
	return fsutil.WriteFileAtomic(path, []byte(hex.EncodeToString(key)+"\n"), 0o600)
}

func readPrivateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: read private key: %w", ErrInvalid, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: read private key: %w", ErrInvalid, err)
	}
	if m := st.Mode().Perm(); m&0o077 != 0 {
		return nil, fmt.Errorf("%w: private key file %s is accessible by group or others (mode %04o); run chmod 600 %s",
			ErrInvalid, path, m, path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: read private key: %w", ErrInvalid, err)
	}
	return b, nil
}

// CA is a pair's certificate authority: it issues the certificates of both
// agents of one protected pair, and nothing else should trust it.
type CA struct {
	// Cert is the CA certificate.
	Cert *x509.Certificate
	key  crypto.Signer
}

// NewCA creates a CA named name with a fresh ECDSA P-256 key.
func NewCA(name string) (*CA, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("wire: generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"ftctl"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("wire: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("wire: parse CA certificate: %w", err)
	}
	return &CA{Cert: cert, key: key}, nil
}

// LoadCA loads a CA saved with CertPEM and KeyPEM.
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: CA certificate: %w", ErrInvalid, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: certificate %q is not a CA", ErrInvalid, cert.Subject.CommonName)
	}
	blk, _ := pem.Decode(keyPEM)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%w: CA key: no PKCS#8 \"PRIVATE KEY\" PEM block", ErrInvalid)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: CA key: %w", ErrInvalid, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%w: CA key of type %T cannot sign", ErrInvalid, k)
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: CA key does not belong to CA certificate %q", ErrInvalid, cert.Subject.CommonName)
	}
	return &CA{Cert: cert, key: signer}, nil
}

// LoadCAFiles is LoadCA reading files; the key file must be private.
func LoadCAFiles(certPath, keyPath string) (*CA, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("%w: read CA certificate: %w", ErrInvalid, err)
	}
	keyPEM, err := readPrivateFile(keyPath)
	if err != nil {
		return nil, err
	}
	return LoadCA(certPEM, keyPEM)
}

// CertPEM returns the CA certificate in PEM form (give it to both agents).
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// KeyPEM returns the CA's private key in PKCS#8 PEM form.
func (ca *CA) KeyPEM() ([]byte, error) { return encodeKeyPEM(ca.key) }

// Save writes the CA certificate and key (the key readable only by its
// owner).
func (ca *CA) Save(certPath, keyPath string) error {
	k, err := ca.KeyPEM()
	if err != nil {
		return err
	}
	return SaveKeyPair(certPath, keyPath, ca.CertPEM(), k)
}

// SaveKeyPair writes a certificate (mode 0644) and its key (mode 0600).
func SaveKeyPair(certPath, keyPath string, certPEM, keyPEM []byte) error {
	if err := fsutil.WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(certPath, certPEM, 0o644)
}

// CertRequest describes a certificate for CA.IssueCert.
type CertRequest struct {
	// Name is the agent's identity: the certificate's common name, and a
	// DNS name if it is one.
	Name string
	// Hosts are the DNS names and IP addresses peers dial this agent by.
	Hosts []string
	// NotBefore and NotAfter default to now (less an hour for clock skew)
	// and NotBefore+CertValidity.
	NotBefore, NotAfter time.Time
}

// Issue returns a certificate and key for the agent name, valid for
// CertValidity, for use both as TLS server (reachable as hosts) and client.
func (ca *CA) Issue(name string, hosts []string) (certPEM, keyPEM []byte, err error) {
	return ca.IssueCert(CertRequest{Name: name, Hosts: hosts})
}

// IssueCert is Issue with every field under control.
func (ca *CA) IssueCert(r CertRequest) (certPEM, keyPEM []byte, err error) {
	if err := checkName(r.Name); err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: r.Name, Organization: []string{"ftctl"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		NotBefore:   r.NotBefore,
		NotAfter:    r.NotAfter,
	}
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-clockSkew)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = tmpl.NotBefore.Add(CertValidity)
	}
	if !tmpl.NotAfter.After(tmpl.NotBefore) {
		return nil, nil, fmt.Errorf("%w: certificate for %q: NotAfter %v is not after NotBefore %v",
			ErrInvalid, r.Name, tmpl.NotAfter, tmpl.NotBefore)
	}
	if isDNSName(r.Name) {
		tmpl.DNSNames = append(tmpl.DNSNames, r.Name)
	}
	for _, h := range r.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if isDNSName(h) {
			if h != r.Name {
				tmpl.DNSNames = append(tmpl.DNSNames, h)
			}
		} else {
			return nil, nil, fmt.Errorf("%w: host %q is neither an IP address nor a DNS name", ErrInvalid, h)
		}
	}
	if tmpl.SerialNumber, err = newSerial(); err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("wire: generate key: %w", err)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("wire: issue certificate for %q: %w", r.Name, err)
	}
	kp, err := encodeKeyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), kp, nil
}

func encodeKeyPEM(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("wire: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func parseCertPEM(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("no \"CERTIFICATE\" PEM block")
	}
	return x509.ParseCertificate(blk.Bytes)
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("wire: serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func checkName(name string) error {
	if name == "" || len(name) > 64 || strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("%w: name %q must be 1-64 printable characters", ErrInvalid, name)
	}
	return nil
}

func isDNSName(s string) bool {
	if s == "" || len(s) > 253 || net.ParseIP(s) != nil {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// throwawayCert makes the self-signed certificate a PSK endpoint uses only
// to get TLS encryption; nobody verifies it, the PSK exchange authenticates.
func throwawayCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("wire: generate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "ftctl-psk-session"},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     now.Add(CertValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("wire: create session certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
