package backend

import (
	"context"
	"sync"
)

// Mem is an in-memory disk. It is the reference model in tests: replay a
// sequence of operations on Mem and on a real file and compare.
type Mem struct {
	mu      sync.RWMutex
	data    []byte
	flushes int
}

// NewMem returns a zero-filled disk of size bytes.
func NewMem(size int64) *Mem { return &Mem{data: make([]byte, size)} }

// Size implements Backend.
func (m *Mem) Size() int64 { return int64(len(m.data)) }

// ReadAt implements Backend.
func (m *Mem) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := CheckRange(m.Size(), off, int64(len(p))); err != nil {
		return err
	}
	m.mu.RLock()
	copy(p, m.data[off:])
	m.mu.RUnlock()
	return nil
}

// WriteAt implements Backend.
func (m *Mem) WriteAt(_ context.Context, p []byte, off int64, fl Flags) error {
	if err := CheckRange(m.Size(), off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	copy(m.data[off:], p)
	if fl&FUA != 0 {
		m.flushes++
	}
	m.mu.Unlock()
	return nil
}

// Trim implements Backend.
func (m *Mem) Trim(ctx context.Context, off, n int64, fl Flags) error {
	return m.WriteZeroes(ctx, off, n, fl)
}

// WriteZeroes implements Backend.
func (m *Mem) WriteZeroes(_ context.Context, off, n int64, fl Flags) error {
	if err := CheckRange(m.Size(), off, n); err != nil {
		return err
	}
	m.mu.Lock()
	clear(m.data[off : off+n])
	if fl&FUA != 0 {
		m.flushes++
	}
	m.mu.Unlock()
	return nil
}

// Flush implements Backend.
func (m *Mem) Flush(context.Context) error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

// Snapshot returns a copy of the whole disk.
func (m *Mem) Snapshot() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

// FlushCount is the number of Flush calls plus FUA operations so far; tests
// use it to see that durability was asked for.
func (m *Mem) FlushCount() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.flushes
}
