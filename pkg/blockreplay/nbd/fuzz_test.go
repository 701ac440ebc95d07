package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
)

// FuzzDecodeRequest checks the decoder and validator: whatever the bytes, no
// panic, and a request that validates never reaches past the export.
func FuzzDecodeRequest(f *testing.F) {
	var h [requestHeaderLen]byte
	Request{Type: cmdWrite, Handle: 1, Offset: 4096, Length: 512}.Encode(h[:])
	f.Add(h[:])
	Request{Type: cmdRead, Flags: cmdFlagFUA, Offset: ^uint64(0), Length: 2}.Encode(h[:])
	f.Add(h[:])
	f.Add([]byte{0x25, 0x60, 0x95})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		var again [requestHeaderLen]byte
		r.Encode(again[:])
		if string(again[:]) != string(b[:requestHeaderLen]) {
			t.Fatalf("decode/encode not inverse: % x vs % x", again, b[:requestHeaderLen])
		}
		v := validate(r, testSize, defaultMaxRequest, false)
		if v.errno == 0 && r.Type != cmdFlush && r.Type != cmdDisc {
			if end := r.Offset + uint64(r.Length); end < r.Offset || end > testSize {
				t.Fatalf("request past the end accepted: %+v", r)
			}
		}
		if v.errno == 0 && (r.Type == cmdRead || r.Type == cmdWrite) && r.Length > defaultMaxRequest {
			t.Fatalf("oversized request accepted: %+v", r)
		}
	})
}

// guard fails the fuzz run if the server ever hands the backend a range
// outside the export.
type guard struct {
	backend.Backend
	t *testing.T
}

func (g guard) check(off, n int64) {
	if off < 0 || n < 0 || off+n > g.Size() || off+n < off {
		g.t.Fatalf("server passed [%d,+%d) to a %d-byte backend", off, n, g.Size())
	}
}
func (g guard) ReadAt(ctx context.Context, p []byte, off int64) error {
	g.check(off, int64(len(p)))
	return g.Backend.ReadAt(ctx, p, off)
}
func (g guard) WriteAt(ctx context.Context, p []byte, off int64, fl backend.Flags) error {
	g.check(off, int64(len(p)))
	return g.Backend.WriteAt(ctx, p, off, fl)
}
func (g guard) Trim(ctx context.Context, off, n int64, fl backend.Flags) error {
	g.check(off, n)
	return g.Backend.Trim(ctx, off, n, fl)
}
func (g guard) WriteZeroes(ctx context.Context, off, n int64, fl backend.Flags) error {
	g.check(off, n)
	return g.Backend.WriteZeroes(ctx, off, n, fl)
}

func handshakeBytes(opts ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	for _, o := range opts {
		b = append(b, o...)
	}
	return b
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func reqBytes(typ, flags uint16, off uint64, n uint32, payload []byte) []byte {
	var h [requestHeaderLen]byte
	Request{Type: typ, Flags: flags, Handle: 5, Offset: off, Length: n}.Encode(h[:])
	return append(h[:], payload...)
}

// FuzzServerStream feeds arbitrary client bytes (handshake and requests) to
// a real connection: no panic, no hang, no backend access out of range.
func FuzzServerStream(f *testing.F) {
	f.Add(handshakeBytes(optBytes(optGo, goData("m", infoBlockSize)),
		reqBytes(cmdWrite, cmdFlagFUA, 100, 4, []byte("abcd")),
		reqBytes(cmdRead, 0, 0, 16, nil), reqBytes(cmdWriteZeroes, cmdFlagNoHole, 0, 8, nil),
		reqBytes(cmdTrim, 0, 512, 512, nil), reqBytes(cmdFlush, 0, 0, 0, nil), reqBytes(cmdDisc, 0, 0, 0, nil)))
	f.Add(handshakeBytes(optBytes(optList, nil), optBytes(optInfo, goData("m")), optBytes(optExportName, []byte("m")),
		reqBytes(cmdRead, 0, testSize-1, 2, nil)))
	f.Add(handshakeBytes(optBytes(optStructuredReply, nil), optBytes(optAbort, nil)))
	f.Fuzz(func(t *testing.T, in []byte) {
		s, err := NewServer(Options{Workers: 2, MaxRequest: 1 << 16, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			HandshakeTimeout: 2 * time.Second}, Export{Name: "m", Backend: guard{backend.NewMem(testSize), t}})
		if err != nil {
			t.Fatal(err)
		}
		cli, sc := net.Pipe()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done := make(chan struct{})
		go func() { s.ServeConn(ctx, sc); close(done) }()
		go io.Copy(io.Discard, cli)
		cli.SetWriteDeadline(time.Now().Add(3 * time.Second))
		cli.Write(in)
		cli.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not finish the connection")
		}
	})
}
