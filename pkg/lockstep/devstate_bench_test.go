package lockstep_test

import (
	"bytes"
	"crypto/subtle"
	"fmt"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/lockstep"
)

// captureDevStates boots the default test guest (counter on the serial
// console, disk writer over NBD) under TCG and saves its device state n
// times, 50 ms of guest time apart, the way a checkpoint does (stop, save,
// cont). It returns the states and the mean time of a save.
func captureDevStates(b *testing.B, n int) ([][]byte, time.Duration) {
	b.Helper()
	ctx := testenv.Deadline(b, 2*time.Minute)
	p := newPair(b, ctx, pairOptions{unprotected: true, linkTB: tlsLinkTB})
	c := p.primary.QMP()
	if err := checkpoint.Prepare(ctx, c); err != nil {
		b.Fatal(err)
	}
	var states [][]byte
	var saving time.Duration
	for range n {
		time.Sleep(50 * time.Millisecond)
		if err := c.Stop(ctx); err != nil {
			b.Fatal(err)
		}
		t := time.Now()
		s, err := checkpoint.SaveDeviceState(ctx, c)
		saving += time.Since(t)
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Cont(ctx); err != nil {
			b.Fatal(err)
		}
		states = append(states, s)
	}
	return states, saving / time.Duration(n)
}

// devCandidate is one way to send state cur when the receiver holds prev
// (nil for the first state of a link).
type devCandidate struct {
	name string
	// start, if set, is told the first state of a sequence (untimed).
	start  func(b *testing.B, first []byte)
	encode func(b *testing.B, prev, cur []byte) []byte
	decode func(b *testing.B, prev, payload []byte) []byte
}

func devCandidates(b *testing.B) []devCandidate {
	newEnc := func(o ...zstd.EOption) *zstd.Encoder {
		e, err := zstd.NewWriter(nil, append([]zstd.EOption{zstd.WithEncoderConcurrency(1)}, o...)...)
		if err != nil {
			b.Fatal(err)
		}
		return e
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(dec.Close)
	unzstd := func(p []byte) []byte {
		out, err := dec.DecodeAll(p, nil)
		if err != nil {
			b.Fatal(err)
		}
		return out
	}
	fastest, dflt := newEnc(zstd.WithEncoderLevel(zstd.SpeedFastest)), newEnc(zstd.WithEncoderLevel(zstd.SpeedDefault))
	xor := func(a, b []byte) []byte {
		out := bytes.Clone(a)
		subtle.XORBytes(out[:min(len(a), len(b))], a, b)
		return out
	}
	var (
		chosen *lockstep.DevStateEncoder
		epoch  uint64
	)
	return []devCandidate{
		{name: "raw",
			encode: func(_ *testing.B, _, cur []byte) []byte { return bytes.Clone(cur) },
			decode: func(_ *testing.B, _, p []byte) []byte { return bytes.Clone(p) }},
		{name: "zstd-fastest",
			encode: func(_ *testing.B, _, cur []byte) []byte { return fastest.EncodeAll(cur, nil) },
			decode: func(_ *testing.B, _, p []byte) []byte { return unzstd(p) }},
		{name: "zstd-default",
			encode: func(_ *testing.B, _, cur []byte) []byte { return dflt.EncodeAll(cur, nil) },
			decode: func(_ *testing.B, _, p []byte) []byte { return unzstd(p) }},
		{name: "xor+zstd-fastest",
			encode: func(_ *testing.B, prev, cur []byte) []byte { return fastest.EncodeAll(xor(cur, prev), nil) },
			decode: func(_ *testing.B, prev, p []byte) []byte { return xor(unzstd(p), prev) }},
		{name: "xor+zstd-default",
			encode: func(_ *testing.B, prev, cur []byte) []byte { return dflt.EncodeAll(xor(cur, prev), nil) },
			decode: func(_ *testing.B, prev, p []byte) []byte { return xor(unzstd(p), prev) }},
		{name: "dict+zstd-default",
			encode: func(b *testing.B, prev, cur []byte) []byte {
				e := newEnc(zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderDictRaw(1, prev))
				defer e.Close()
				return e.EncodeAll(cur, nil)
			},
			decode: func(b *testing.B, prev, p []byte) []byte {
				d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderDictRaw(1, prev))
				if err != nil {
					b.Fatal(err)
				}
				defer d.Close()
				out, err := d.DecodeAll(p, nil)
				if err != nil {
					b.Fatal(err)
				}
				return out
			}},
		{name: "chosen",
			// The package's encoder keeps its base itself: fed the
			// sequence in order, its base is always prev.
			start: func(b *testing.B, first []byte) {
				var err error
				if chosen, err = lockstep.NewDevStateEncoder(); err != nil {
					b.Fatal(err)
				}
				epoch++
				if _, _, err := chosen.Encode(epoch, first); err != nil {
					b.Fatal(err)
				}
			},
			encode: func(b *testing.B, _, cur []byte) []byte {
				epoch++
				p, _, err := chosen.Encode(epoch, cur)
				if err != nil {
					b.Fatal(err)
				}
				return p
			},
			decode: func(b *testing.B, prev, p []byte) []byte {
				out, err := lockstep.DecodeDevState(p, prev)
				if err != nil {
					b.Fatal(err)
				}
				return out
			}},
	}
}

// BenchmarkDevStateCodecs: bytes and time to send one checkpoint's device
// state, for each candidate codec, on states captured from a running TCG
// guest: in sequence as captured ("same"), and with a 37-byte section
// inserted into every other state ("shifted", what a vmstate subsection
// that comes and goes does to everything after it). The baseline is the
// raw state (bytes) and the QEMU save that produced it (time), both
// measured in this run; each transition is decoded and compared. "chosen"
// is the package's encoder and decoder (headers and checksums included).
// The guest boots once; -benchtime 1x gives the figures.
func BenchmarkDevStateCodecs(b *testing.B) {
	states, save := captureDevStates(b, 20)
	shifted := make([][]byte, len(states))
	for i, s := range states {
		shifted[i] = s
		if i%2 == 1 {
			shifted[i] = insert(s, len(s)/3, 37, 0xa5)
		}
	}
	type row struct {
		name             string
		bytes            float64
		encode, decodeDu time.Duration
	}
	var rows []row
	for _, series := range []struct {
		name   string
		states [][]byte
	}{{"same", states}, {"shifted", shifted}} {
		for _, c := range devCandidates(b) {
			name := series.name + "/" + c.name
			b.Run(name, func(b *testing.B) {
				var total int
				var enc, dec time.Duration
				k := 0
				for range b.N {
					if c.start != nil {
						c.start(b, series.states[0])
					}
					for i := 1; i < len(series.states); i++ {
						prev, cur := series.states[i-1], series.states[i]
						t := time.Now()
						p := c.encode(b, prev, cur)
						enc += time.Since(t)
						t = time.Now()
						got := c.decode(b, prev, p)
						dec += time.Since(t)
						if !bytes.Equal(got, cur) {
							b.Fatalf("%s: state %d does not survive the round trip", name, i)
						}
						total += len(p)
						k++
					}
				}
				r := row{name: name, bytes: float64(total) / float64(k), encode: enc / time.Duration(k), decodeDu: dec / time.Duration(k)}
				b.ReportMetric(r.bytes, "B/ckpt")
				b.ReportMetric(float64(r.encode.Microseconds()), "enc-µs/ckpt")
				b.ReportMetric(float64(r.decodeDu.Microseconds()), "dec-µs/ckpt")
				rows = append(rows, r)
			})
		}
	}
	raw := float64(len(states[0]))
	fmt.Printf("\ndevice state per checkpoint, %d states of a TCG guest (%d B raw; QEMU save %.2f ms; ratios against those, same run)\n",
		len(states), len(states[0]), ms(save))
	fmt.Printf("%-28s %10s %9s %10s %9s %10s\n", "series/codec", "B/ckpt", "/raw", "enc ms", "/save", "dec ms")
	for _, r := range rows {
		fmt.Printf("%-28s %10.0f %9.5f %10.3f %9.3f %10.3f\n", r.name, r.bytes, r.bytes/raw, ms(r.encode), float64(r.encode)/float64(save), ms(r.decodeDu))
	}
}
