package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
)

// logBuf collects server logs so tests can check the logged reasons.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type testServer struct {
	sock string
	logs *logBuf
	done chan error
}

// startServer serves the exports on a fresh unix socket until the test ends.
func startServer(t *testing.T, opt Options, exports ...Export) *testServer {
	t.Helper()
	lb := &logBuf{}
	opt.Logger = slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug}))
	s, err := NewServer(opt, exports...)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{sock: sock, logs: lb, done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-ts.done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Errorf("server did not stop")
		}
		if t.Failed() {
			t.Logf("server log:\n%s", lb.String())
		}
	})
	return ts
}

func (ts *testServer) uri(name string) string {
	return "nbd+unix:///" + name + "?socket=" + ts.sock
}

func need(t *testing.T, bins ...string) {
	t.Helper()
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s not installed (hack/deps.sh installs it): %v", b, err)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// makeImage creates a raw image of size bytes with the given content at 0.
func makeImage(t *testing.T, size int64, content []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

func openFile(t *testing.T, path string) *backend.File {
	t.Helper()
	f, err := backend.OpenFile(path, backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rawClient speaks the protocol byte by byte, so tests can break it.
type rawClient struct {
	t *testing.T
	c net.Conn
}

func dialRaw(t *testing.T, sock string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, c: c}
}

func (rc *rawClient) read(n int) []byte {
	rc.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(rc.c, b); err != nil {
		rc.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (rc *rawClient) write(b []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(b); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

// hello reads the greeting and answers with the given client flags.
func (rc *rawClient) hello(cflags uint32) {
	rc.t.Helper()
	g := rc.read(18)
	if binary.BigEndian.Uint64(g) != magicInit || binary.BigEndian.Uint64(g[8:]) != magicOpt {
		rc.t.Fatalf("bad greeting % x", g)
	}
	if fl := binary.BigEndian.Uint16(g[16:]); fl != flagFixedNewstyle|flagNoZeroes {
		rc.t.Fatalf("handshake flags %#x", fl)
	}
	rc.write(binary.BigEndian.AppendUint32(nil, cflags))
}

func (rc *rawClient) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	rc.write(append(b, data...))
}

func (rc *rawClient) optReply() (opt, typ uint32, data []byte) {
	rc.t.Helper()
	h := rc.read(20)
	if m := binary.BigEndian.Uint64(h); m != magicOptReply {
		rc.t.Fatalf("option reply magic %#x", m)
	}
	n := binary.BigEndian.Uint32(h[16:])
	return binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:]), rc.read(int(n))
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// open negotiates with NBD_OPT_GO and returns the export size and flags.
func (rc *rawClient) open(name string) (uint64, uint16) {
	rc.t.Helper()
	rc.hello(flagFixedNewstyle | flagNoZeroes)
	rc.option(optGo, goData(name))
	var size uint64
	var fl uint16
	for {
		_, typ, data := rc.optReply()
		switch typ {
		case repInfo:
			if binary.BigEndian.Uint16(data) == infoExport {
				size = binary.BigEndian.Uint64(data[2:])
				fl = binary.BigEndian.Uint16(data[10:])
			}
		case repAck:
			return size, fl
		default:
			rc.t.Fatalf("GO reply type %#x: %s", typ, data)
		}
	}
}

func (rc *rawClient) request(typ, flags uint16, handle, off uint64, n uint32, payload []byte) {
	rc.t.Helper()
	var h [requestHeaderLen]byte
	Request{Flags: flags, Type: typ, Handle: handle, Offset: off, Length: n}.Encode(h[:])
	rc.write(append(h[:], payload...))
}

// reply reads a simple reply; dataLen bytes follow when errno is 0.
func (rc *rawClient) reply(dataLen int) (errno uint32, handle uint64, data []byte) {
	rc.t.Helper()
	h := rc.read(16)
	if m := binary.BigEndian.Uint32(h); m != magicSimpleReply {
		rc.t.Fatalf("reply magic %#x", m)
	}
	errno, handle = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && dataLen > 0 {
		data = rc.read(dataLen)
	}
	return errno, handle, data
}

// expectClosed checks that the server hung up.
func (rc *rawClient) expectClosed() {
	rc.t.Helper()
	b := make([]byte, 1)
	n, err := rc.c.Read(b)
	if err == nil {
		rc.t.Fatalf("connection still open, read %d bytes %x", n, b[:n])
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		rc.t.Fatalf("server did not close the connection: %v", err)
	}
}

func runErr(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}
