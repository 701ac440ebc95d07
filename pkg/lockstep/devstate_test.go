package lockstep_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/cespare/xxhash/v2"

	"github.com/ftctl/ftctl/pkg/lockstep"
)

// fakeDevState is shaped like QEMU's device state: mostly incompressible
// ROM that never changes, with small device records between.
func fakeDevState(rng *rand.Rand, size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// insert returns b with n new bytes at off.
func insert(b []byte, off, n int, v byte) []byte {
	return slices.Concat(b[:off], bytes.Repeat([]byte{v}, n), b[off:])
}

func TestDevStateCodecs(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	s1 := fakeDevState(rng, 256<<10)
	// A few bytes change: the XOR delta is nearly all zeros.
	s2 := bytes.Clone(s1)
	for _, off := range []int{100, 70_000, 200_001} {
		s2[off]++
	}
	// A section grows: everything after it shifts.
	s3 := insert(s2, len(s2)/3, 37, 0xee)
	// One section grows and another shrinks: same length, shifted middle.
	s4 := insert(s3, 1000, 5, 0x11)
	s4 = slices.Delete(s4, 150_000, 150_005)
	// A whole new state of the same length (say, a different guest).
	s5 := fakeDevState(rng, len(s4))
	// The same state again.
	s6 := bytes.Clone(s5)

	steps := []struct {
		state   []byte
		codec   lockstep.DevCodec
		maxSize int // bound on the payload
	}{
		{s1, lockstep.DevZstd, len(s1) + len(s1)/64},
		{s2, lockstep.DevXORZstd, 256},
		{s3, lockstep.DevDictZstd, 1024},
		{s4, lockstep.DevDictZstd, 1024},
		{s5, 0, len(s5) + len(s5)/64}, // either codec; it must stay near raw
		{s6, lockstep.DevXORZstd, 256},
	}
	enc, err := lockstep.NewDevStateEncoder()
	if err != nil {
		t.Fatal(err)
	}
	var base []byte
	for i, st := range steps {
		epoch := uint64(10 + i)
		p, codec, err := enc.Encode(epoch, st.state)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		t.Logf("step %d: %d bytes → %d (%v)", i, len(st.state), len(p), codec)
		if st.codec != 0 && codec != st.codec {
			t.Errorf("step %d: codec %v, want %v", i, codec, st.codec)
		}
		if len(p) > st.maxSize {
			t.Errorf("step %d: payload of %d bytes, want at most %d", i, len(p), st.maxSize)
		}
		got, err := lockstep.DecodeDevState(p, base)
		if err != nil {
			t.Fatalf("step %d: decode: %v", i, err)
		}
		if !bytes.Equal(got, st.state) {
			t.Fatalf("step %d: decoded state differs", i)
		}
		if codec != lockstep.DevZstd {
			if _, err := lockstep.DecodeDevState(p, nil); !errors.Is(err, lockstep.ErrProtocol) {
				t.Errorf("step %d: decoding a delta without its base: %v, want ErrProtocol", i, err)
			}
		}
		base = got
	}
}

func TestDevStateEncoderRefuses(t *testing.T) {
	enc, err := lockstep.NewDevStateEncoder()
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := enc.Encode(1, nil); err == nil {
		t.Error("an empty device state was encoded")
	}
	if _, _, err := enc.Encode(1, make([]byte, lockstep.MaxDevState+1)); err == nil {
		t.Error("a device state over the bound was encoded")
	}
	if _, _, err := enc.Encode(5, []byte("state five")); err != nil {
		t.Fatal(err)
	}
	// A base epoch the secondary could never hold behind the new one.
	if _, _, err := enc.Encode(5, []byte("state five again")); err == nil {
		t.Error("a device state was encoded against a base of the same epoch")
	}
}

// FuzzDecodeDevState: any payload against any base is either refused with
// ErrProtocol or decodes to a state of the announced length and checksum,
// within the bound.
func FuzzDecodeDevState(f *testing.F) {
	rng := rand.New(rand.NewPCG(1, 1))
	a := fakeDevState(rng, 4096)
	b := bytes.Clone(a)
	b[10]++
	c := insert(b, 300, 9, 1)
	enc, err := lockstep.NewDevStateEncoder()
	if err != nil {
		f.Fatal(err)
	}
	prev := []byte(nil)
	for i, s := range [][]byte{a, b, c, []byte("tiny")} {
		p, _, err := enc.Encode(uint64(i+1), s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(p, prev)
		prev = s
	}
	f.Fuzz(func(t *testing.T, payload, base []byte) {
		got, err := lockstep.DecodeDevState(payload, base)
		if err != nil {
			if !errors.Is(err, lockstep.ErrProtocol) {
				t.Fatalf("refusal without ErrProtocol: %v", err)
			}
			return
		}
		if len(payload) < lockstep.DevHeaderLen {
			t.Fatal("decoded a payload shorter than its header")
		}
		hdr := payload[:lockstep.DevHeaderLen]
		n := int(binary.BigEndian.Uint32(hdr[18:]))
		sum := binary.BigEndian.Uint64(hdr[22:])
		if len(got) != n || len(got) > lockstep.MaxDevState || xxhash.Sum64(got) != sum {
			t.Fatalf("decoded %d bytes, header says %d bytes with checksum %x", len(got), n, sum)
		}
	})
}

// FuzzDevStateRoundTrip: a state encoded against any base decodes back to
// itself, whichever codec the encoder picks.
func FuzzDevStateRoundTrip(f *testing.F) {
	rng := rand.New(rand.NewPCG(2, 2))
	a := fakeDevState(rng, 4096)
	b := bytes.Clone(a)
	b[10]++
	f.Add(a, b)
	f.Add(a, insert(b, 300, 9, 1))
	f.Add([]byte("x"), []byte("y"))
	f.Add(a, fakeDevState(rng, 4096))
	// One encoder for the worker (a new one per input costs far more than
	// the encoding): the epochs only go up.
	enc, err := lockstep.NewDevStateEncoder()
	if err != nil {
		f.Fatal(err)
	}
	epoch := uint64(0)
	f.Fuzz(func(t *testing.T, base, state []byte) {
		if len(base) == 0 || len(state) == 0 {
			return
		}
		if _, _, err := enc.Encode(epoch+1, base); err != nil {
			t.Fatal(err)
		}
		p, codec, err := enc.Encode(epoch+2, state)
		if err != nil {
			t.Fatal(err)
		}
		epoch += 2
		got, err := lockstep.DecodeDevState(p, base)
		if err != nil || !bytes.Equal(got, state) {
			t.Fatalf("round trip (%v): %v", codec, err)
		}
	})
}
