package memsync

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
)

// chunkPages is the unit of work handed to one scan worker: 1 MiB, a
// multiple of 64 so that each worker owns whole Bitmap words and sets bits
// without atomics.
const chunkPages = 256

// Shadow is the portable tracker: it keeps a private copy of guest RAM and
// reports the pages whose content differs from it. Memory cost: one RAM
// size. It reports exactly the pages whose bytes changed (a write of the
// same value is not a change), on any kernel and accelerator.
type Shadow struct {
	src     Pages
	shadow  []byte
	workers int
	begun   bool
	closed  bool
}

// NewShadow returns a shadow tracker over src (normally a *Region) using up
// to workers goroutines (0: GOMAXPROCS).
func NewShadow(src Pages, workers int) *Shadow {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	return &Shadow{src: src, workers: workers}
}

// Kind is KindShadow.
func (s *Shadow) Kind() Kind { return KindShadow }

// LiveSafe is true: a write racing with the compare makes the page differ
// from the shadow at the next Dirty, so nothing is lost while the guest runs.
func (s *Shadow) LiveSafe() bool { return true }

// Source is the shadow copy: during a live copy it is what Dirty's result
// is relative to.
func (s *Shadow) Source() Pages { return shadowPages{s} }

type shadowPages struct{ s *Shadow }

func (p shadowPages) NumPages() int { return len(p.s.shadow) / PageSize }
func (p shadowPages) Page(i int) []byte {
	off := i * PageSize
	return p.s.shadow[off : off+PageSize : off+PageSize]
}

// Begin copies all of guest RAM into the shadow (allocating it on first use).
func (s *Shadow) Begin(ctx context.Context) error {
	if s.closed {
		return ErrClosed
	}
	n := s.src.NumPages()
	if len(s.shadow) != n*PageSize {
		s.shadow = make([]byte, n*PageSize)
	}
	err := s.parallel(ctx, n, func(lo, hi int, _ *Bitmap) {
		for i := lo; i < hi; i++ {
			copy(s.shadow[i*PageSize:(i+1)*PageSize], s.src.Page(i))
		}
	}, nil)
	if err != nil {
		return err
	}
	s.begun = true
	return nil
}

// Dirty compares every page with the shadow, in parallel, and copies the
// pages that differ into the shadow.
func (s *Shadow) Dirty(ctx context.Context) (*Bitmap, error) {
	if s.closed {
		return nil, ErrClosed
	}
	if !s.begun {
		return nil, fmt.Errorf("%w: Dirty before Begin", ErrBadInput)
	}
	n := s.src.NumPages()
	if n*PageSize != len(s.shadow) {
		return nil, fmt.Errorf("%w: guest RAM changed size from %d to %d pages", ErrBadInput, len(s.shadow)/PageSize, n)
	}
	dirty := NewBitmap(n)
	err := s.parallel(ctx, n, func(lo, hi int, bm *Bitmap) {
		for i := lo; i < hi; i++ {
			sh := s.shadow[i*PageSize : (i+1)*PageSize]
			p := s.src.Page(i)
			if !bytes.Equal(p, sh) {
				copy(sh, p)
				bm.words[i>>6] |= 1 << (uint(i) & 63)
			}
		}
	}, dirty)
	if err != nil {
		return nil, err
	}
	return dirty, nil
}

// parallel runs fn over [0,n) in chunkPages pieces on s.workers goroutines,
// checking ctx between chunks so a cancelled scan stops quickly.
func (s *Shadow) parallel(ctx context.Context, n int, fn func(lo, hi int, bm *Bitmap), bm *Bitmap) error {
	chunks := (n + chunkPages - 1) / chunkPages
	w := min(s.workers, chunks)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				c := int(next.Add(1) - 1)
				if c >= chunks {
					return
				}
				lo := c * chunkPages
				fn(lo, min(lo+chunkPages, n), bm)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		// A cancelled Dirty leaves the shadow partly updated: pages already
		// copied are dropped from this result, so the next interval must
		// start from a fresh Begin.
		s.begun = false
		return fmt.Errorf("memsync: shadow scan: %w", err)
	}
	return nil
}

// Close drops the shadow copy.
func (s *Shadow) Close() error {
	s.closed = true
	s.shadow = nil
	return nil
}
