package memsync_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/memsync/memsynctest"
)

// guestSim is a writer process that keeps dirtying random pages until
// paused, standing in for a running guest.
type guestSim struct {
	w     *memsynctest.Writer
	mu    sync.Mutex // held while paused
	stop  chan struct{}
	done  chan struct{}
	err   error
	pages int
}

func startGuest(t *testing.T, path string, pages int) *guestSim {
	g := &guestSim{w: memsynctest.StartWriter(context.Background(), t, path),
		stop: make(chan struct{}), done: make(chan struct{}), pages: pages}
	go g.run()
	t.Cleanup(g.halt)
	return g
}

func (g *guestSim) run() {
	defer close(g.done)
	rng := rand.New(rand.NewPCG(21, 22))
	ops := []byte{'f', 'b', 'z'}
	for {
		select {
		case <-g.stop:
			return
		default:
		}
		batch := make([]int, 1+rng.IntN(8))
		for i := range batch {
			batch[i] = rng.IntN(g.pages)
		}
		g.mu.Lock()
		err := g.w.Write(ops[rng.IntN(len(ops))], batch)
		g.mu.Unlock()
		if err != nil {
			g.err = err
			return
		}
		time.Sleep(200 * time.Microsecond) // a guest, not a busy loop
	}
}

func (g *guestSim) halt() {
	select {
	case <-g.stop:
	default:
		close(g.stop)
	}
	<-g.done
}

// pause is the Pause hook: once it holds the lock, the helper has finished
// its last command and writes nothing until resume.
func (g *guestSim) pause(ctx context.Context) (func(context.Context) error, error) {
	g.mu.Lock()
	return func(context.Context) error { g.mu.Unlock(); return nil }, nil
}

// sender encodes snapshots and applies them to a replica, as primary and
// secondary agents would over the wire.
type sender struct {
	enc     *memsync.Encoder
	base    *memsync.Base
	replica *memsync.Replica
	frames  int
	bytes   int
}

func (s *sender) send(ctx context.Context, snap *memsync.Snapshot) error {
	frame, _, err := s.enc.Encode(nil, snap, s.base)
	if err != nil {
		return err
	}
	s.frames++
	s.bytes += len(frame)
	epoch, err := s.replica.StageFrame(frame)
	if err != nil {
		return err
	}
	return s.replica.Commit(ctx, epoch)
}

func newSender(t *testing.T, pages int) *sender {
	enc, err := memsync.NewEncoder(memsync.DefaultCodec, 0)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := memsync.OpenReplica(t.TempDir()+"/replica", int64(pages)*memsync.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	return &sender{enc: enc, base: memsync.NewBase(pages), replica: rep}
}

func testPreCopyAndCheckpoints(t *testing.T, kind memsync.Kind) {
	const pages = 4096 // 16 MiB
	r := benchRAM(t, pages)
	// Some zero pages so the full pass has something to skip.
	for i := 0; i < pages; i += 3 {
		clear(r.Page(i))
	}
	g := startGuest(t, r.Path(), pages)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tr, err := memsync.New(ctx, memsync.Config{Kind: kind, PID: g.w.PID(), Region: r})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	s := newSender(t, pages)
	var last memsync.Progress
	res, err := memsync.PreCopy(ctx, r, tr, s.send, memsync.PreCopyOptions{
		Pause: g.pause, BatchPages: 1024, SmallPages: 64, MaxRounds: 10,
		Progress: func(p memsync.Progress) {
			if p.PagesSent < last.PagesSent || p.Round < last.Round || p.RoundDone > p.RoundPages {
				t.Errorf("progress went backwards or overflowed: %+v after %+v", p, last)
			}
			last = p
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pre-copy: %+v, %d frames, %d bytes on the wire", res, s.frames, s.bytes)
	if res.Rounds < 2 || res.PagesSent < pages/2 || last.PagesSent != res.PagesSent || last.Rate <= 0 {
		t.Errorf("pre-copy result %+v, last progress %+v", res, last)
	}
	cp := memsync.NewCapturer(r, 0)
	epoch := res.NextEpoch
	for i := range 5 {
		// Checkpoint: stop the guest, scan, copy, resume, then encode/apply.
		resume, _ := g.pause(ctx)
		d, err := tr.Dirty(ctx)
		if err != nil {
			t.Fatal(err)
		}
		snap, err := cp.Capture(ctx, epoch, d)
		if err != nil {
			t.Fatal(err)
		}
		ram := bytes.Clone(r.Bytes())
		resume(ctx)
		if err := s.send(ctx, snap); err != nil {
			t.Fatal(err)
		}
		snap.Release()
		if !bytes.Equal(readFile(t, s.replica.Path()), ram) {
			t.Fatalf("checkpoint %d (epoch %d, %d dirty pages): replica differs from guest RAM", i, epoch, d.Count())
		}
		epoch++
		time.Sleep(20 * time.Millisecond)
	}
	g.halt()
	if g.err != nil {
		t.Fatal(g.err)
	}
}

// TestPreCopyAndCheckpoints runs the whole memory path against a process
// that keeps writing: pre-copy while it runs, then checkpoints with it
// paused; after each, the replica file must equal guest RAM byte for byte.
func TestPreCopyAndCheckpointsShadow(t *testing.T) {
	testPreCopyAndCheckpoints(t, memsync.KindShadow)
}

func TestPreCopyAndCheckpointsSoftDirty(t *testing.T) {
	if err := memsync.ProbeSoftDirty(); err != nil {
		t.Skipf("soft-dirty unsupported on this kernel: %v", err)
	}
	testPreCopyAndCheckpoints(t, memsync.KindSoftDirty)
}

// fakeTracker returns dirty sets of scripted sizes, to test PreCopy's
// stopping rules.
type fakeTracker struct {
	n      int
	sizes  []int
	begins int
	dirty  int
}

func (f *fakeTracker) Begin(context.Context) error { f.begins++; return nil }
func (f *fakeTracker) Dirty(context.Context) (*memsync.Bitmap, error) {
	b := memsync.NewBitmap(f.n)
	size := f.sizes[min(f.dirty, len(f.sizes)-1)]
	f.dirty++
	for i := range size {
		b.Set(i)
	}
	return b, nil
}
func (f *fakeTracker) Kind() memsync.Kind { return "fake" }
func (f *fakeTracker) Close() error       { return nil }

func TestPreCopyStoppingRules(t *testing.T) {
	const n = 2048
	src := memPages(make([]byte, n*memsync.PageSize))
	for i := 0; i < n; i += 2 {
		src.Page(i)[7] = 1
	}
	pauses := 0
	pause := func(context.Context) (func(context.Context) error, error) {
		pauses++
		return func(context.Context) error { return nil }, nil
	}
	cases := []struct {
		name      string
		sizes     []int
		rounds    int
		converged bool
	}{
		{"quiet guest", []int{0}, 2, true},
		{"converges", []int{900, 500, 100, 10}, 5, true},
		{"stops shrinking", []int{900, 800, 850, 10}, 4, false},
		{"max rounds", []int{1000, 999, 998, 997, 996, 995, 994, 993, 992, 991}, 6, false},
	}
	for _, c := range cases {
		ft := &fakeTracker{n: n, sizes: c.sizes}
		pauses = 0
		sent := 0
		res, err := memsync.PreCopy(context.Background(), src, ft, func(_ context.Context, s *memsync.Snapshot) error {
			sent += len(s.Pages)
			return nil
		}, memsync.PreCopyOptions{Pause: pause, SmallPages: 50, MaxRounds: 6, BatchPages: 300})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		want := n / 2
		for i := range c.rounds - 1 {
			want += c.sizes[min(i, len(c.sizes)-1)]
		}
		if res.Rounds != c.rounds || res.Converged != c.converged || sent != want || res.PagesSent != want {
			t.Errorf("%s: %+v, sent %d; want %d rounds, converged %v, %d pages", c.name, res, sent, c.rounds, c.converged, want)
		}
		if pauses != ft.begins+ft.dirty {
			t.Errorf("%s: %d pauses for %d Begin + %d Dirty", c.name, pauses, ft.begins, ft.dirty)
		}
		if wantEpoch := uint64(1 + (n/2+299)/300); res.NextEpoch < wantEpoch {
			t.Errorf("%s: next epoch %d, want at least %d", c.name, res.NextEpoch, wantEpoch)
		}
	}
	_, err := memsync.PreCopy(context.Background(), src, &fakeTracker{n: n, sizes: []int{0}},
		func(context.Context, *memsync.Snapshot) error { return nil }, memsync.PreCopyOptions{})
	if !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("tracker that is not live-safe without Pause: %v", err)
	}
	boom := errors.New("link down")
	_, err = memsync.PreCopy(context.Background(), src, &fakeTracker{n: n, sizes: []int{0}},
		func(context.Context, *memsync.Snapshot) error { return boom }, memsync.PreCopyOptions{Pause: pause})
	if !errors.Is(err, boom) {
		t.Errorf("send error not returned: %v", err)
	}
}
