package memsync_test

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/memsync"
)

// BenchmarkEncode measures, per page mix and codec on one core, encoder
// throughput (MB/s of input pages), output/input ratio, and throughput
// relative to the raw codec measured in the same run.
func BenchmarkEncode(b *testing.B) {
	const n = 1024 // 4 MiB per op
	rawSpeed := map[string]float64{}
	for _, mix := range mixes {
		old, cur := genMix(rand.New(rand.NewPCG(9, 10)), mix, n)
		for _, c := range codecs {
			b.Run(mix+"/"+c.String(), func(b *testing.B) {
				enc, err := memsync.NewEncoder(c, 1)
				if err != nil {
					b.Fatal(err)
				}
				snap, err := memsync.NewCapturer(memPages(cur), 1).CapturePages(context.Background(), 1, allPages(n))
				if err != nil {
					b.Fatal(err)
				}
				base := memsync.NewBase(n)
				var frame []byte
				var st memsync.Stats
				var busy time.Duration
				b.SetBytes(int64(len(cur)))
				for b.Loop() {
					b.StopTimer()
					for i := range n {
						copy(base.Page(i), old[i*memsync.PageSize:])
					}
					b.StartTimer()
					t0 := time.Now()
					frame, st, err = enc.Encode(frame[:0], snap, base)
					busy += time.Since(t0)
					if err != nil {
						b.Fatal(err)
					}
				}
				mbs := float64(len(cur)) * float64(b.N) / 1e6 / busy.Seconds()
				if c == memsync.CodecRaw {
					rawSpeed[mix] = mbs
				}
				b.ReportMetric(st.Ratio(), "out/in")
				b.ReportMetric(mbs, "enc-MB/s")
				if r := rawSpeed[mix]; r > 0 {
					b.ReportMetric(mbs/r, "speed/raw")
				}
			})
		}
	}
}

// BenchmarkDecode measures decoding MB/s (of output pages) per mix and codec.
func BenchmarkDecode(b *testing.B) {
	const n = 1024
	dec, err := memsync.NewDecoder()
	if err != nil {
		b.Fatal(err)
	}
	for _, mix := range mixes {
		old, cur := genMix(rand.New(rand.NewPCG(9, 10)), mix, n)
		for _, c := range codecs {
			b.Run(mix+"/"+c.String(), func(b *testing.B) {
				enc, err := memsync.NewEncoder(c, 1)
				if err != nil {
					b.Fatal(err)
				}
				snap, err := memsync.NewCapturer(memPages(cur), 1).CapturePages(context.Background(), 1, allPages(n))
				if err != nil {
					b.Fatal(err)
				}
				base := memsync.NewBase(n)
				for i := range n {
					copy(base.Page(i), old[i*memsync.PageSize:])
				}
				frame, _, err := enc.Encode(nil, snap, base)
				if err != nil {
					b.Fatal(err)
				}
				replica := memPages(old)
				b.SetBytes(int64(len(cur)))
				for b.Loop() {
					_, err := dec.Decode(frame, n, func(p int) ([]byte, error) { return replica.Page(p), nil },
						func(int, []byte) error { return nil })
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
