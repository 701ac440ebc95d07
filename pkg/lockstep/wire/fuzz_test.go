package wire

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
)

const fuzzMaxPayload = 64 << 10

func fuzzSeeds(f *testing.F) {
	good := epochStream(f, 5, "pages", "devstate", "blocks")
	f.Add(good)
	f.Add(append(bytes.Clone(good), epochStream(f, 6, "x")...))
	f.Add(append(bytes.Clone(good), good...))
	f.Add(good[:len(good)-3])
	f.Add(frameBytes(f, Frame{Type: TypeHeartbeat, Epoch: 1}, Frame{Type: TypeAck, Epoch: 5, Payload: []byte{}}))
	f.Add(rawFrame(Version, byte(TypeMemory), 0, 1, 0xffffffff, nil))
	f.Add(rawFrame(Version, byte(TypeMemory), 0, 1, fuzzMaxPayload, make([]byte, 10)))
	f.Add(rawFrame(Version+1, 99, 3, 1, 0, nil))
	f.Add([]byte("FTWR"))
	f.Add([]byte{})
}

// FuzzDecoder: any byte stream decodes into frames that re-encode to exactly
// the bytes consumed, or stops with a sentinel error; never a panic, never a
// payload above the bound, and memory bounded by the input, not by claims.
func FuzzDecoder(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		var frames []Frame
		var err error
		alloc := allocated(func() {
			d := NewDecoder(bytes.NewReader(data), fuzzMaxPayload)
			for {
				var fr Frame
				if fr, err = d.ReadFrame(); err != nil {
					return
				}
				frames = append(frames, fr)
			}
		})
		if err != io.EOF && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrVersion) {
			t.Fatalf("decoder stopped with %v, not a sentinel", err)
		}
		var re []byte
		for _, fr := range frames {
			if len(fr.Payload) > fuzzMaxPayload || !fr.Type.Known() {
				t.Fatalf("decoded %s frame with %d bytes", fr.Type, len(fr.Payload))
			}
			if re, err = AppendFrame(re, fr); err != nil {
				t.Fatalf("decoded frame does not re-encode: %v", err)
			}
		}
		if !bytes.HasPrefix(data, re) {
			t.Fatal("decoded frames do not re-encode to the input")
		}
		// Payload buffers grow by doubling from what really arrived (plus
		// at most one bound-sized chunk), and each frame costs a little.
		if limit := uint64(4*len(data) + 2*fuzzMaxPayload + 64<<10); alloc > limit {
			t.Fatalf("decoding %d bytes allocated %d, above %d", len(data), alloc, limit)
		}
	})
}

// FuzzEpochReceiver: whatever arrives, an epoch comes out only if it is
// whole, consecutive and matches its END.
func FuzzEpochReceiver(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		c := streamOf(data)
		c.dec.SetMaxPayload(fuzzMaxPayload)
		r := NewEpochReceiver(c)
		r.MaxEpochBytes = 4 * fuzzMaxPayload
		var last uint64
		have := false
		for range 1000 {
			ep, oob, err := r.Next(context.Background())
			if err != nil {
				if !errors.Is(err, ErrClosed) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrVersion) && !errors.Is(err, ErrTornEpoch) {
					t.Fatalf("Next failed with %v, not a sentinel", err)
				}
				return
			}
			if oob != nil {
				if oob.Type.InEpoch() {
					t.Fatalf("epoch frame %s returned as out-of-band", oob.Type)
				}
				continue
			}
			if have && ep.N != last+1 {
				t.Fatalf("epoch %d after %d", ep.N, last)
			}
			d := newEpochDigest()
			for _, fr := range ep.Frames {
				if fr.Epoch != ep.N || !fr.Type.InEpoch() || fr.Type == TypeEnd {
					t.Fatalf("epoch %d holds a %s frame of epoch %d", ep.N, fr.Type, fr.Epoch)
				}
				d.add(fr)
			}
			if d.bytes > r.MaxEpochBytes {
				t.Fatalf("epoch of %d bytes passed the %d limit", d.bytes, r.MaxEpochBytes)
			}
			last, have = ep.N, true
		}
		t.Fatal("1000 results from a finite stream")
	})
}
