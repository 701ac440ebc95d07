package replay

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
)

// BenchmarkCommit measures the secondary's per-epoch cost: staging an
// epoch of 4 KiB writes and committing it (commit marker sync, apply, image
// sync, state file replace). It reports the commit latency, which bounds
// how often epochs can commit, for empty epochs and for epochs of 16 and
// 256 writes, and the empty-epoch latency as a baseline ratio.
func BenchmarkCommit(b *testing.B) {
	ctx := context.Background()
	measure := func(b *testing.B, writes int) time.Duration {
		dir := b.TempDir()
		p := filepath.Join(dir, "img")
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			b.Fatal(err)
		}
		os.Truncate(p, 64<<20)
		img, err := backend.OpenFile(p, backend.FileOptions{})
		if err != nil {
			b.Fatal(err)
		}
		defer img.Close()
		r, err := Open(ctx, img, filepath.Join(dir, "st"), quiet)
		if err != nil {
			b.Fatal(err)
		}
		defer r.Close()
		data := make([]byte, 4096)
		seq := uint64(0)
		var total time.Duration
		for e := uint64(1); e <= uint64(b.N); e++ {
			for i := range writes {
				seq++
				data[0] = byte(seq)
				rec := eventlog.Record{Kind: eventlog.KindWrite, Seq: seq, Epoch: e,
					Offset: uint64(i*4096) % (64 << 20), Length: 4096, Data: data}
				rec.Seal()
				if err := r.Stage(ctx, rec); err != nil {
					b.Fatal(err)
				}
			}
			end := eventlog.Record{Kind: eventlog.KindEpochEnd, Seq: seq, Epoch: e, Length: uint64(writes)}
			end.Seal()
			if err := r.Stage(ctx, end); err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			if err := r.Commit(ctx, e); err != nil {
				b.Fatal(err)
			}
			total += time.Since(start)
		}
		return total / time.Duration(b.N)
	}
	var empty time.Duration
	for _, n := range []int{0, 16, 256} {
		b.Run(map[int]string{0: "empty", 16: "16x4KiB", 256: "256x4KiB"}[n], func(b *testing.B) {
			d := measure(b, n)
			b.ReportMetric(float64(d.Microseconds())/1000, "ms/commit")
			if n == 0 {
				empty = d
			} else if empty > 0 {
				b.ReportMetric(float64(d)/float64(empty), "x-empty")
			}
		})
	}
}
