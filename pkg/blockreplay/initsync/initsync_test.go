package initsync

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
)

const size = 16 << 20

func fileWith(t *testing.T, name string, fill func(f *os.File)) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	fill(f)
	f.Close()
	return p
}

// syncUnderLoad runs an initial sync of primary (a Log over local) to a
// replica file while writers hammer the primary, and returns the replica's
// bytes once everything was applied.
func syncUnderLoad(t *testing.T, local backend.Backend, opt Options, seed uint64) ([]byte, *Syncer) {
	t.Helper()
	ctx := context.Background()
	replicaPath := fileWith(t, "replica.raw", func(f *os.File) {
		// Garbage: the sync must not rely on a zeroed replica.
		f.WriteAt(bytes.Repeat([]byte{0xa5}, size), 0)
	})
	img, err := backend.OpenFile(replicaPath, backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	r, err := replay.Open(ctx, img, filepath.Join(t.TempDir(), "state"), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()

	pipe := eventlog.NewPipe(2 << 20) // small: the sync must live with back-pressure
	l := eventlog.New(local, pipe, eventlog.Options{})
	pumped := make(chan error, 1)
	go func() { pumped <- replay.Pump(ctx, pipe, r, true) }()

	var stop atomic.Bool
	var writes atomic.Int64
	// However the scheduler treats the writers on a loaded machine, some
	// of their writes must land while the copy is under way: after the
	// first chunk, the copy waits until they have made a few.
	var waited atomic.Bool
	userProgress := opt.OnProgress
	opt.OnProgress = func(p Progress) {
		if userProgress != nil {
			userProgress(p)
		}
		if waited.Swap(true) {
			return
		}
		base, deadline := writes.Load(), time.Now().Add(10*time.Second)
		for writes.Load() < base+3 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	s := New(l, local, opt)
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			for !stop.Load() {
				// Aim near the copy front, where the races are.
				front := s.Progress().Done
				off := max(0, min(size-1, front+rng.Int64N(1<<20)-(512<<10)))
				n := 1 + rng.Int64N(min(96<<10, size-off))
				var err error
				switch rng.IntN(4) {
				case 0, 1:
					b := bytes.Repeat([]byte{byte(1 + rng.IntN(255))}, int(n))
					err = l.WriteAt(ctx, b, off, 0)
				case 2:
					err = l.Trim(ctx, off, n, 0)
				case 3:
					err = l.WriteZeroes(ctx, off, n, 0)
				}
				if err != nil {
					t.Error(err)
					return
				}
				writes.Add(1)
			}
		})
	}
	if err := s.Run(ctx); err != nil {
		t.Fatal(err)
	}
	stop.Store(true)
	wg.Wait()
	if writes.Load() == 0 {
		t.Fatal("no concurrent writes happened: the test proves nothing")
	}
	if _, _, err := l.MarkEpoch(ctx); err != nil {
		t.Fatal(err)
	}
	pipe.Close()
	if err := <-pumped; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d concurrent writes during the sync; %s", writes.Load(), s.Progress())
	got, err := os.ReadFile(replicaPath)
	if err != nil {
		t.Fatal(err)
	}
	return got, s
}

func TestSyncUnderConcurrentWritesFile(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	primPath := fileWith(t, "primary.raw", func(f *os.File) {
		// Sparse: data islands with holes between, and a zero-filled but
		// allocated region that only zero detection can skip.
		for _, o := range []int64{0, 3 << 20, 7<<20 + 4096, 12 << 20} {
			b := make([]byte, 700<<10)
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			f.WriteAt(b, o)
		}
		f.WriteAt(make([]byte, 1<<20), 14<<20)
	})
	prim, err := backend.OpenFile(primPath, backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer prim.Close()
	for round := range 3 {
		got, s := syncUnderLoad(t, prim, Options{ChunkSize: 64 << 10, EpochBytes: 1 << 20}, uint64(round))
		want, err := os.ReadFile(primPath)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("round %d: replica differs from the primary after the sync", round)
		}
		p := s.Progress()
		if p.Done != size || p.Total != size || p.ETA != 0 || p.Rate <= 0 {
			t.Errorf("final progress %+v", p)
		}
		if round == 0 && p.Sent >= size {
			t.Errorf("zero regions were not skipped: sent %d of %d", p.Sent, size)
		}
	}
}

// TestSyncUnderConcurrentWritesMem covers the path without SEEK_DATA, where
// zero chunks are found by reading them.
func TestSyncUnderConcurrentWritesMem(t *testing.T) {
	m := backend.NewMem(size)
	rng := rand.New(rand.NewPCG(2, 2))
	b := make([]byte, 2<<20)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	m.WriteAt(context.Background(), b, 5<<20, 0)
	var calls atomic.Int64
	got, s := syncUnderLoad(t, m, Options{ChunkSize: 128 << 10, EpochBytes: 2 << 20,
		OnProgress: func(Progress) { calls.Add(1) }}, 7)
	if !bytes.Equal(got, m.Snapshot()) {
		t.Fatal("replica differs from the primary after the sync")
	}
	if calls.Load() < size/(128<<10) {
		t.Errorf("progress reported %d times", calls.Load())
	}
	if s.Progress().Sent >= size {
		t.Errorf("zero chunks were sent: %d bytes", s.Progress().Sent)
	}
}
