package memsync_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/memsync"
)

// BenchmarkPause breaks down the memory part of a checkpoint pause for a
// 256 MiB guest with the shadow tracker at several dirty rates: the scan
// (Dirty) and the copy into the send buffer (Capture) happen while the VM
// is stopped; the encode happens after cont and is reported beside them.
// Pages are dirtied by one-byte writes through the mapping between
// iterations (untimed). The QMP stop/cont and device-state parts are not
// memsync's and not included.
func BenchmarkPause(b *testing.B) {
	const pages = 256 << 20 / memsync.PageSize
	r := benchRAM(b, pages)
	ctx := context.Background()
	for _, pct := range []float64{0.1, 1, 10} {
		b.Run(fmt.Sprintf("dirty=%.1f%%", pct), func(b *testing.B) {
			tr := memsync.NewShadow(r, 0)
			defer tr.Close()
			if err := tr.Begin(ctx); err != nil {
				b.Fatal(err)
			}
			cp := memsync.NewCapturer(r, 0)
			enc, err := memsync.NewEncoder(memsync.DefaultCodec, 0)
			if err != nil {
				b.Fatal(err)
			}
			base := memsync.NewBase(pages)
			for i := range pages {
				copy(base.Page(i), r.Page(i))
			}
			rng := rand.New(rand.NewPCG(31, 32))
			n := int(float64(pages) * pct / 100)
			var tScan, tCopy, tEnc time.Duration
			var frame []byte
			var out int
			for b.Loop() {
				b.StopTimer()
				for range n {
					r.Page(rng.IntN(pages))[rng.IntN(memsync.PageSize)]++
				}
				b.StartTimer()
				t0 := time.Now()
				d, err := tr.Dirty(ctx)
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				snap, err := cp.Capture(ctx, 1, d)
				if err != nil {
					b.Fatal(err)
				}
				t2 := time.Now()
				frame, _, err = enc.Encode(frame[:0], snap, base)
				t3 := time.Now()
				if err != nil {
					b.Fatal(err)
				}
				snap.Release()
				out += len(frame)
				tScan += t1.Sub(t0)
				tCopy += t2.Sub(t1)
				tEnc += t3.Sub(t2)
			}
			ms := func(d time.Duration) float64 { return d.Seconds() * 1000 / float64(b.N) }
			b.ReportMetric(ms(tScan), "scan-ms")
			b.ReportMetric(ms(tCopy), "copy-ms")
			b.ReportMetric(ms(tScan+tCopy), "pause-ms")
			b.ReportMetric(ms(tEnc), "encode-ms")
			b.ReportMetric(float64(out)/float64(b.N), "frame-B")
		})
	}
}
