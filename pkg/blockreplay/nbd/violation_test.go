package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
)

const testSize = 1 << 20

// memServer serves a Mem disk filled with a known pattern.
func memServer(t *testing.T, readOnly bool) (*testServer, *backend.Mem, []byte) {
	t.Helper()
	m := backend.NewMem(testSize)
	pat := bytes.Repeat([]byte("0123456789abcdef"), testSize/16)
	m.WriteAt(context.Background(), pat, 0, 0)
	ts := startServer(t, Options{}, Export{Name: "m", Backend: m, ReadOnly: readOnly})
	return ts, m, pat
}

func waitLog(t *testing.T, ts *testServer, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if strings.Contains(ts.logs.String(), want) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("server log lacks %q:\n%s", want, ts.logs.String())
}

func TestHandshakeOptions(t *testing.T) {
	ts, _, _ := memServer(t, false)
	rc := dialRaw(t, ts.sock)
	rc.hello(flagFixedNewstyle | flagNoZeroes)

	rc.option(99, []byte("junk"))
	if opt, typ, _ := rc.optReply(); opt != 99 || typ != repErrUnsup {
		t.Errorf("unknown option: reply opt %d type %#x, want ERR_UNSUP", opt, typ)
	}
	rc.option(optStructuredReply, nil)
	if _, typ, _ := rc.optReply(); typ != repErrUnsup {
		t.Errorf("STRUCTURED_REPLY: type %#x, want ERR_UNSUP", typ)
	}
	rc.option(optStartTLS, nil)
	if _, typ, _ := rc.optReply(); typ != repErrUnsup {
		t.Errorf("STARTTLS: type %#x, want ERR_UNSUP", typ)
	}
	rc.option(optList, nil)
	if _, typ, data := rc.optReply(); typ != repServer || string(data[4:]) != "m" {
		t.Errorf("LIST: type %#x data %q", typ, data)
	}
	if _, typ, _ := rc.optReply(); typ != repAck {
		t.Errorf("LIST end: type %#x", typ)
	}
	rc.option(optList, []byte{1})
	if _, typ, _ := rc.optReply(); typ != repErrInvalid {
		t.Errorf("LIST with data: type %#x, want ERR_INVALID", typ)
	}
	rc.option(optGo, goData("nope"))
	if _, typ, msg := rc.optReply(); typ != repErrUnknown || !strings.Contains(string(msg), "nope") {
		t.Errorf("GO unknown export: type %#x msg %q", typ, msg)
	}
	rc.option(optGo, []byte{0, 0, 0, 200, 'x', 0, 0})
	if _, typ, _ := rc.optReply(); typ != repErrInvalid {
		t.Errorf("GO with a name longer than its data: type %#x, want ERR_INVALID", typ)
	}
	rc.option(optGo, append(goData("m", infoBlockSize), 0)) // one stray byte
	if _, typ, _ := rc.optReply(); typ != repErrInvalid {
		t.Errorf("GO with trailing byte: type %#x, want ERR_INVALID", typ)
	}
	rc.option(optInfo, goData("m", infoName, infoBlockSize))
	var sawExport, sawName, sawBlock bool
	for {
		_, typ, data := rc.optReply()
		if typ == repAck {
			break
		}
		if typ != repInfo {
			t.Fatalf("INFO: reply type %#x %q", typ, data)
		}
		switch binary.BigEndian.Uint16(data) {
		case infoExport:
			sawExport = binary.BigEndian.Uint64(data[2:]) == testSize
		case infoName:
			sawName = string(data[2:]) == "m"
		case infoBlockSize:
			sawBlock = binary.BigEndian.Uint32(data[2:]) == 1 && binary.BigEndian.Uint32(data[10:]) == defaultMaxRequest
		}
	}
	if !sawExport || !sawName || !sawBlock {
		t.Errorf("INFO replies: export %v name %v block size %v", sawExport, sawName, sawBlock)
	}
	// Still negotiating after all that: EXPORT_NAME enters transmission
	// with size and flags and no zero padding (NO_ZEROES negotiated).
	rc.option(optExportName, []byte("m"))
	b := rc.read(10)
	if binary.BigEndian.Uint64(b) != testSize {
		t.Errorf("EXPORT_NAME size %d", binary.BigEndian.Uint64(b))
	}
	want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes)
	if fl := binary.BigEndian.Uint16(b[8:]); fl != want {
		t.Errorf("transmission flags %#x, want %#x (no MULTI_CONN unless configured)", fl, want)
	}
	rc.request(cmdRead, 0, 1, 0, 16, nil)
	if errno, h, data := rc.reply(16); errno != 0 || h != 1 || string(data) != "0123456789abcdef" {
		t.Errorf("read after EXPORT_NAME: errno %d handle %d data %q", errno, h, data)
	}
}

func TestHandshakeZeroPaddingWithoutNoZeroes(t *testing.T) {
	ts, _, _ := memServer(t, false)
	rc := dialRaw(t, ts.sock)
	rc.hello(flagFixedNewstyle)
	rc.option(optExportName, nil) // empty name: the default export
	b := rc.read(10 + 124)
	if binary.BigEndian.Uint64(b) != testSize || !bytes.Equal(b[10:], make([]byte, 124)) {
		t.Fatalf("EXPORT_NAME reply % x", b[:16])
	}
}

func TestHandshakeViolations(t *testing.T) {
	cases := []struct {
		name string
		send func(rc *rawClient)
		log  string
	}{
		{"unknown client flags", func(rc *rawClient) { rc.write([]byte{0, 0, 0, 0x81}) }, "unknown client flags"},
		{"bad option magic", func(rc *rawClient) {
			rc.hello(flagFixedNewstyle)
			rc.write(make([]byte, 16))
		}, "bad option magic"},
		{"oversized option", func(rc *rawClient) {
			rc.hello(flagFixedNewstyle)
			b := binary.BigEndian.AppendUint64(nil, magicOpt)
			b = binary.BigEndian.AppendUint32(b, optGo)
			rc.write(binary.BigEndian.AppendUint32(b, 1<<30))
		}, "limit"},
		{"unknown export by name", func(rc *rawClient) {
			rc.hello(flagFixedNewstyle)
			rc.option(optExportName, []byte("nope"))
		}, "unknown export"},
		{"truncated option data", func(rc *rawClient) {
			rc.hello(flagFixedNewstyle)
			b := binary.BigEndian.AppendUint64(nil, magicOpt)
			b = binary.BigEndian.AppendUint32(b, optGo)
			rc.write(append(binary.BigEndian.AppendUint32(b, 100), 1, 2, 3))
			rc.c.(interface{ CloseWrite() error }).CloseWrite()
		}, "connection ended inside option"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts, _, _ := memServer(t, false)
			rc := dialRaw(t, ts.sock)
			if tc.name == "unknown client flags" {
				rc.read(18)
			}
			tc.send(rc)
			rc.expectClosed()
			waitLog(t, ts, tc.log)
		})
	}
}

func TestAbort(t *testing.T) {
	ts, _, _ := memServer(t, false)
	rc := dialRaw(t, ts.sock)
	rc.hello(flagFixedNewstyle)
	rc.option(optAbort, nil)
	if _, typ, _ := rc.optReply(); typ != repAck {
		t.Errorf("ABORT reply type %#x", typ)
	}
	rc.expectClosed()
}

// TestRequestErrors covers the requests that get an NBD error and leave the
// connection usable, and checks the disk is untouched.
func TestRequestErrors(t *testing.T) {
	ts, m, pat := memServer(t, false)
	rc := dialRaw(t, ts.sock)
	if size, _ := rc.open("m"); size != testSize {
		t.Fatalf("size %d", size)
	}
	cases := []struct {
		name          string
		typ, flags    uint16
		off           uint64
		n             uint32
		payload       []byte
		want          uint32
		logSubstrings string
	}{
		{"read past end", cmdRead, 0, testSize - 8, 16, nil, errInval, "past the end"},
		{"read offset overflow", cmdRead, 0, ^uint64(0) - 3, 16, nil, errInval, "past the end"},
		{"oversized read", cmdRead, 0, 0, defaultMaxRequest + 1, nil, errInval, "request limit"},
		{"write past end", cmdWrite, 0, testSize - 4, 8, []byte("XXXXXXXX"), errNoSpc, "past the end"},
		{"write zeroes past end", cmdWriteZeroes, 0, testSize, 1, nil, errNoSpc, "past the end"},
		{"trim past end", cmdTrim, 0, 0, testSize + 1, nil, errInval, "past the end"},
		{"unknown command", 42, 0, 0, 0, nil, errInval, "unknown command 42"},
		{"unknown flag", cmdRead, 1 << 9, 0, 4, nil, errInval, "unsupported flags"},
		{"NO_HOLE on write", cmdWrite, cmdFlagNoHole, 0, 4, []byte("YYYY"), errInval, "unsupported flags"},
		{"flush with length", cmdFlush, 0, 0, 4, nil, errInval, "flush with nonzero"},
		{"oversized write", cmdWrite, 0, 0, defaultMaxRequest + 4096, make([]byte, defaultMaxRequest+4096), errInval, "request limit"},
	}
	for i, tc := range cases {
		rc.request(tc.typ, tc.flags, uint64(100+i), tc.off, tc.n, tc.payload)
		errno, h, _ := rc.reply(0)
		if errno != tc.want || h != uint64(100+i) {
			t.Errorf("%s: errno %d handle %d, want errno %d handle %d", tc.name, errno, h, tc.want, 100+i)
		}
		waitLog(t, ts, tc.logSubstrings)
	}
	// The connection still works, and nothing was written.
	rc.request(cmdRead, 0, 7, testSize-16, 16, nil)
	if errno, _, data := rc.reply(16); errno != 0 || !bytes.Equal(data, pat[testSize-16:]) {
		t.Errorf("read after errors: errno %d data %q", errno, data)
	}
	if !bytes.Equal(m.Snapshot(), pat) {
		t.Error("refused requests changed the disk")
	}
}

func TestReadOnlyExport(t *testing.T) {
	ts, m, pat := memServer(t, true)
	rc := dialRaw(t, ts.sock)
	if _, fl := rc.open("m"); fl&tflagReadOnly == 0 {
		t.Error("READ_ONLY flag not advertised")
	}
	rc.request(cmdWrite, 0, 1, 0, 4, []byte("abcd"))
	rc.request(cmdTrim, 0, 2, 0, 4096, nil)
	for range 2 {
		if errno, _, _ := rc.reply(0); errno != errPerm {
			t.Errorf("write on read-only export: errno %d, want EPERM", errno)
		}
	}
	if !bytes.Equal(m.Snapshot(), pat) {
		t.Error("read-only export was written")
	}
}

// TestDisconnects covers violations that end the connection. In each the
// disk must be untouched.
func TestDisconnects(t *testing.T) {
	hdr := func(typ uint16, off uint64, n uint32) []byte {
		var h [requestHeaderLen]byte
		Request{Type: typ, Handle: 9, Offset: off, Length: n}.Encode(h[:])
		return h[:]
	}
	cases := []struct {
		name  string
		bytes []byte
		log   string
	}{
		{"bad request magic", append([]byte{0xde, 0xad, 0xbe, 0xef}, make([]byte, 24)...), "bad request magic"},
		{"truncated header", hdr(cmdRead, 0, 8)[:20], "inside a request header"},
		{"truncated payload", append(hdr(cmdWrite, 0, 4096), bytes.Repeat([]byte{'Z'}, 100)...), "write payload"},
		// Unknown command with a payload: the server cannot know a payload
		// follows, answers EINVAL, then reads the payload as a header.
		{"unknown command with payload", append(hdr(77, 0, 8), "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ"...), "bad request magic"},
		{"request after disc", append(hdr(cmdDisc, 0, 0), append(hdr(cmdWrite, 0, 4), "ZZZZ"...)...), "NBD_CMD_DISC"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts, m, pat := memServer(t, false)
			rc := dialRaw(t, ts.sock)
			rc.open("m")
			rc.write(tc.bytes)
			rc.c.(interface{ CloseWrite() error }).CloseWrite()
			// Drain any error replies, then the server must hang up.
			for {
				b := make([]byte, 16)
				if _, err := rc.c.Read(b); err != nil {
					break
				}
			}
			waitLog(t, ts, tc.log)
			if !bytes.Equal(m.Snapshot(), pat) {
				t.Error("disk changed")
			}
		})
	}
}

// gate blocks reads of one offset until released, to force replies out of
// order, and delays writes randomly, to tempt reordering.
type gate struct {
	backend.Backend
	hold    int64
	release chan struct{}
	mu      sync.Mutex
	rng     *rand.Rand
}

func (g *gate) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off == g.hold {
		<-g.release
	}
	return g.Backend.ReadAt(ctx, p, off)
}

func (g *gate) WriteAt(ctx context.Context, p []byte, off int64, fl backend.Flags) error {
	g.mu.Lock()
	d := time.Duration(g.rng.IntN(300)) * time.Microsecond
	g.mu.Unlock()
	time.Sleep(d)
	return g.Backend.WriteAt(ctx, p, off, fl)
}

func TestOutOfOrderReplies(t *testing.T) {
	m := backend.NewMem(testSize)
	g := &gate{Backend: m, hold: 4096, release: make(chan struct{}), rng: rand.New(rand.NewPCG(5, 6))}
	ts := startServer(t, Options{Workers: 4}, Export{Name: "g", Backend: g})
	rc := dialRaw(t, ts.sock)
	rc.open("g")
	rc.request(cmdRead, 0, 1, 4096, 512, nil) // blocks in the backend
	rc.request(cmdRead, 0, 2, 0, 512, nil)
	if _, h, _ := rc.reply(512); h != 2 {
		t.Fatalf("first reply is for handle %d; the blocked read must not hold up the other", h)
	}
	close(g.release)
	if _, h, _ := rc.reply(512); h != 1 {
		t.Fatalf("second reply is for handle %d", h)
	}
}

// TestOverlappingWritesKeepArrivalOrder pipelines many writes to the same
// range with random backend delays; the last one sent must win.
func TestOverlappingWritesKeepArrivalOrder(t *testing.T) {
	m := backend.NewMem(testSize)
	g := &gate{Backend: m, hold: -1, rng: rand.New(rand.NewPCG(7, 8))}
	ts := startServer(t, Options{Workers: 8}, Export{Name: "g", Backend: g})
	rc := dialRaw(t, ts.sock)
	rc.open("g")
	const n = 64
	for i := range n {
		// Alternate full and partial overlaps of [0, 8192).
		off, l := uint64(0), uint32(8192)
		if i%2 == 1 {
			off, l = 4096*uint64(i%3), 4096
		}
		rc.request(cmdWrite, 0, uint64(i), off, l, bytes.Repeat([]byte{byte(i + 1)}, int(l)))
	}
	seen := map[uint64]bool{}
	for range n {
		errno, h, _ := rc.reply(0)
		if errno != 0 {
			t.Fatalf("write %d failed: %d", h, errno)
		}
		seen[h] = true
	}
	if len(seen) != n {
		t.Fatalf("%d distinct replies for %d writes", len(seen), n)
	}
	// Apply the same writes sequentially to a reference.
	ref := backend.NewMem(testSize)
	for i := range n {
		off, l := int64(0), 8192
		if i%2 == 1 {
			off, l = 4096*int64(i%3), 4096
		}
		ref.WriteAt(context.Background(), bytes.Repeat([]byte{byte(i + 1)}, l), off, 0)
	}
	if !bytes.Equal(m.Snapshot()[:16384], ref.Snapshot()[:16384]) {
		t.Fatalf("overlapping writes applied out of arrival order: % x", m.Snapshot()[:16384:16384][0:1])
	}
}

func TestNewServerRejectsBadConfig(t *testing.T) {
	m := backend.NewMem(4096)
	for name, ex := range map[string][]Export{
		"no exports":     nil,
		"nil backend":    {{Name: "x"}},
		"duplicate name": {{Name: "x", Backend: m}, {Name: "x", Backend: m}},
		"long name":      {{Name: strings.Repeat("n", 5000), Backend: m}},
	} {
		if _, err := NewServer(Options{}, ex...); err == nil {
			t.Errorf("%s: NewServer accepted it", name)
		}
	}
}
