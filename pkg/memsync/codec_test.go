package memsync_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/cespare/xxhash/v2"
	"github.com/ftctl/ftctl/pkg/memsync"
)

var codecs = []memsync.Codec{memsync.CodecRaw, memsync.CodecXORRLE, memsync.CodecXORZstd, memsync.CodecXORLZ4, memsync.CodecXORRLELZ4, memsync.CodecXORRLEZstd}

// memPages is a plain in-memory Pages.
type memPages []byte

func (m memPages) NumPages() int { return len(m) / memsync.PageSize }
func (m memPages) Page(i int) []byte {
	return m[i*memsync.PageSize : (i+1)*memsync.PageSize : (i+1)*memsync.PageSize]
}

// roundTrip encodes cur relative to old with codec c and decodes it on a
// replica holding old; it returns the replica and the stats.
func roundTrip(t *testing.T, c memsync.Codec, workers int, old, cur []byte, pages []int) ([]byte, memsync.Stats) {
	t.Helper()
	n := len(old) / memsync.PageSize
	base := memsync.NewBase(n)
	for i := range n {
		copy(base.Page(i), old[i*memsync.PageSize:])
	}
	replica := bytes.Clone(old)
	enc, err := memsync.NewEncoder(c, workers)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := memsync.NewCapturer(memPages(cur), workers).CapturePages(context.Background(), 7, pages)
	if err != nil {
		t.Fatal(err)
	}
	frame, st, err := enc.Encode(nil, snap, base)
	if err != nil {
		t.Fatalf("%s: Encode: %v", c, err)
	}
	dec, err := memsync.NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	rp := memPages(replica)
	seen := map[int]bool{}
	epoch, err := dec.Decode(frame, n, func(p int) ([]byte, error) { return rp.Page(p), nil },
		func(p int, data []byte) error {
			if seen[p] {
				t.Errorf("page %d decoded twice", p)
			}
			seen[p] = true
			copy(rp.Page(p), data)
			return nil
		})
	if err != nil {
		t.Fatalf("%s: Decode: %v", c, err)
	}
	if epoch != 7 {
		t.Errorf("%s: epoch %d, want 7", c, epoch)
	}
	// The base must now equal the new content for the captured pages.
	for _, p := range pages {
		if !bytes.Equal(base.Page(p), memPages(cur).Page(p)) {
			t.Fatalf("%s: base page %d not updated", c, p)
		}
	}
	if st.Pages != len(pages) || st.Unchanged+st.Zero+st.Raw+st.Delta != st.Pages || st.OutBytes != len(frame) {
		t.Errorf("%s: inconsistent stats %+v for %d pages, frame %d bytes", c, st, len(pages), len(frame))
	}
	return replica, st
}

func allPages(n int) []int {
	p := make([]int, n)
	for i := range p {
		p[i] = i
	}
	return p
}

func TestEncodeRoundTripMixes(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, mix := range mixes {
		old, cur := genMix(rng, mix, 300)
		for _, c := range codecs {
			for _, workers := range []int{1, 3} {
				got, st := roundTrip(t, c, workers, old, cur, allPages(300))
				if !bytes.Equal(got, cur) {
					t.Fatalf("%s/%s/%d workers: replica differs from source", mix, c, workers)
				}
				t.Logf("%-6s %-8s w%d: ratio %.3f %+v", mix, c, workers, st.Ratio(), st)
				switch mix {
				case "zero":
					if st.Zero != 300 {
						t.Errorf("%s/%s: %d zero flags, want 300", mix, c, st.Zero)
					}
				case "random":
					if st.Raw != 300 {
						t.Errorf("%s/%s: %d raw pages, want 300 (random is incompressible)", mix, c, st.Raw)
					}
				case "sparse":
					if c != memsync.CodecRaw && st.Ratio() > 0.1 {
						t.Errorf("%s/%s: ratio %.3f, want < 0.1 for sparse changes", mix, c, st.Ratio())
					}
				}
			}
		}
	}
}

// TestEncodeSubsetAndUnchanged checks that only the captured pages travel,
// that unchanged pages are left out, and that pages not in the snapshot
// stay as they were on the replica.
func TestEncodeSubsetAndUnchanged(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	old, cur := genMix(rng, "mixed", 64)
	copy(cur[10*memsync.PageSize:11*memsync.PageSize], old[10*memsync.PageSize:]) // page 10 unchanged
	pages := []int{0, 5, 10, 63}
	for _, c := range codecs {
		got, st := roundTrip(t, c, 1, old, cur, pages)
		if st.Unchanged != 1 {
			t.Errorf("%s: %d unchanged, want 1", c, st.Unchanged)
		}
		for i := range 64 {
			want := old
			for _, p := range pages {
				if p == i {
					want = cur
				}
			}
			if !bytes.Equal(memPages(got).Page(i), memPages(want).Page(i)) {
				t.Errorf("%s: page %d wrong on the replica", c, i)
			}
		}
	}
}

func TestEncodeRejectsBadSnapshot(t *testing.T) {
	enc, err := memsync.NewEncoder(memsync.DefaultCodec, 1)
	if err != nil {
		t.Fatal(err)
	}
	base := memsync.NewBase(4)
	bad := []*memsync.Snapshot{
		{Pages: []int{1, 1}, Data: make([]byte, 2*memsync.PageSize)},
		{Pages: []int{4}, Data: make([]byte, memsync.PageSize)},
		{Pages: []int{0}, Data: make([]byte, 10)},
	}
	for i, s := range bad {
		if _, _, err := enc.Encode(nil, s, base); !errors.Is(err, memsync.ErrBadInput) {
			t.Errorf("bad snapshot %d: got %v, want ErrBadInput", i, err)
		}
	}
	if _, err := memsync.NewEncoder(99, 1); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("codec 99: %v", err)
	}
	if _, err := memsync.ParseCodec("gzip"); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("ParseCodec(gzip): %v", err)
	}
	for _, c := range codecs {
		if got, err := memsync.ParseCodec(c.String()); err != nil || got != c {
			t.Errorf("ParseCodec(%s) = %v, %v", c, got, err)
		}
	}
}

// validFrames returns frames of every codec for the fuzz corpus and the
// corruption test.
func validFrames(t testing.TB) [][]byte {
	rng := rand.New(rand.NewPCG(7, 8))
	old, cur := genMix(rng, "mixed", 8)
	var out [][]byte
	for _, c := range codecs {
		base := memsync.NewBase(8)
		for i := range 8 {
			copy(base.Page(i), old[i*memsync.PageSize:])
		}
		enc, err := memsync.NewEncoder(c, 1)
		if err != nil {
			t.Fatal(err)
		}
		snap, err := memsync.NewCapturer(memPages(cur), 1).CapturePages(context.Background(), 3, allPages(8))
		if err != nil {
			t.Fatal(err)
		}
		f, _, err := enc.Encode(nil, snap, base)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, f)
	}
	return out
}

// TestDecodeRejectsCorruption flips bytes and truncates valid frames: every
// variant must be refused before anything is emitted.
func TestDecodeRejectsCorruption(t *testing.T) {
	dec, err := memsync.NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	old := make([]byte, memsync.PageSize)
	for _, f := range validFrames(t) {
		variants := [][]byte{f[:len(f)-1], f[:len(f)/2], f[:5], nil}
		for _, i := range []int{0, 4, 6, len(f) / 3, len(f) - 9, len(f) - 1} {
			g := bytes.Clone(f)
			g[i] ^= 0x40
			variants = append(variants, g)
		}
		for vi, g := range variants {
			emitted := 0
			_, err := dec.Decode(g, 8, func(int) ([]byte, error) { return old, nil },
				func(int, []byte) error { emitted++; return nil })
			if !errors.Is(err, memsync.ErrCorrupt) {
				t.Errorf("variant %d: got %v, want ErrCorrupt", vi, err)
			}
			if emitted != 0 {
				t.Errorf("variant %d: %d pages emitted from a corrupt frame", vi, emitted)
			}
		}
	}
}

// withSum appends a valid checksum, so fuzzing reaches the record parser
// instead of stopping at the checksum.
func withSum(body []byte) []byte {
	return binary.LittleEndian.AppendUint64(bytes.Clone(body), xxhash.Sum64(body))
}

func TestDecodeRejectsBadRecords(t *testing.T) {
	dec, err := memsync.NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	hdr := []byte("FTMP\x01\x02\x05")
	cases := map[string][]byte{
		"bad version":        withSum([]byte("FTMP\x09\x02\x05\x00\x00")),
		"page out range":     withSum(append(bytes.Clone(hdr), 8, 0)),
		"gap overflow":       withSum(append(bytes.Clone(hdr), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0)),
		"missing kind":       withSum(append(bytes.Clone(hdr), 0)),
		"unknown kind":       withSum(append(bytes.Clone(hdr), 0, 9)),
		"short raw":          withSum(append(bytes.Clone(hdr), 0, 1, 1, 2, 3)),
		"long payload":       withSum(append(bytes.Clone(hdr), 0, 2, 50, 1)),
		"rle overflow":       withSum(append(bytes.Clone(hdr), 0, 2, 4, 0x80, 0x20, 1, 1)),
		"rle literal":        withSum(append(bytes.Clone(hdr), 0, 2, 3, 0, 5, 1)),
		"zstd garbage":       withSum(append(bytes.Clone(hdr), 0, 3, 3, 1, 2, 3)),
		"lz4 short":          withSum(append(bytes.Clone(hdr), 0, 4, 2, 0x10, 'a')),
		"second page beyond": withSum(append(bytes.Clone(hdr), 7, 0, 0)), // page 7 then page 8: beyond
	}
	old := make([]byte, memsync.PageSize)
	for name, f := range cases {
		_, err := dec.Decode(f, 8, func(int) ([]byte, error) { return old, nil },
			func(int, []byte) error { return nil })
		if !errors.Is(err, memsync.ErrCorrupt) {
			t.Errorf("%s: got %v, want ErrCorrupt", name, err)
		}
	}
}

// FuzzDecodeFrame feeds arbitrary record bytes (with a valid checksum) to
// the decoder: it must return or fail, never panic, and every emitted page
// must be a whole page within range.
func FuzzDecodeFrame(f *testing.F) {
	for _, fr := range validFrames(f) {
		f.Add(fr[:len(fr)-8])
	}
	f.Add([]byte("FTMP\x01\x02\x00"))
	dec, err := memsync.NewDecoder()
	if err != nil {
		f.Fatal(err)
	}
	old := bytes.Repeat([]byte{0x5a}, memsync.PageSize)
	f.Fuzz(func(t *testing.T, body []byte) {
		last := -1
		_, _ = dec.Decode(withSum(body), 8, func(int) ([]byte, error) { return old, nil },
			func(p int, data []byte) error {
				if p < 0 || p >= 8 || p <= last || len(data) != memsync.PageSize {
					t.Fatalf("emitted page %d (after %d) with %d bytes", p, last, len(data))
				}
				last = p
				return nil
			})
		if !bytes.Equal(old, bytes.Repeat([]byte{0x5a}, memsync.PageSize)) {
			t.Fatalf("decoder wrote into the previous version")
		}
	})
}

// FuzzDecodePage decodes arbitrary payloads into a page surrounded by guard
// bytes: nothing outside the page may change, whatever the input.
func FuzzDecodePage(f *testing.F) {
	for _, k := range []byte{0, 1, 2, 3, 4, 5, 6} {
		f.Add(k, []byte{})
		f.Add(k, []byte{0, 5, 1, 2, 3, 4, 5})
	}
	f.Add(byte(1), make([]byte, memsync.PageSize))
	f.Add(byte(4), []byte{0x1f, 'a', 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x04, 'b'})
	dec, err := memsync.NewDecoder()
	if err != nil {
		f.Fatal(err)
	}
	const guard = 64
	old := bytes.Repeat([]byte{0x33}, memsync.PageSize)
	f.Fuzz(func(t *testing.T, kind byte, payload []byte) {
		buf := bytes.Repeat([]byte{0xa5}, memsync.PageSize+2*guard)
		_ = dec.DecodePage(buf[guard:guard+memsync.PageSize], kind, payload, old)
		for i := range guard {
			if buf[i] != 0xa5 || buf[guard+memsync.PageSize+i] != 0xa5 {
				t.Fatalf("kind %d: decoder wrote outside the page", kind)
			}
		}
	})
}

// FuzzRoundTrip encodes arbitrary page pairs with every codec and checks
// the decoder restores them exactly.
func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte("old page"), []byte("new page"))
	f.Add([]byte{}, []byte{1, 0, 0, 0, 0, 2})
	f.Fuzz(func(t *testing.T, a, b []byte) {
		old := make([]byte, 2*memsync.PageSize)
		cur := make([]byte, 2*memsync.PageSize)
		copy(old, a)
		copy(cur, b)
		copy(cur[memsync.PageSize:], a) // second page: old content moved
		for _, c := range codecs {
			got, _ := roundTrip(t, c, 1, old, cur, []int{0, 1})
			if !bytes.Equal(got, cur) {
				t.Fatalf("%s: round trip differs", c)
			}
		}
	})
}

// TestEncodeParallelSkips splits snapshots with unchanged pages (left out
// of the frame) across several encoder goroutines: the page gaps must still
// chain across the parts.
func TestEncodeParallelSkips(t *testing.T) {
	const n = 1200
	rng := rand.New(rand.NewPCG(15, 16))
	old, cur := genMix(rng, "sparse", n)
	for i := range n {
		// Unchanged runs of various lengths, also at the part boundaries.
		if (i/37)%2 == 0 || rng.IntN(4) == 0 {
			copy(cur[i*memsync.PageSize:(i+1)*memsync.PageSize], old[i*memsync.PageSize:])
		}
	}
	for _, workers := range []int{2, 3, 7} {
		for _, c := range []memsync.Codec{memsync.CodecRaw, memsync.DefaultCodec} {
			got, st := roundTrip(t, c, workers, old, cur, allPages(n))
			if !bytes.Equal(got, cur) {
				t.Fatalf("%s with %d workers: replica differs", c, workers)
			}
			if st.Unchanged == 0 || st.Unchanged == n {
				t.Fatalf("fixture should mix changed and unchanged pages: %+v", st)
			}
		}
	}
}
