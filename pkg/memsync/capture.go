package memsync

import (
	"context"
	"fmt"
	"runtime"
	"sync"
)

// Snapshot is a copy of some guest pages taken during a pause: what the
// primary will encode and send for one epoch (or one pre-copy batch).
type Snapshot struct {
	// Epoch the pages belong to.
	Epoch uint64
	// Pages are the page indices, strictly increasing.
	Pages []int
	// Data holds the pages' bytes, PageSize each, in the order of Pages.
	Data []byte

	owner *Capturer
}

// Page returns the content of the k-th captured page (page Pages[k]).
func (s *Snapshot) Page(k int) []byte {
	return s.Data[k*PageSize : (k+1)*PageSize : (k+1)*PageSize]
}

// Bytes is the captured payload size.
func (s *Snapshot) Bytes() int { return len(s.Data) }

// Release hands the buffer back to its Capturer for reuse. The snapshot
// must not be used afterwards.
func (s *Snapshot) Release() {
	if s.owner != nil {
		s.owner.put(s.Data)
		s.owner = nil
	}
	s.Data, s.Pages = nil, nil
}

// Capturer copies dirty pages out of guest RAM into send buffers, reusing
// buffers that were Released so the pause does no large allocation.
type Capturer struct {
	src     Pages
	workers int

	mu   sync.Mutex
	free [][]byte
}

// parallelCopyPages is the dirty-set size above which Capture copies with
// several goroutines; below it the goroutine start-up costs more than it
// saves.
const parallelCopyPages = 2048

// NewCapturer copies from src (normally the guest RAM Region).
func NewCapturer(src Pages, workers int) *Capturer {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	return &Capturer{src: src, workers: workers}
}

func (c *Capturer) get(n int) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, b := range c.free {
		if cap(b) >= n {
			c.free = append(c.free[:i], c.free[i+1:]...)
			return b[:n]
		}
	}
	// Slack so that a slightly larger dirty set next epoch still fits and
	// the pause does not pay for faulting in a fresh buffer.
	return make([]byte, n, n+n/4+PageSize)
}

func (c *Capturer) put(b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.free) < 4 {
		c.free = append(c.free, b)
	}
}

// Capture copies the pages in dirty into a Snapshot. It is the only work
// besides the dirty scan meant to happen while the VM is stopped: a memcpy,
// no encoding.
func (c *Capturer) Capture(ctx context.Context, epoch uint64, dirty *Bitmap) (*Snapshot, error) {
	if dirty.Len() != c.src.NumPages() {
		return nil, fmt.Errorf("%w: dirty set for %d pages, RAM has %d", ErrBadInput, dirty.Len(), c.src.NumPages())
	}
	return c.capturePages(ctx, epoch, dirty.Pages())
}

// CapturePages is Capture for an explicit, strictly increasing page list.
func (c *Capturer) CapturePages(ctx context.Context, epoch uint64, pages []int) (*Snapshot, error) {
	n := c.src.NumPages()
	for k, p := range pages {
		if p < 0 || p >= n || (k > 0 && p <= pages[k-1]) {
			return nil, fmt.Errorf("%w: page list not strictly increasing within [0,%d) at %d (page %d)", ErrBadInput, n, k, p)
		}
	}
	return c.capturePages(ctx, epoch, pages)
}

func (c *Capturer) capturePages(ctx context.Context, epoch uint64, pages []int) (*Snapshot, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s := &Snapshot{Epoch: epoch, Pages: pages, Data: c.get(len(pages) * PageSize), owner: c}
	copyRange := func(lo, hi int) {
		for k := lo; k < hi; k++ {
			copy(s.Data[k*PageSize:(k+1)*PageSize], c.src.Page(pages[k]))
		}
	}
	w := c.workers
	if len(pages) < parallelCopyPages || w < 2 {
		copyRange(0, len(pages))
		return s, nil
	}
	var wg sync.WaitGroup
	per := (len(pages) + w - 1) / w
	for lo := 0; lo < len(pages); lo += per {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			copyRange(lo, hi)
		}(lo, min(lo+per, len(pages)))
	}
	wg.Wait()
	return s, nil
}

// Base is the primary's record of what the secondary holds for each page
// (the "last sent" version), the left side of every XOR delta. It starts all
// zero, like a freshly created replica file. Memory cost: one RAM size
// (Go's fresh allocation stays untouched, so never-sent zero pages cost no
// resident memory).
type Base struct {
	mem []byte
}

// NewBase returns an all-zero base for pages pages.
func NewBase(pages int) *Base { return &Base{mem: make([]byte, pages*PageSize)} }

// NumPages is the number of pages.
func (b *Base) NumPages() int { return len(b.mem) / PageSize }

// Page returns page i of the base.
func (b *Base) Page(i int) []byte {
	return b.mem[i*PageSize : (i+1)*PageSize : (i+1)*PageSize]
}
