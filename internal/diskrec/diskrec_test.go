package diskrec

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// memDevice is an in-memory Device that can fail on demand.
type memDevice struct {
	data     []byte
	syncs    int
	failNext error
}

func newMem(slots int) *memDevice { return &memDevice{data: make([]byte, slots*RecordSize)} }

func (m *memDevice) WriteAt(p []byte, off int64) (int, error) {
	if m.failNext != nil {
		err := m.failNext
		m.failNext = nil
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

func (m *memDevice) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(m.data).ReadAt(p, off)
}

func (m *memDevice) Sync() error { m.syncs++; return nil }

func (m *memDevice) clone() *memDevice {
	return &memDevice{data: bytes.Clone(m.data)}
}

func writeN(t *testing.T, w *Writer, n int) uint64 {
	t.Helper()
	var last uint64
	for range n {
		seq, err := w.Write()
		if err != nil {
			t.Fatalf("write: %v", err)
		}
		if seq != last+1 && last != 0 {
			t.Fatalf("write returned seq %d after %d", seq, last)
		}
		last = seq
	}
	return last
}

func mustWriter(t *testing.T, dev Device, size int64) *Writer {
	t.Helper()
	w, err := NewWriter(dev, size)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	buf := make([]byte, RecordSize)
	payload := make([]byte, PayloadSize)
	rand.Read(payload)
	prev := Hash{1, 2, 3}
	sum, err := Encode(buf, 42, 1234567, prev, payload)
	if err != nil {
		t.Fatal(err)
	}
	r, err := Decode(buf)
	if err != nil {
		t.Fatal(err)
	}
	if r.Seq != 42 || r.Time != 1234567 || r.Prev != prev || r.Sum != sum || !bytes.Equal(r.Payload, payload) {
		t.Fatalf("decoded %+v, want seq 42 time 1234567 prev %v sum %v", r, prev, sum)
	}
}

func TestEncodeRejectsBadInput(t *testing.T) {
	payload := make([]byte, PayloadSize)
	for name, f := range map[string]func() error{
		"short buffer":  func() error { _, err := Encode(make([]byte, 100), 1, 0, Hash{}, payload); return err },
		"short payload": func() error { _, err := Encode(make([]byte, RecordSize), 1, 0, Hash{}, payload[:5]); return err },
		"seq zero":      func() error { _, err := Encode(make([]byte, RecordSize), 0, 0, Hash{}, payload); return err },
	} {
		if err := f(); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: err = %v, want ErrCorrupt", name, err)
		}
	}
}

func TestDecodeDetectsDamage(t *testing.T) {
	good := make([]byte, RecordSize)
	payload := make([]byte, PayloadSize)
	if _, err := Encode(good, 7, 0, Hash{9}, payload); err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(make([]byte, RecordSize)); !errors.Is(err, ErrNotRecord) {
		t.Errorf("zero block: err = %v, want ErrNotRecord", err)
	}
	if _, err := Decode(good[:100]); !errors.Is(err, ErrCorrupt) {
		t.Errorf("short block: err = %v, want ErrCorrupt", err)
	}
	// Any flipped bit past the magic must be caught by the checksum.
	for _, pos := range []int{8, 12, 16, 30, 40, 64, 2000, RecordSize - 1} {
		b := bytes.Clone(good)
		b[pos] ^= 0x10
		if _, err := Decode(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("flip at %d: err = %v, want ErrCorrupt", pos, err)
		}
	}
	b := bytes.Clone(good)
	b[0] = 'X'
	if _, err := Decode(b); !errors.Is(err, ErrNotRecord) {
		t.Errorf("bad magic: err = %v, want ErrNotRecord", err)
	}
}

func TestWriterAndVerifyNoWrap(t *testing.T) {
	dev := newMem(16)
	w := mustWriter(t, dev, int64(len(dev.data)))
	last := writeN(t, w, 10)
	if dev.syncs != 10 {
		t.Errorf("syncs = %d, want one per record (10)", dev.syncs)
	}
	rep, err := Verify(dev, int64(len(dev.data)))
	if err != nil {
		t.Fatal(err)
	}
	if rep.LastSeq != last || rep.FirstSeq != 1 || rep.Records != 10 || rep.Wrapped || rep.LastOffset != 9*RecordSize {
		t.Fatalf("report %+v, want seqs 1..%d, 10 records, not wrapped, last at %d", rep, last, 9*RecordSize)
	}
}

func TestVerifyEmptyDevice(t *testing.T) {
	dev := newMem(8)
	rep, err := Verify(dev, int64(len(dev.data)))
	if err != nil {
		t.Fatal(err)
	}
	if rep.LastSeq != 0 || rep.Records != 0 || rep.LastOffset != -1 || rep.Slots != 8 {
		t.Fatalf("report %+v, want empty chain over 8 slots", rep)
	}
}

func TestWriterWrapsAround(t *testing.T) {
	for _, n := range []int{5, 6, 11, 13, 15} {
		dev := newMem(5)
		w := mustWriter(t, dev, int64(len(dev.data)))
		last := writeN(t, w, n)
		rep, err := Verify(dev, int64(len(dev.data)))
		if err != nil {
			t.Fatalf("after %d writes: %v", n, err)
		}
		wantRecords := min(int64(n), 5)
		if rep.LastSeq != last || rep.Records != wantRecords || rep.FirstSeq != last-uint64(wantRecords)+1 || rep.Wrapped != (n > 5) {
			t.Fatalf("after %d writes: report %+v", n, rep)
		}
		if rep.LastOffset != Offset(last, 5) {
			t.Fatalf("after %d writes: last offset %d, want %d", n, rep.LastOffset, Offset(last, 5))
		}
	}
}

func TestResumeContinuesChain(t *testing.T) {
	dev := newMem(6)
	size := int64(len(dev.data))
	writeN(t, mustWriter(t, dev, size), 8)
	rep, err := Verify(dev, size)
	if err != nil {
		t.Fatal(err)
	}
	w := mustWriter(t, dev, size)
	w.Resume(rep.LastSeq, rep.LastSum)
	if w.Next() != 9 {
		t.Fatalf("next = %d, want 9", w.Next())
	}
	writeN(t, w, 3)
	rep, err = Verify(dev, size)
	if err != nil || rep.LastSeq != 11 {
		t.Fatalf("after resume: report %+v err %v, want last seq 11", rep, err)
	}
}

// A replica that kept writes issued after the checkpoint (the failure the
// chain exists to catch): the restored guest rewrites those seqs with new
// payloads, and the stale successors no longer match.
func TestVerifyCatchesStaleWritesAfterRollback(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		slots, ckpt, primary int
		restored             int
		wantLast             uint64
	}{
		{"no wrap", 32, 6, 10, 2, 8},
		{"across wrap", 8, 7, 11, 2, 9},
		{"wrapped before", 8, 12, 15, 1, 13},
	} {
		t.Run(tc.name, func(t *testing.T) {
			primary := newMem(tc.slots)
			size := int64(len(primary.data))
			pw := mustWriter(t, primary, size)
			writeN(t, pw, tc.ckpt)
			checkpoint := primary.clone() // the disk as of the checkpoint
			ckRep, err := Verify(checkpoint, size)
			if err != nil {
				t.Fatal(err)
			}
			writeN(t, pw, tc.primary-tc.ckpt) // speculative writes, lost on failover

			resume := func(dev *memDevice) {
				w := mustWriter(t, dev, size)
				w.Resume(ckRep.LastSeq, ckRep.LastSum)
				writeN(t, w, tc.restored)
			}
			good := checkpoint.clone()
			resume(good)
			if rep, err := Verify(good, size); err != nil || rep.LastSeq != uint64(tc.ckpt+tc.restored) {
				t.Fatalf("correct replica: report %+v err %v", rep, err)
			}

			bad := primary.clone() // replica wrongly kept the speculative writes
			resume(bad)
			rep, err := Verify(bad, size)
			if !errors.Is(err, ErrBrokenChain) {
				t.Fatalf("stale replica: err = %v, want ErrBrokenChain (report %+v)", err, rep)
			}
			if !strings.Contains(err.Error(), "offset") {
				t.Errorf("error %q does not name the offset", err)
			}
			if rep.LastSeq != tc.wantLast {
				t.Errorf("unbroken chain ends at %d, want %d", rep.LastSeq, tc.wantLast)
			}
		})
	}
}

func TestVerifyCorruptAndMisplaced(t *testing.T) {
	dev := newMem(16)
	size := int64(len(dev.data))
	writeN(t, mustWriter(t, dev, size), 10)

	flipped := dev.clone()
	flipped.data[4*RecordSize+100] ^= 1 // seq 5
	rep, err := Verify(flipped, size)
	if !errors.Is(err, ErrCorrupt) || rep.LastSeq != 4 {
		t.Fatalf("flipped: err %v report %+v, want ErrCorrupt after seq 4", err, rep)
	}
	if !strings.Contains(err.Error(), "offset 16384") {
		t.Errorf("error %q does not name offset 16384", err)
	}

	moved := dev.clone()
	copy(moved.data[12*RecordSize:], moved.data[2*RecordSize:3*RecordSize]) // seq 3 into slot 12
	if _, err := Verify(moved, size); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("misplaced: err %v, want ErrCorrupt", err)
	}

	holed := dev.clone()
	clear(holed.data[4*RecordSize : 5*RecordSize]) // seq 5 lost
	rep, err = Verify(holed, size)
	if !errors.Is(err, ErrBrokenChain) || rep.LastSeq != 4 {
		t.Fatalf("hole: err %v report %+v, want ErrBrokenChain after seq 4", err, rep)
	}

	dup := newMem(16)
	copy(dup.data, dev.data)
	copy(dup.data[5*RecordSize:], dev.data[4*RecordSize:5*RecordSize]) // seq 5 twice
	if _, err := Verify(dup, size); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("duplicate: err %v, want ErrCorrupt", err)
	}
}

func TestVerifyWrappedLapDamage(t *testing.T) {
	dev := newMem(6)
	size := int64(len(dev.data))
	writeN(t, mustWriter(t, dev, size), 9) // slots: 7 8 9 4 5 6
	holed := dev.clone()
	clear(holed.data[4*RecordSize : 5*RecordSize]) // seq 5
	if _, err := Verify(holed, size); !errors.Is(err, ErrBrokenChain) {
		t.Fatalf("hole in older lap: err %v, want ErrBrokenChain", err)
	}
	// Replace the older lap's end (seq 6) by a record from a different chain.
	other := newMem(6)
	writeN(t, mustWriter(t, other, size), 6)
	mixed := dev.clone()
	copy(mixed.data[5*RecordSize:], other.data[5*RecordSize:])
	if _, err := Verify(mixed, size); !errors.Is(err, ErrBrokenChain) {
		t.Fatalf("foreign seq 6: err %v, want ErrBrokenChain", err)
	}
}

func TestBadDevice(t *testing.T) {
	if _, err := NewWriter(newMem(1), RecordSize); !errors.Is(err, ErrBadDevice) {
		t.Errorf("NewWriter on one slot: err %v, want ErrBadDevice", err)
	}
	if _, err := NewWriter(nil, 1<<20); !errors.Is(err, ErrBadDevice) {
		t.Errorf("NewWriter nil: err %v, want ErrBadDevice", err)
	}
	if _, err := Verify(newMem(1), RecordSize+100); !errors.Is(err, ErrBadDevice) {
		t.Errorf("Verify on one slot: err %v, want ErrBadDevice", err)
	}
	// Size larger than what the reader holds: a clear read error.
	if _, err := Verify(newMem(2), 4*RecordSize); err == nil || !strings.Contains(err.Error(), "offset 0") {
		t.Errorf("Verify past end: err %v, want a read error naming offset 0", err)
	}
}

func TestWriteErrorKeepsSeq(t *testing.T) {
	dev := newMem(4)
	w := mustWriter(t, dev, int64(len(dev.data)))
	writeN(t, w, 2)
	dev.failNext = errors.New("io error")
	if _, err := w.Write(); err == nil || !strings.Contains(err.Error(), "seq 3") {
		t.Fatalf("err %v, want a write error naming seq 3", err)
	}
	if seq, err := w.Write(); err != nil || seq != 3 {
		t.Fatalf("retry: seq %d err %v, want 3", seq, err)
	}
	if rep, err := Verify(dev, int64(len(dev.data))); err != nil || rep.LastSeq != 3 {
		t.Fatalf("report %+v err %v", rep, err)
	}
}

func TestFileDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 64*RecordSize + 123 // a partial trailing record is ignored
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	w := mustWriter(t, f, size)
	writeN(t, w, 70)
	rep, err := Verify(f, size)
	if err != nil || rep.LastSeq != 70 || rep.Slots != 64 || rep.Records != 64 || rep.FirstSeq != 7 {
		t.Fatalf("report %+v err %v", rep, err)
	}
}

func FuzzDecode(f *testing.F) {
	good := make([]byte, RecordSize)
	Encode(good, 3, 99, Hash{1}, make([]byte, PayloadSize))
	f.Add(good)
	f.Add(make([]byte, RecordSize))
	f.Add([]byte("FTDREC\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrNotRecord) && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		again := make([]byte, RecordSize)
		sum, err := Encode(again, r.Seq, r.Time, r.Prev, r.Payload)
		if err != nil || sum != r.Sum || !bytes.Equal(again, b) {
			t.Fatalf("decoded record does not re-encode to the same bytes (err %v)", err)
		}
	})
}

// FuzzVerify feeds arbitrary small images, seeded with real chains, to
// Verify: it must never panic and must report a chain within the device.
func FuzzVerify(f *testing.F) {
	dev := newMem(2)
	w, _ := NewWriter(dev, int64(len(dev.data)))
	for range 3 {
		w.Write()
	}
	f.Add(dev.data, uint16(0), byte(0))
	f.Add(dev.data, uint16(5000), byte(1))
	f.Add(dev.data[:RecordSize], uint16(0), byte(0))
	f.Fuzz(func(t *testing.T, img []byte, pos uint16, flip byte) {
		img = bytes.Clone(img)
		if len(img) > 0 {
			img[int(pos)%len(img)] ^= flip
		}
		rep, err := Verify(bytes.NewReader(img), int64(len(img)))
		if err == nil && rep.Records > rep.Slots {
			t.Fatalf("report %+v has more records than slots", rep)
		}
	})
}
