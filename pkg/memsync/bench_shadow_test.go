package memsync_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"testing"
	"time"
	"unsafe"

	"github.com/ftctl/ftctl/pkg/memsync"
)

// benchRAM makes a guest-RAM-like mapped file of n pages with random
// content in /dev/shm (or the test temp dir).
func benchRAM(b testing.TB, pages int) *memsync.Region {
	dir := b.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "memsync-bench-"); err == nil {
		dir = d
		b.Cleanup(func() { os.RemoveAll(d) })
	}
	path := dir + "/ram"
	buf := make([]byte, pages*memsync.PageSize)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(buf); i += 8 {
		*(*uint64)(unsafe.Pointer(&buf[i])) = rng.Uint64()
	}
	if err := os.WriteFile(path, buf, 0o600); err != nil {
		b.Fatal(err)
	}
	r, err := memsync.OpenRegion(path, true)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { r.Close() })
	return r
}

// equalWords is the hand-written 8-byte-word compare the shadow tracker
// could use instead of bytes.Equal; measured against it below.
func equalWords(a, b []byte) bool {
	n := len(a) / 8
	pa := unsafe.Slice((*uint64)(unsafe.Pointer(&a[0])), n)
	pb := unsafe.Slice((*uint64)(unsafe.Pointer(&b[0])), n)
	for i := range pa {
		if pa[i] != pb[i] {
			return false
		}
	}
	return true
}

// BenchmarkShadowScan measures a clean shadow scan (no dirty page: the
// common case, every byte of RAM and shadow read) against a plain
// single-threaded memcpy of the same buffer, timed alternately in the same
// run. Reported: MB/s of each and scan/memcpy throughput ratio (target
// >= 0.8).
func BenchmarkShadowScan(b *testing.B) {
	const pages = 64 << 20 / memsync.PageSize // 64 MiB
	r := benchRAM(b, pages)
	ctx := context.Background()
	tr := memsync.NewShadow(r, 0)
	if err := tr.Begin(ctx); err != nil {
		b.Fatal(err)
	}
	dst := make([]byte, r.Size())
	copy(dst, r.Bytes()) // fault the destination in before timing
	var tScan, tCopy time.Duration
	b.SetBytes(int64(r.Size()))
	b.ResetTimer()
	for b.Loop() {
		t0 := time.Now()
		copy(dst, r.Bytes())
		t1 := time.Now()
		d, err := tr.Dirty(ctx)
		t2 := time.Now()
		if err != nil || d.Count() != 0 {
			b.Fatalf("clean scan: %v, %d dirty", err, d.Count())
		}
		tCopy += t1.Sub(t0)
		tScan += t2.Sub(t1)
	}
	mb := float64(r.Size()) * float64(b.N) / 1e6
	b.ReportMetric(mb/tCopy.Seconds(), "memcpy-MB/s")
	b.ReportMetric(mb/tScan.Seconds(), "scan-MB/s")
	b.ReportMetric(tCopy.Seconds()/tScan.Seconds(), "scan/memcpy")
}

// BenchmarkPageCompare compares bytes.Equal with an 8-byte word loop on one
// core over the same 64 MiB, and reports the word loop's throughput relative
// to bytes.Equal.
func BenchmarkPageCompare(b *testing.B) {
	const pages = 64 << 20 / memsync.PageSize
	r := benchRAM(b, pages)
	sh := bytes.Clone(r.Bytes())
	var tEq, tWords time.Duration
	b.SetBytes(int64(r.Size()))
	for b.Loop() {
		t0 := time.Now()
		for i := 0; i < pages; i++ {
			if !bytes.Equal(r.Page(i), sh[i*memsync.PageSize:(i+1)*memsync.PageSize]) {
				b.Fatal("differs")
			}
		}
		t1 := time.Now()
		for i := 0; i < pages; i++ {
			if !equalWords(r.Page(i), sh[i*memsync.PageSize:(i+1)*memsync.PageSize]) {
				b.Fatal("differs")
			}
		}
		t2 := time.Now()
		tEq += t1.Sub(t0)
		tWords += t2.Sub(t1)
	}
	mb := float64(r.Size()) * float64(b.N) / 1e6
	b.ReportMetric(mb/tEq.Seconds(), "bytes.Equal-MB/s")
	b.ReportMetric(mb/tWords.Seconds(), "words-MB/s")
	b.ReportMetric(tEq.Seconds()/tWords.Seconds(), "words/bytes.Equal")
}
