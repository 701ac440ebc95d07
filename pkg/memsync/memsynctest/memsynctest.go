// Package memsynctest owns the conformance suite every memsync.Tracker must
// pass. A separate process (the test binary re-executed as a writer helper)
// maps the same guest-RAM file and writes pages, standing in for QEMU; the
// tracker under test must report every page written.
//
// A test binary using the suite must call RunWriterIfChild first thing in
// its TestMain.
package memsynctest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/ftctl/ftctl/pkg/memsync"
	"golang.org/x/sys/unix"
)

const writerEnv = "MEMSYNCTEST_WRITER_FILE"

// Target is what the suite hands a Factory: the guest RAM file, the process
// writing it (QEMU's stand-in) and the agent-side mapping of it.
type Target struct {
	Path   string
	PID    int
	Region *memsync.Region
}

// Factory builds the tracker under test for a target. It may call t.Skip
// (for example when the kernel lacks soft-dirty), saying why.
type Factory func(ctx context.Context, t *testing.T, tg Target) (memsync.Tracker, error)

// Options say how exact the tracker claims to be.
type Options struct {
	// ContentExact: the reported set equals the pages whose bytes changed
	// (the shadow tracker).
	ContentExact bool
	// WriteExact: the reported set equals the pages written to, also when
	// the value written equals the old one (soft-dirty on a quiet mapping).
	WriteExact bool
	// Pages is the guest RAM size in pages (default 2048 = 8 MiB).
	Pages int
	// Rounds of random writes (default 8).
	Rounds int
	// Seed for the random choices; 0 picks one and logs it.
	Seed uint64
}

// TestTracker runs the conformance suite against the trackers f builds.
func TestTracker(t *testing.T, f Factory, o Options) {
	if o.Pages <= 0 {
		o.Pages = 2048
	}
	if o.Rounds <= 0 {
		o.Rounds = 8
	}
	if o.Seed == 0 {
		o.Seed = uint64(time.Now().UnixNano())
	}
	t.Logf("memsynctest: %d pages, seed %d", o.Pages, o.Seed)
	rng := rand.New(rand.NewPCG(o.Seed, o.Seed^0x9e3779b97f4a7c15))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	path := ramFile(t, o.Pages, rng)
	region, err := memsync.OpenRegion(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { region.Close() })
	w := StartWriter(ctx, t, path)
	tr, err := f(ctx, t, Target{Path: path, PID: w.PID(), Region: region})
	if err != nil {
		t.Fatalf("factory: %v", err)
	}
	t.Cleanup(func() {
		if err := tr.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	s := &suite{t: t, o: o, rng: rng, w: w, tr: tr, region: region, ctx: ctx}

	if _, err := tr.Dirty(ctx); err == nil {
		t.Errorf("Dirty before Begin: want an error, got none")
	}
	if err := tr.Begin(ctx); err != nil {
		t.Fatalf("Begin: %v", err)
	}
	// Each step depends on the interval the previous one left, so they run
	// in order and stop at the first failure.
	steps := []struct {
		name string
		fn   func(*suite)
	}{
		{"NoWrites", (*suite).noWrites},
		{"RandomWrites", (*suite).randomWrites},
		{"EdgePages", (*suite).edgePages},
		{"OneByteChanges", (*suite).oneByte},
		{"ZeroFill", (*suite).zeroFill},
		{"SameValueWrites", (*suite).sameValue},
		{"BeginForgets", (*suite).beginForgets},
		{"CancelledContext", (*suite).cancelled},
	}
	for _, st := range steps {
		if !t.Run(st.name, func(t *testing.T) { s.t = t; st.fn(s) }) {
			return
		}
	}
}

type suite struct {
	t      *testing.T
	o      Options
	rng    *rand.Rand
	w      *Writer
	tr     memsync.Tracker
	region *memsync.Region
	ctx    context.Context
}

// write has the helper apply op to pages and returns which pages' bytes
// changed, as seen through the agent's own mapping.
func (s *suite) write(op byte, pages []int) (written, changed map[int]bool) {
	s.t.Helper()
	before := make(map[int][]byte, len(pages))
	for _, p := range pages {
		before[p] = bytes.Clone(s.region.Page(p))
	}
	s.w.Do(s.t, op, pages)
	written, changed = map[int]bool{}, map[int]bool{}
	for _, p := range pages {
		written[p] = true
		if !bytes.Equal(before[p], s.region.Page(p)) {
			changed[p] = true
		}
	}
	return written, changed
}

// check compares a Dirty result with what was written.
func (s *suite) check(written, changed map[int]bool) {
	s.t.Helper()
	got, err := s.tr.Dirty(s.ctx)
	if err != nil {
		s.t.Fatalf("Dirty: %v", err)
	}
	if got.Len() != s.o.Pages {
		s.t.Fatalf("Dirty bitmap has Len %d, want %d", got.Len(), s.o.Pages)
	}
	var missing []int
	for p := range changed {
		if !got.Test(p) {
			missing = append(missing, p)
		}
	}
	if !s.o.ContentExact {
		for p := range written {
			if !got.Test(p) && !changed[p] {
				missing = append(missing, p)
			}
		}
	}
	if len(missing) > 0 {
		s.t.Errorf("Dirty missed %d written pages, e.g. %v (reported %d, wrote %d)", len(missing), first(missing), got.Count(), len(written))
	}
	want := map[int]bool(nil)
	switch {
	case s.o.ContentExact:
		want = changed
	case s.o.WriteExact:
		want = written
	}
	if want != nil {
		var extra []int
		for _, p := range got.Pages() {
			if !want[p] {
				extra = append(extra, p)
			}
		}
		if len(extra) > 0 || got.Count() != len(want) {
			s.t.Errorf("Dirty reported %d pages, want exactly %d; extra e.g. %v", got.Count(), len(want), first(extra))
		}
	}
	s.t.Logf("wrote %d pages (%d changed), tracker reported %d", len(written), len(changed), got.Count())
}

func first(p []int) []int {
	if len(p) > 8 {
		return p[:8]
	}
	return p
}

func (s *suite) randomPages(max int) []int {
	n := 1 + s.rng.IntN(max)
	seen := map[int]bool{}
	var out []int
	for len(out) < n {
		p := s.rng.IntN(s.o.Pages)
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

func (s *suite) noWrites() { s.check(nil, nil) }

func (s *suite) randomWrites() {
	for r := range s.o.Rounds {
		// Alternate small and large sets so both sparse and dense bitmaps
		// (and more than one scan chunk) are exercised.
		max := 16
		if r%2 == 1 {
			max = s.o.Pages / 3
		}
		w, c := s.write('f', s.randomPages(max))
		s.check(w, c)
	}
}

func (s *suite) edgePages() {
	w, c := s.write('f', []int{0, 63, 64, s.o.Pages - 1})
	s.check(w, c)
}

func (s *suite) oneByte() {
	w, c := s.write('b', s.randomPages(64))
	if len(c) != len(w) {
		s.t.Fatalf("helper's one-byte writes changed %d of %d pages", len(c), len(w))
	}
	s.check(w, c)
}

func (s *suite) zeroFill() {
	w, c := s.write('z', s.randomPages(64))
	s.check(w, c)
}

func (s *suite) sameValue() {
	w, c := s.write('s', s.randomPages(32))
	if len(c) != 0 {
		s.t.Fatalf("same-value writes changed %d pages", len(c))
	}
	s.check(w, c)
}

func (s *suite) beginForgets() {
	s.write('f', s.randomPages(32))
	if err := s.tr.Begin(s.ctx); err != nil {
		s.t.Fatalf("Begin: %v", err)
	}
	w, c := s.write('f', s.randomPages(32))
	s.check(w, c)
}

func (s *suite) cancelled() {
	ctx, cancel := context.WithCancel(s.ctx)
	cancel()
	if _, err := s.tr.Dirty(ctx); err == nil {
		s.t.Errorf("Dirty with a cancelled context: want an error, got none")
	}
	// A tracker may forget its interval on cancellation; after Begin it
	// must work again.
	if err := s.tr.Begin(s.ctx); err != nil {
		s.t.Fatalf("Begin after cancel: %v", err)
	}
	w, c := s.write('f', s.randomPages(8))
	s.check(w, c)
}

// ramFile makes a guest RAM file, in /dev/shm when possible (like QEMU's
// memory-backend-file), with a mix of zero and random pages.
func ramFile(t *testing.T, pages int, rng *rand.Rand) string {
	dir := t.TempDir()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "memsynctest-"); err == nil {
			dir = d
			t.Cleanup(func() { os.RemoveAll(d) })
		}
	}
	path := filepath.Join(dir, "ram")
	buf := make([]byte, pages*memsync.PageSize)
	for p := range pages {
		if rng.IntN(3) == 0 {
			continue
		}
		for i := p * memsync.PageSize; i < (p+1)*memsync.PageSize; i += 8 {
			*(*uint64)(unsafe.Pointer(&buf[i])) = rng.Uint64()
		}
	}
	if err := os.WriteFile(path, buf, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Writer is a helper process that maps a guest-RAM file shared and writes
// pages on command, standing in for QEMU.
type Writer struct {
	pid int
	in  io.Writer
	out *bufio.Reader
}

// StartWriter re-executes the test binary as a Writer on path; it stops when
// the test ends.
func StartWriter(ctx context.Context, t testing.TB, path string) *Writer {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), writerEnv+"="+path)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		if err := cmd.Wait(); err != nil && ctx.Err() == nil {
			t.Errorf("writer helper: %v", err)
		}
	})
	w := &Writer{pid: cmd.Process.Pid, in: in, out: bufio.NewReader(out)}
	line, err := w.out.ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("writer helper did not start (got %q, %v): does TestMain call memsynctest.RunWriterIfChild?", line, err)
	}
	return w
}

// PID is the helper's process id.
func (w *Writer) PID() int { return w.pid }

// Do has the helper apply op to pages and waits until it has: 'f' fills
// each page with random bytes, 'b' adds one to one byte of each, 'z'
// zero-fills, 's' stores a word's own value back (a write that changes
// nothing).
func (w *Writer) Do(t testing.TB, op byte, pages []int) {
	t.Helper()
	if err := w.Write(op, pages); err != nil {
		t.Fatal(err)
	}
}

// Write is Do returning an error, for use from other goroutines. Calls must
// not overlap.
func (w *Writer) Write(op byte, pages []int) error {
	var b strings.Builder
	b.WriteByte(op)
	for _, p := range pages {
		b.WriteByte(' ')
		b.WriteString(strconv.Itoa(p))
	}
	b.WriteByte('\n')
	if _, err := io.WriteString(w.in, b.String()); err != nil {
		return fmt.Errorf("writer helper: %w", err)
	}
	line, err := w.out.ReadString('\n')
	if err != nil || line != "ok\n" {
		return fmt.Errorf("writer helper answered %q, %v", line, err)
	}
	return nil
}

// RunWriterIfChild turns the process into the writer helper when the suite
// started it, and exits; otherwise it returns at once. Call it first in
// TestMain.
func RunWriterIfChild() {
	path := os.Getenv(writerEnv)
	if path == "" {
		return
	}
	if err := runWriter(path, os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "memsynctest writer:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// runWriter maps path shared and applies commands: "OP page page ...",
// where OP is f (fill with random bytes), b (add one to one byte),
// z (fill with zeros), s (store each word's own value back).
func runWriter(path string, in io.Reader, out io.Writer) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	f.Close()
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(uint64(os.Getpid()), uint64(time.Now().UnixNano())))
	if _, err := io.WriteString(out, "ready\n"); err != nil {
		return err
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		for _, a := range fields[1:] {
			p, err := strconv.Atoi(a)
			if err != nil || p < 0 || (p+1)*memsync.PageSize > len(mem) {
				return fmt.Errorf("bad page %q", a)
			}
			pg := mem[p*memsync.PageSize : (p+1)*memsync.PageSize]
			switch fields[0] {
			case "f":
				for i := 0; i < len(pg); i += 8 {
					atomic.StoreUint64((*uint64)(unsafe.Pointer(&pg[i])), rng.Uint64())
				}
			case "b":
				pg[(p*131+17)%memsync.PageSize]++
			case "z":
				clear(pg)
			case "s":
				// An atomic store is a real write even of the same value:
				// it faults on a write-protected (soft-dirty-cleared) page.
				w := (*uint64)(unsafe.Pointer(&pg[(p*8)%memsync.PageSize]))
				atomic.StoreUint64(w, atomic.LoadUint64(w))
			default:
				return fmt.Errorf("bad op %q", fields[0])
			}
		}
		if _, err := io.WriteString(out, "ok\n"); err != nil {
			return err
		}
	}
	return sc.Err()
}
