package eventlog

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
)

func sample() Record {
	r := Record{Kind: KindWrite, Seq: 7, Epoch: 3, Offset: 4096, Length: 5, Data: []byte("hello")}
	r.Seal()
	return r
}

func TestRecordRoundTrip(t *testing.T) {
	recs := []Record{sample(),
		{Kind: KindTrim, Seq: 8, Epoch: 3, Offset: 0, Length: 1 << 40},
		{Kind: KindZero, Flags: FlagNoHole, Seq: 9, Epoch: 3, Offset: 512, Length: 512},
		{Kind: KindEpochEnd, Seq: 9, Epoch: 3, Length: 3},
	}
	var buf bytes.Buffer
	var flat []byte
	for i := range recs {
		recs[i].Seal()
		if err := WriteRecord(&buf, &recs[i]); err != nil {
			t.Fatal(err)
		}
		flat = recs[i].AppendBinary(flat)
	}
	if !bytes.Equal(buf.Bytes(), flat) {
		t.Fatal("WriteRecord and AppendBinary disagree")
	}
	for i := range recs {
		got, err := ReadRecord(&buf)
		if err != nil {
			t.Fatal(err)
		}
		d, n, err := Decode(flat)
		if err != nil {
			t.Fatal(err)
		}
		flat = flat[n:]
		for _, g := range []Record{got, d} {
			if g.Kind != recs[i].Kind || g.Seq != recs[i].Seq || g.Length != recs[i].Length ||
				g.Flags != recs[i].Flags || !bytes.Equal(g.Data, recs[i].Data) || g.Sum != recs[i].Sum {
				t.Errorf("record %d: got %+v want %+v", i, g, recs[i])
			}
		}
	}
	if _, err := ReadRecord(&buf); !errors.Is(err, io.EOF) {
		t.Errorf("end of stream: %v", err)
	}
}

// Every single-bit flip anywhere in an encoded record is detected.
func TestRecordDetectsEveryBitFlip(t *testing.T) {
	r := sample()
	enc := r.AppendBinary(nil)
	for i := range enc {
		for bit := range 8 {
			b := bytes.Clone(enc)
			b[i] ^= 1 << bit
			if _, _, err := Decode(b); err == nil {
				t.Fatalf("flip of bit %d in byte %d not detected", bit, i)
			}
		}
	}
	if _, err := ReadRecord(bytes.NewReader(enc[:len(enc)-1])); !errors.Is(err, ErrCorrupt) {
		t.Errorf("truncated record: %v", err)
	}
	bad := Record{Kind: KindTrim, Length: 4, Data: []byte("x")}
	bad.Seal()
	if err := bad.Verify(); !errors.Is(err, ErrCorrupt) {
		t.Errorf("trim with data accepted: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	r := sample()
	f.Add(r.AppendBinary(nil))
	e := Record{Kind: KindEpochEnd, Epoch: 1}
	e.Seal()
	f.Add(e.AppendBinary(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, n, err := Decode(b)
		if err != nil {
			return
		}
		if n > len(b) || n != rec.EncodedLen() {
			t.Fatalf("used %d of %d bytes, record is %d", n, len(b), rec.EncodedLen())
		}
		if !bytes.Equal(rec.AppendBinary(nil), b[:n]) {
			t.Fatal("re-encoding differs")
		}
		if _, err := ReadRecord(bytes.NewReader(b)); err != nil {
			t.Fatalf("Decode accepted, ReadRecord refused: %v", err)
		}
	})
}

func TestPipeBackPressure(t *testing.T) {
	p := NewPipe(2 * int64(sample().EncodedLen()))
	ctx := context.Background()
	for range 2 {
		if err := p.Send(ctx, sample()); err != nil {
			t.Fatal(err)
		}
	}
	sent := make(chan error, 1)
	go func() { sent <- p.Send(ctx, sample()) }()
	select {
	case err := <-sent:
		t.Fatalf("third send did not wait for a full pipe: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if _, err := p.Recv(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := p.Send(short, sample()); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("send on a full pipe with an expiring context: %v", err)
	}
	p.Close()
	for range 2 {
		if _, err := p.Recv(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Recv(ctx); !errors.Is(err, io.EOF) {
		t.Errorf("drained closed pipe: %v", err)
	}
	if err := p.Send(ctx, sample()); !errors.Is(err, ErrClosed) {
		t.Errorf("send after close: %v", err)
	}
	// One record larger than the whole pipe still goes through.
	big := NewPipe(10)
	if err := big.Send(ctx, sample()); err != nil {
		t.Errorf("oversized record into an empty pipe: %v", err)
	}
}

// collect drains a pipe in the background.
func collect(p *Pipe) (func() []Record, *sync.WaitGroup) {
	var mu sync.Mutex
	var got []Record
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			r, err := p.Recv(context.Background())
			if err != nil {
				return
			}
			mu.Lock()
			got = append(got, r)
			mu.Unlock()
		}
	})
	return func() []Record { mu.Lock(); defer mu.Unlock(); return got }, &wg
}

// TestLogOrdersOverlappingWrites: concurrent writers hammer overlapping
// ranges; replaying the stream in sequence order must rebuild the image.
func TestLogOrdersOverlappingWrites(t *testing.T) {
	ctx := context.Background()
	m := backend.NewMem(64 << 10)
	p := NewPipe(1 << 20)
	l := New(m, p, Options{})
	records, wg := collect(p)
	var writers sync.WaitGroup
	for w := range 4 {
		writers.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			for range 300 {
				off := rng.Int64N(60 << 10)
				n := 1 + rng.Int64N(4096)
				var err error
				switch rng.IntN(3) {
				case 0:
					err = l.WriteAt(ctx, bytes.Repeat([]byte{byte(rng.Uint32())}, int(n)), off, 0)
				case 1:
					err = l.Trim(ctx, off, n, 0)
				case 2:
					err = l.WriteZeroes(ctx, off, n, backend.NoHole)
				}
				if err != nil {
					t.Error(err)
				}
			}
		})
	}
	writers.Wait()
	epoch, last, err := l.MarkEpoch(ctx)
	if err != nil || epoch != 1 || last != 1200 {
		t.Fatalf("MarkEpoch = %d, %d, %v; want 1, 1200", epoch, last, err)
	}
	p.Close()
	wg.Wait()
	recs := records()
	ref := backend.NewMem(64 << 10)
	for i, r := range recs[:len(recs)-1] {
		if err := r.Verify(); err != nil {
			t.Fatal(err)
		}
		if r.Seq != uint64(i+1) || r.Epoch != 1 {
			t.Fatalf("record %d has seq %d epoch %d", i, r.Seq, r.Epoch)
		}
		switch r.Kind {
		case KindWrite:
			ref.WriteAt(ctx, r.Data, int64(r.Offset), 0)
		default:
			ref.WriteZeroes(ctx, int64(r.Offset), int64(r.Length), 0)
		}
	}
	end := recs[len(recs)-1]
	if end.Kind != KindEpochEnd || end.Seq != 1200 || end.Length != 1200 {
		t.Fatalf("last record %+v", end)
	}
	if !bytes.Equal(ref.Snapshot(), m.Snapshot()) {
		t.Fatal("replaying the log in sequence order does not rebuild the image")
	}
}

type failSink struct{}

func (failSink) Send(context.Context, Record) error { return errors.New("link down") }

func TestLogSinkFailureKeepsLocalWrites(t *testing.T) {
	ctx := context.Background()
	m := backend.NewMem(4096)
	l := New(m, failSink{}, Options{})
	if err := l.WriteAt(ctx, []byte("abc"), 10, 0); err != nil {
		t.Fatalf("guest write failed because the link did: %v", err)
	}
	if !bytes.Equal(m.Snapshot()[10:13], []byte("abc")) {
		t.Fatal("write did not reach the local image")
	}
	if !errors.Is(l.Err(), ErrBroken) {
		t.Errorf("Err = %v, want ErrBroken", l.Err())
	}
	if _, _, err := l.MarkEpoch(ctx); !errors.Is(err, ErrBroken) {
		t.Errorf("MarkEpoch on a broken log: %v", err)
	}
	if err := l.WriteAt(ctx, []byte("x"), 4095, 0); err != nil {
		t.Fatal(err)
	}
	if err := l.WriteAt(ctx, nil, 4096, 0); err != nil {
		t.Errorf("zero-length write at the end: %v", err)
	}
	if err := l.WriteAt(ctx, []byte("xy"), 4095, 0); !errors.Is(err, backend.ErrOutOfRange) {
		t.Errorf("write past the end: %v", err)
	}
}

// TestLogBackPressureBlocksWriter: with a full pipe, a write completes
// locally but its call returns only once the consumer made room.
func TestLogBackPressureBlocksWriter(t *testing.T) {
	ctx := context.Background()
	p := NewPipe(1)
	l := New(backend.NewMem(4096), p, Options{Epoch: 5, LastSeq: 41})
	if err := l.WriteAt(ctx, []byte("a"), 0, 0); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- l.WriteAt(ctx, []byte("b"), 1, 0) }()
	select {
	case <-done:
		t.Fatal("second write returned while the pipe was full")
	case <-time.After(50 * time.Millisecond):
	}
	zero := make(chan error, 1)
	go func() { zero <- l.Trim(ctx, 0, 0, 0) }()
	select { // an empty trim makes no event, so it must not wait for room
	case err := <-zero:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("empty trim waited on back-pressure")
	}
	r, _ := p.Recv(ctx)
	if r.Seq != 42 || r.Epoch != 5 {
		t.Errorf("first record seq %d epoch %d, want 42 in epoch 5", r.Seq, r.Epoch)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if l.Err() != nil {
		t.Fatal(l.Err())
	}
}
