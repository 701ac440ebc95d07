package testbed

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkNewClose measures building and removing a whole bed, against a
// baseline measured in the same run: creating and removing as many bare
// namespaces, without links. It reports the ratio as x-bare-netns.
func BenchmarkNewClose(b *testing.B) {
	requireRoot(b)
	const rounds, perBed = 10, 4 // switch, a, b, client
	start := time.Now()
	for i := range rounds * perBed {
		name := fmt.Sprintf("%s-bench-%d", testPrefix, i)
		if err := createNetns(name); err != nil {
			b.Fatal(err)
		}
		if err := removeNetns(name, false); err != nil {
			b.Fatal(err)
		}
	}
	bare := time.Since(start) / rounds
	b.ResetTimer()
	for b.Loop() {
		bed, err := New(context.Background(), Options{Prefix: testPrefix})
		if err != nil {
			b.Fatal(err)
		}
		if err := bed.Close(); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	per := b.Elapsed() / time.Duration(b.N)
	b.ReportMetric(float64(per)/float64(bare), "x-bare-netns")
}
