package eventlog

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
)

// BenchmarkLogOverhead measures the event log's cost per write on top of an
// in-memory disk (so the disk does not hide it), 4 parallel writers, and
// reports the ratio to the same writes without the log, measured in the
// same run.
func BenchmarkLogOverhead(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10} {
		b.Run(byteSize(size), func(b *testing.B) {
			ctx := context.Background()
			run := func(be backend.Backend, n int) time.Duration {
				var next atomic.Int64
				start := time.Now()
				done := make(chan struct{})
				for range 4 {
					go func() {
						buf := make([]byte, size)
						for {
							i := next.Add(1)
							if i > int64(n) {
								done <- struct{}{}
								return
							}
							be.WriteAt(ctx, buf, (i*int64(size))%(64<<20-int64(size)), 0)
						}
					}()
				}
				for range 4 {
					<-done
				}
				return time.Since(start)
			}
			mem := backend.NewMem(64 << 20)
			p := NewPipe(16 << 20)
			l := New(mem, p, Options{})
			go func() {
				for {
					r, err := p.Recv(ctx)
					if err != nil {
						return
					}
					Recycle(r)
				}
			}()
			defer p.Close()
			b.ResetTimer()
			base := run(mem, b.N)
			logged := run(l, b.N)
			b.StopTimer()
			b.ReportMetric(float64(logged.Nanoseconds())/float64(b.N), "ns/logged-write")
			b.ReportMetric(float64(base.Nanoseconds())/float64(b.N), "ns/plain-write")
			b.ReportMetric(float64(logged)/float64(base), "logged/plain")
		})
	}
}

func byteSize(n int) string { return fmt.Sprintf("%dKiB", n>>10) }
