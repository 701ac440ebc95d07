package nbd

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"golang.org/x/sys/unix"
)

// recorder wraps a backend and remembers the flags each operation carried.
type recorder struct {
	backend.Backend
	mu  sync.Mutex
	ops []string
}

func (r *recorder) note(op string, fl backend.Flags) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := op
	if fl&backend.FUA != 0 {
		s += "+fua"
	}
	if fl&backend.NoHole != 0 {
		s += "+nohole"
	}
	r.ops = append(r.ops, s)
}

func (r *recorder) WriteAt(ctx context.Context, p []byte, off int64, fl backend.Flags) error {
	r.note("write", fl)
	return r.Backend.WriteAt(ctx, p, off, fl)
}

func (r *recorder) Trim(ctx context.Context, off, n int64, fl backend.Flags) error {
	r.note("trim", fl)
	return r.Backend.Trim(ctx, off, n, fl)
}

func (r *recorder) WriteZeroes(ctx context.Context, off, n int64, fl backend.Flags) error {
	r.note("zero", fl)
	return r.Backend.WriteZeroes(ctx, off, n, fl)
}

func (r *recorder) Flush(ctx context.Context) error {
	r.note("flush", 0)
	return r.Backend.Flush(ctx)
}

func (r *recorder) count(op string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, o := range r.ops {
		if o == op {
			n++
		}
	}
	return n
}

func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// qemuIOScript builds a random mix of qemu-io commands. Parallel aio writes
// get disjoint ranges, because overlapping in-flight writes have no defined
// result; sequential commands overlap freely.
func qemuIOScript(rng *rand.Rand, size int64, n int) []string {
	const unit = 4096
	blocks := size / unit
	rangeOf := func(maxBlocks int64) (int64, int64) {
		l := 1 + rng.Int64N(maxBlocks)
		o := rng.Int64N(blocks - l + 1)
		return o * unit, l * unit
	}
	var cmds []string
	for len(cmds) < n {
		switch rng.IntN(7) {
		case 0, 1:
			o, l := rangeOf(64)
			cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+rng.IntN(254), o, l))
		case 2:
			o, l := rangeOf(16)
			cmds = append(cmds, fmt.Sprintf("write -f -P %d %d %d", 1+rng.IntN(254), o, l))
		case 3:
			o, l := rangeOf(64)
			cmds = append(cmds, fmt.Sprintf("discard %d %d", o, l))
		case 4:
			o, l := rangeOf(64)
			u := ""
			if rng.IntN(2) == 0 {
				u = "-u "
			}
			cmds = append(cmds, fmt.Sprintf("write -z %s%d %d", u, o, l))
		case 5:
			// A burst of parallel writes on disjoint 64 KiB slots.
			slots := rng.Perm(int(size / (64 << 10)))[:4]
			for _, s := range slots {
				cmds = append(cmds, fmt.Sprintf("aio_write -P %d %d %d", 1+rng.IntN(254), int64(s)*(64<<10), 16*unit))
			}
			cmds = append(cmds, "aio_flush")
		case 6:
			cmds = append(cmds, "flush")
		}
	}
	return cmds
}

func qemuIO(t *testing.T, target string, cmds []string, extra ...string) string {
	t.Helper()
	// writeback: otherwise qemu-io emulates writethrough with FUA on every
	// write, and the test could not tell the script's FUA writes apart.
	args := append([]string{"-f", "raw", "-d", "unmap", "-t", "writeback"}, extra...)
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return run(t, "qemu-io", append(args, target)...)
}

// TestQemuIOMatchesLocalImage runs the same random qemu-io script once over
// the NBD server and once on a plain local file (QEMU's own raw driver, no
// code of ours), and requires identical images.
func TestQemuIOMatchesLocalImage(t *testing.T) {
	need(t, "qemu-io")
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(1, 2))
	seed := randomBytes(rng, 1<<20)
	served := makeImage(t, size, seed)
	expected := makeImage(t, size, seed)
	rec := &recorder{Backend: openFile(t, served)}
	ts := startServer(t, Options{}, Export{Name: "disk", Backend: rec})

	cmds := qemuIOScript(rng, size, 120)
	qemuIO(t, ts.uri("disk"), cmds)
	qemuIO(t, expected, cmds)
	if !bytes.Equal(readFile(t, served), readFile(t, expected)) {
		t.Fatal("image written over NBD differs from the same script run on a local file")
	}
	// The script had FUA writes, flushes, discards and both zero modes; each
	// must have reached the backend with the right flags.
	for _, op := range []string{"write+fua", "flush", "trim", "zero+nohole", "zero"} {
		want := 0
		for _, c := range cmds {
			switch {
			case op == "write+fua" && strings.HasPrefix(c, "write -f"),
				op == "flush" && (c == "flush" || c == "aio_flush"),
				op == "trim" && strings.HasPrefix(c, "discard"),
				op == "zero+nohole" && strings.HasPrefix(c, "write -z ") && !strings.HasPrefix(c, "write -z -u"),
				op == "zero" && strings.HasPrefix(c, "write -z -u"):
				want++
			}
		}
		if op == "flush" {
			want = min(want, 1) // QEMU skips a flush when nothing was written since the last
		}
		if got := rec.count(op); want > 0 && got < want {
			t.Errorf("backend saw %d %q operations, script issued %d", got, op, want)
		}
	}
}

// TestWriteZeroesNoHole checks NBD_CMD_FLAG_NO_HOLE: without it the range
// becomes a hole, with it the range stays allocated.
func TestWriteZeroesNoHole(t *testing.T) {
	need(t, "qemu-io")
	const size = 4 << 20
	img := makeImage(t, size, bytes.Repeat([]byte{7}, size))
	f := openFile(t, img)
	if _, _, ok := f.SeekData(0); !ok {
		t.Skip("filesystem cannot report holes")
	}
	ts := startServer(t, Options{}, Export{Name: "d", Backend: f})
	qemuIO(t, ts.uri("d"), []string{"write -z 0 1M", "write -z -u 2M 1M"})
	data := readFile(t, img)
	if !bytes.Equal(data[:1<<20], make([]byte, 1<<20)) || !bytes.Equal(data[2<<20:3<<20], make([]byte, 1<<20)) {
		t.Fatal("zeroed ranges do not read as zero")
	}
	fd := int(f.Fd())
	if d, err := unix.Seek(fd, 0, unix.SEEK_DATA); err != nil || d != 0 {
		t.Errorf("NO_HOLE range was deallocated: first data at %d (%v)", d, err)
	}
	if h, err := unix.Seek(fd, 2<<20, unix.SEEK_HOLE); err != nil || h != 2<<20 {
		t.Errorf("range zeroed without NO_HOLE is not a hole: next hole at %d (%v)", h, err)
	}
}

func TestQemuImgConvertInOutCompareMap(t *testing.T) {
	need(t, "qemu-img")
	const size = 6 << 20
	rng := rand.New(rand.NewPCG(3, 4))
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	// Data with holes between, so convert has zero regions to skip.
	content := make([]byte, size)
	for _, o := range []int{0, 1 << 20, 3<<20 + 4096, 5 << 20} {
		copy(content[o:], randomBytes(rng, 300<<10))
	}
	if err := os.WriteFile(src, content, 0o600); err != nil {
		t.Fatal(err)
	}
	served := makeImage(t, size, bytes.Repeat([]byte{0xee}, size)) // garbage to overwrite
	ts := startServer(t, Options{}, Export{Name: "disk", Backend: openFile(t, served), MultiConn: true})

	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", src, ts.uri("disk"))
	if !bytes.Equal(readFile(t, served), content) {
		t.Fatal("qemu-img convert into the export: image differs from source")
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, ts.uri("disk"))
	out := filepath.Join(dir, "out.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", ts.uri("disk"), out)
	if !bytes.Equal(readFile(t, out), content) {
		t.Fatal("qemu-img convert out of the export: copy differs")
	}
	info := run(t, "qemu-img", "info", ts.uri("disk"))
	if !strings.Contains(info, fmt.Sprintf("(%d bytes)", size)) {
		t.Errorf("qemu-img info does not report %d bytes:\n%s", size, info)
	}
	m := run(t, "qemu-img", "map", "--output=json", "-f", "raw", ts.uri("disk"))
	if !strings.Contains(m, fmt.Sprintf(`"length": %d`, size)) {
		t.Errorf("qemu-img map does not cover the export:\n%s", m)
	}
	// Corrupt one byte on the server side: compare must notice.
	content[4<<20] ^= 1
	if err := os.WriteFile(src, content, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := runErr(ctx, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, ts.uri("disk")); err == nil {
		t.Error("qemu-img compare did not notice a differing byte")
	}
}

func TestTCPListener(t *testing.T) {
	need(t, "qemu-io")
	img := makeImage(t, 1<<20, nil)
	s, err := NewServer(Options{}, Export{Name: "t", Backend: openFile(t, img)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Serve(ctx, ln) }()
	uri := fmt.Sprintf("nbd://%s/t", ln.Addr())
	qemuIO(t, uri, []string{"write -P 0x5a 4096 8192", "flush"})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := readFile(t, img)
	if !bytes.Equal(got[4096:12288], bytes.Repeat([]byte{0x5a}, 8192)) || got[4095] != 0 || got[12288] != 0 {
		t.Fatal("write over TCP did not land exactly")
	}
}

// TestDirectIO serves with O_DIRECT: aligned requests bypass the page cache,
// unaligned ones must still work.
func TestDirectIO(t *testing.T) {
	need(t, "qemu-io")
	img := makeImage(t, 2<<20, nil)
	f, err := backend.OpenFile(img, backend.FileOptions{Direct: true})
	if err != nil {
		t.Skipf("O_DIRECT not available on this filesystem: %v", err)
	}
	defer f.Close()
	ts := startServer(t, Options{}, Export{Name: "d", Backend: f})
	out := qemuIO(t, ts.uri("d"), []string{
		"write -P 0x11 0 64k", "write -P 0x22 65537 1000", "read -P 0x11 0 64k", "read -P 0x22 65537 1000", "flush",
	})
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("readback mismatch:\n%s", out)
	}
	got := readFile(t, img)
	if !bytes.Equal(got[:65536], bytes.Repeat([]byte{0x11}, 65536)) ||
		!bytes.Equal(got[65537:66537], bytes.Repeat([]byte{0x22}, 1000)) || got[65536] != 0 {
		t.Fatal("O_DIRECT export wrote the wrong bytes")
	}
}
