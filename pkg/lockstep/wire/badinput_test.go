package wire

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"
)

// rawFrame encodes a frame with any header fields, valid CRC, so tests can
// build what AppendFrame refuses to.
func rawFrame(version, typ, flags byte, epoch uint64, length uint32, payload []byte) []byte {
	var h [HeaderLen]byte
	binary.BigEndian.PutUint32(h[0:], magic)
	h[4], h[5], h[6] = version, typ, flags
	binary.BigEndian.PutUint64(h[8:], epoch)
	binary.BigEndian.PutUint32(h[16:], length)
	b := append(h[:], payload...)
	return binary.BigEndian.AppendUint32(b, crc32.Update(crc32.Update(0, castagnoli, h[:]), castagnoli, payload))
}

func frameBytes(t testing.TB, fs ...Frame) []byte {
	t.Helper()
	var b []byte
	for _, f := range fs {
		var err error
		if b, err = AppendFrame(b, f); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// streamOf is a Conn reading the given bytes, as if a peer had sent them.
func streamOf(b []byte) *streamConn {
	c := newStreamConn(struct {
		io.Reader
		io.Writer
	}{bytes.NewReader(b), io.Discard}, nil)
	c.establish()
	return c
}

func wantErr(t *testing.T, err, sentinel error, msg string) {
	t.Helper()
	if !errors.Is(err, sentinel) {
		t.Fatalf("got %v, want %v", err, sentinel)
	}
	if !strings.Contains(err.Error(), msg) {
		t.Fatalf("error %q does not say %q", err, msg)
	}
}

func TestDecoderRefuses(t *testing.T) {
	good := frameBytes(t, Frame{Type: TypeMemory, Epoch: 3, Payload: []byte("some pages")})
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 0x40
		return b
	}
	for _, tc := range []struct {
		name     string
		stream   []byte
		sentinel error
		msg      string
	}{
		{"CorruptPayload", flip(HeaderLen + 2), ErrCorrupt, "CRC32C mismatch on a memory frame of epoch 3"},
		{"CorruptEpoch", flip(15), ErrCorrupt, "CRC32C mismatch"},
		{"CorruptCRC", flip(len(good) - 1), ErrCorrupt, "CRC32C mismatch"},
		{"BadMagic", flip(1), ErrCorrupt, "bad magic"},
		{"Oversized", rawFrame(Version, byte(TypeMemory), 0, 3, MaxPayload+1, nil), ErrCorrupt,
			"claims a 67108865-byte payload, above the 67108864-byte limit"},
		{"TruncatedHeader", good[:7], ErrCorrupt, "inside a frame header (7 of 20 bytes)"},
		{"TruncatedPayload", good[:HeaderLen+4], ErrCorrupt, "inside the payload of a memory frame of epoch 3 (4 of 10 bytes)"},
		{"TruncatedCRC", good[:len(good)-2], ErrCorrupt, "inside the CRC"},
		{"UnknownType", rawFrame(Version, 99, 0, 0, 0, nil), ErrCorrupt, "unknown frame type 99"},
		{"TypeZero", rawFrame(Version, 0, 0, 0, 0, nil), ErrCorrupt, "unknown frame type 0"},
		{"UnknownFlags", rawFrame(Version, byte(TypeAck), 0x80, 0, 0, nil), ErrCorrupt, "unknown flags"},
		{"OtherVersion", rawFrame(Version+1, byte(TypeAck), 0, 0, 0, nil), ErrVersion, "protocol version 2"},
		{"HelloAfterHandshake", frameBytes(t, Frame{Type: TypeHello, Payload: encodeHello(1, 1)}), ErrCorrupt, "unexpected hello"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := streamOf(append(bytes.Clone(good), tc.stream...))
			f, err := c.Recv(context.Background())
			if err != nil || !bytes.Equal(f.Payload, []byte("some pages")) {
				t.Fatalf("the good frame before the bad one: %v", err)
			}
			_, err = c.Recv(context.Background())
			wantErr(t, err, tc.sentinel, tc.msg)
			if errors.Is(err, ErrCorrupt) && strings.Contains(tc.name, "Truncated") && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("truncation error does not wrap io.ErrUnexpectedEOF: %v", err)
			}
			// The stream is unusable after a bad frame.
			if _, err := c.Recv(context.Background()); err == nil {
				t.Fatal("Recv after a bad frame succeeded")
			}
		})
	}
	t.Run("CleanEOF", func(t *testing.T) {
		c := streamOf(good)
		if _, err := c.Recv(context.Background()); err != nil {
			t.Fatal(err)
		}
		_, err := c.Recv(context.Background())
		wantErr(t, err, ErrClosed, "peer closed")
	})
}

// allocated runs fn and returns the bytes it allocated.
func allocated(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestDecoderDoesNotTrustLengths: a claimed length costs memory only once
// its bytes arrive, and a length over the bound costs none.
func TestDecoderDoesNotTrustLengths(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stream []byte
		limit  uint64
	}{
		{"OverBound", rawFrame(Version, byte(TypeMemory), 0, 1, 0xffffffff, nil), 64 << 10},
		{"TruncatedHuge", append(rawFrame(Version, byte(TypeMemory), 0, 1, 60<<20, nil)[:HeaderLen], make([]byte, 100)...), 4 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			n := allocated(func() {
				_, err = NewDecoder(bytes.NewReader(tc.stream), 0).ReadFrame()
			})
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("got %v, want ErrCorrupt", err)
			}
			t.Logf("allocated %d bytes: %v", n, err)
			if n > tc.limit {
				t.Fatalf("allocated %d bytes for a refused frame, more than %d", n, tc.limit)
			}
		})
	}
}

// slowReader returns at most one byte per Read and a deadline error every
// other call, as a socket whose ctx keeps expiring would.
type slowReader struct {
	b    []byte
	tick bool
}

func (r *slowReader) Read(p []byte) (int, error) {
	r.tick = !r.tick
	if r.tick {
		return 0, errTimeout
	}
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	p[0], r.b = r.b[0], r.b[1:]
	return 1, nil
}

var errTimeout = errors.New("timeout")

func TestDecoderResumes(t *testing.T) {
	want := []Frame{
		{Type: TypeMemory, Epoch: 1, Payload: bytes.Repeat([]byte("ab"), 50)},
		{Type: TypeEnd, Epoch: 1, Payload: []byte{}},
		{Type: TypeAck, Epoch: 1, Payload: []byte("x")},
	}
	d := NewDecoder(&slowReader{b: frameBytes(t, want...)}, 0)
	var got []Frame
	timeouts := 0
	for {
		f, err := d.ReadFrame()
		if errors.Is(err, errTimeout) {
			timeouts++
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d frames: %v", len(got), err)
		}
		got = append(got, f)
	}
	if len(got) != len(want) {
		t.Fatalf("got %d frames, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].Type != want[i].Type || got[i].Epoch != want[i].Epoch || !bytes.Equal(got[i].Payload, want[i].Payload) {
			t.Fatalf("frame %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
	if timeouts < 100 {
		t.Fatalf("only %d interruptions: the test did not exercise resuming", timeouts)
	}
}

// helloPair runs the real hello on one end of an in-memory stream and lets
// the test play the peer on the other.
func helloPair(t *testing.T, server bool) (errc chan error, peer *streamConn) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	me := newStreamConn(a, a)
	peer = newStreamConn(b, b)
	errc = make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		errc <- hello(ctx, me, server)
	}()
	return errc, peer
}

func TestHelloVersion(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name     string
		payload  []byte
		sentinel error
		msg      string
	}{
		{"Newer", encodeHello(2, 3), ErrVersion, "the peer speaks versions 2..3, this agent 1..1"},
		{"Older", encodeHello(0, 0), ErrVersion, "versions 0..0"},
		{"Short", []byte{0, 1, 0, 1}, ErrCorrupt, "hello payload of 4 bytes"},
		{"EmptyRange", encodeHello(3, 1), ErrCorrupt, "empty range"},
	} {
		t.Run("server/"+tc.name, func(t *testing.T) {
			errc, peer := helloPair(t, true)
			f, err := peer.Recv(ctx)
			if err != nil || f.Type != TypeHello {
				t.Fatalf("server's hello: %v %v", f.Type, err)
			}
			if v, err := agreeVersion(f.Payload); err != nil || v != Version {
				t.Fatalf("server offers %v: %v", f.Payload, err)
			}
			if err := peer.Send(ctx, Frame{Type: TypeHello, Payload: tc.payload}); err != nil {
				t.Fatal(err)
			}
			wantErr(t, <-errc, tc.sentinel, tc.msg)
		})
		t.Run("client/"+tc.name, func(t *testing.T) {
			errc, peer := helloPair(t, false)
			if err := peer.Send(ctx, Frame{Type: TypeHello, Payload: tc.payload}); err != nil {
				t.Fatal(err)
			}
			// The client answers with its own range even when it
			// cannot agree, so the server can report the mismatch.
			f, err := peer.Recv(ctx)
			if err != nil || f.Type != TypeHello {
				t.Fatalf("client's hello: %v %v", f.Type, err)
			}
			wantErr(t, <-errc, tc.sentinel, tc.msg)
		})
	}
	t.Run("NotAHello", func(t *testing.T) {
		errc, peer := helloPair(t, false)
		if err := peer.Send(ctx, Frame{Type: TypeMemory, Epoch: 1, Payload: []byte("state")}); err != nil {
			t.Fatal(err)
		}
		wantErr(t, <-errc, ErrCorrupt, "expected a hello frame during the handshake, got memory")
	})
	t.Run("HugeFrameBeforeAuth", func(t *testing.T) {
		errc, peer := helloPair(t, false)
		go peer.rw.Write(rawFrame(Version, byte(TypeHello), 0, 0, 1<<20, nil))
		wantErr(t, <-errc, ErrCorrupt, "above the 4096-byte limit")
	})
}

// epochStream builds the bytes of one epoch as EpochSender would.
func epochStream(t testing.TB, n uint64, payloads ...string) []byte {
	t.Helper()
	d := newEpochDigest()
	var fs []Frame
	for i, p := range payloads {
		f := Frame{Type: []Type{TypeMemory, TypeDevState, TypeManifest}[i%3], Epoch: n, Payload: []byte(p)}
		d.add(f)
		fs = append(fs, f)
	}
	fs = append(fs, Frame{Type: TypeEnd, Epoch: n, Payload: d.end()})
	return frameBytes(t, fs...)
}

// endWith rewrites the END of an epoch stream built by epochStream.
func endWith(t testing.TB, n uint64, payloads []string, edit func(end []byte)) []byte {
	b := epochStream(t, n, payloads...)
	endAt := len(b) - (HeaderLen + endLen + TrailerLen)
	end := bytes.Clone(b[endAt+HeaderLen : endAt+HeaderLen+endLen])
	edit(end)
	return append(b[:endAt], frameBytes(t, Frame{Type: TypeEnd, Epoch: n, Payload: end})...)
}

func TestEpochReceiverRefuses(t *testing.T) {
	p := []string{"pages", "devstate", "blocks", "more pages"}
	ok5 := epochStream(t, 5, p...)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	// Same frames, one byte differs: every CRC is right, only the digest
	// can tell.
	swapped := cat(frameBytes(t,
		Frame{Type: TypeMemory, Epoch: 6, Payload: []byte("pages")},
		Frame{Type: TypeDevState, Epoch: 6, Payload: []byte("devstatf")},
		Frame{Type: TypeManifest, Epoch: 6, Payload: []byte("blocks")},
		Frame{Type: TypeMemory, Epoch: 6, Payload: []byte("more pages")}),
		endOf(epochStream(t, 6, p...)))
	mixed := cat(frameBytes(t, Frame{Type: TypeMemory, Epoch: 6, Payload: []byte("x")},
		Frame{Type: TypeMemory, Epoch: 7, Payload: []byte("y")}))
	for _, tc := range []struct {
		name     string
		resume   int64 // -1: none
		stream   []byte
		sentinel error
		msg      string
	}{
		{"DigestMismatch", -1, cat(ok5, swapped), ErrTornEpoch, "digest of epoch 6 does not match its END"},
		{"WrongCount", -1, cat(ok5, endWith(t, 6, p, func(e []byte) { e[8]++ })), ErrTornEpoch, "END of epoch 6 counts 5 frames, 4 arrived"},
		{"WrongBytes", -1, cat(ok5, endWith(t, 6, p, func(e []byte) { e[16]-- })), ErrTornEpoch, "payload bytes"},
		{"MissingFrame", -1, cat(ok5, frameBytes(t, Frame{Type: TypeMemory, Epoch: 6, Payload: []byte("pages")}), endOf(epochStream(t, 6, p...))),
			ErrTornEpoch, "counts 4 frames, 1 arrived"},
		{"NextEpochBeforeEnd", -1, cat(ok5, mixed), ErrTornEpoch, "memory frame of epoch 7 before the END of epoch 6"},
		{"Replay", -1, cat(ok5, ok5), ErrTornEpoch, "epoch 5 is already complete"},
		{"OldEpoch", -1, cat(ok5, epochStream(t, 2, "old")), ErrTornEpoch, "epoch 2, but epoch 5 is already complete"},
		{"Jump", -1, cat(ok5, epochStream(t, 7, "x")), ErrTornEpoch, "epoch jumps from 5 to 7"},
		{"ReplayAfterResume", 5, ok5, ErrTornEpoch, "already complete"},
		{"JumpAfterResume", 3, ok5, ErrTornEpoch, "epoch jumps from 3 to 5"},
		{"ShortEnd", -1, frameBytes(t, Frame{Type: TypeEnd, Epoch: 5, Payload: []byte{1, 2}}), ErrCorrupt, "END of epoch 5 has a 2-byte payload"},
		{"UnknownDigest", -1, endWith(t, 5, p, func(e []byte) { e[0] = 9 }), ErrCorrupt, "unknown digest algorithm 9"},
		{"TruncatedEpoch", -1, cat(ok5, epochStream(t, 6, p...)[:40]), ErrCorrupt, "stream ended inside"},
		{"EndlessEpoch", -1, cat(ok5, frameBytes(t,
			Frame{Type: TypeMemory, Epoch: 6, Payload: make([]byte, 600)},
			Frame{Type: TypeMemory, Epoch: 6, Payload: make([]byte, 600)})), ErrTornEpoch, "epoch 6 exceeds 1000 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewEpochReceiver(streamOf(tc.stream))
			r.MaxEpochBytes = 1000
			if tc.resume >= 0 {
				r.ResumeAfter(uint64(tc.resume))
			}
			var got []uint64
			var err error
			for {
				var ep *Epoch
				ep, _, err = r.Next(context.Background())
				if err != nil {
					break
				}
				got = append(got, ep.N)
			}
			wantErr(t, err, tc.sentinel, tc.msg)
			// Only the good epoch 5 in front of the bad part comes out.
			wantGood := bytes.HasPrefix(tc.stream, ok5) && tc.resume < 0
			if wantGood && (len(got) != 1 || got[0] != 5) || !wantGood && len(got) != 0 {
				t.Fatalf("epochs returned: %v (want only the good epoch 5 in front of the bad part)", got)
			}
			if last, ok := r.Last(); wantGood && (!ok || last != 5) {
				t.Fatalf("Last() = %d %v after a torn epoch, want 5", last, ok)
			}
			if _, _, again := r.Next(context.Background()); !errors.Is(again, tc.sentinel) {
				t.Fatalf("Next after a torn epoch returned %v, want the same failure", again)
			}
		})
	}
}

func endOf(b []byte) []byte { return b[len(b)-(HeaderLen+endLen+TrailerLen):] }

func TestEpochReceiverOutOfBand(t *testing.T) {
	e := epochStream(t, 9, "a", "b")
	hb := frameBytes(t, Frame{Type: TypeHeartbeat, Epoch: 1}, Frame{Type: TypeControl, Payload: []byte("switchover")})
	// Out-of-band frames inside an epoch, after its first frame.
	first := HeaderLen + 1 + TrailerLen
	stream := bytes.Join([][]byte{e[:first], hb, e[first:]}, nil)
	r := NewEpochReceiver(streamOf(stream))
	var kinds []string
	for {
		ep, oob, err := r.Next(context.Background())
		if errors.Is(err, ErrClosed) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if oob != nil {
			kinds = append(kinds, oob.Type.String())
			continue
		}
		kinds = append(kinds, "epoch")
		if ep.N != 9 || len(ep.Frames) != 2 || string(ep.Frames[0].Payload) != "a" || string(ep.Frames[1].Payload) != "b" {
			t.Fatalf("epoch %+v", ep)
		}
	}
	if strings.Join(kinds, ",") != "heartbeat,control,epoch" {
		t.Fatalf("got %v", kinds)
	}
}

func TestEpochSenderMisuse(t *testing.T) {
	a, b := Pipe(8)
	defer a.Close()
	ctx := context.Background()
	s := NewEpochSender(a)
	wantErr(t, s.Send(ctx, TypeMemory, nil), ErrInvalid, "no epoch is open")
	wantErr(t, s.End(ctx), ErrInvalid, "no epoch is open")
	if err := s.Begin(10); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.Begin(11), ErrInvalid, "epoch 10 has not been ended")
	wantErr(t, s.Send(ctx, TypeEnd, nil), ErrInvalid, "not an epoch content type")
	wantErr(t, s.Send(ctx, TypeAck, nil), ErrInvalid, "not an epoch content type")
	if err := s.End(ctx); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.Begin(10), ErrInvalid, "epochs must be consecutive and the last was 10")
	wantErr(t, s.Begin(12), ErrInvalid, "epochs must be consecutive")
	if err := s.Begin(11); err != nil {
		t.Fatal(err)
	}
	b.Close()
	wantErr(t, s.Send(ctx, TypeMemory, []byte("x")), ErrClosed, "epoch 11 torn")
	wantErr(t, s.Begin(12), ErrClosed, "epoch 11 torn")
	wantErr(t, s.End(ctx), ErrClosed, "epoch 11 torn")
}
