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
	"github.com/ftctl/ftctl/pkg/memsync/memsynctest"
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

// BenchmarkSoftDirtyScan measures a soft-dirty Dirty call (pagemap read
// over the mapping plus clear_refs) on 64 MiB mapped and written by a
// helper process, against a shadow scan of the same region in the same
// run, and reports both as milliseconds per GiB of guest RAM. It needs a
// kernel with soft-dirty: hack/guest-test.sh runs it inside the guest
// kernel under TCG, where absolute times are emulated but the ratio holds.
func BenchmarkSoftDirtyScan(b *testing.B) {
	if err := memsync.ProbeSoftDirty(); err != nil {
		b.Skipf("soft-dirty unsupported on this kernel: %v", err)
	}
	const pages = 64 << 20 / memsync.PageSize
	r := benchRAM(b, pages)
	ctx := context.Background()
	w := memsynctest.StartWriter(ctx, b, r.Path())
	all := make([]int, pages)
	for i := range all {
		all[i] = i
	}
	w.Do(b, 'b', all) // fault every page into the helper's page tables
	sd, err := memsync.NewSoftDirty(ctx, w.PID(), r)
	if err != nil {
		b.Fatal(err)
	}
	defer sd.Close()
	sh := memsync.NewShadow(r, 0)
	defer sh.Close()
	if err := sd.Begin(ctx); err != nil {
		b.Fatal(err)
	}
	if err := sh.Begin(ctx); err != nil {
		b.Fatal(err)
	}
	some := all[:pages/100]
	var tSD, tSh time.Duration
	for b.Loop() {
		w.Do(b, 'b', some) // 1% dirty per interval
		t0 := time.Now()
		d1, err := sd.Dirty(ctx)
		t1 := time.Now()
		d2, err2 := sh.Dirty(ctx)
		t2 := time.Now()
		if err != nil || err2 != nil || d1.Count() < len(some) || d2.Count() != len(some) {
			b.Fatalf("soft-dirty %v (%d pages), shadow %v (%d pages), wrote %d", err, d1.Count(), err2, d2.Count(), len(some))
		}
		tSD += t1.Sub(t0)
		tSh += t2.Sub(t1)
	}
	gib := float64(r.Size()) * float64(b.N) / (1 << 30)
	b.ReportMetric(tSD.Seconds()*1000/gib, "softdirty-ms/GiB")
	b.ReportMetric(tSh.Seconds()*1000/gib, "shadow-ms/GiB")
	b.ReportMetric(tSD.Seconds()/tSh.Seconds(), "softdirty/shadow")
}
