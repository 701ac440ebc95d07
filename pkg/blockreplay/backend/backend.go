// Package backend owns the storage interface that the NBD server exports and
// the event log wraps, and its two implementations: a raw image file (with
// optional O_DIRECT) and an in-memory disk for tests and reference images.
package backend

import (
	"context"
	"errors"
	"fmt"
)

// Flags modify a write-class operation.
type Flags uint8

const (
	// FUA asks for the operation's data to be durable before it returns.
	FUA Flags = 1 << iota
	// NoHole asks WriteZeroes to keep the range allocated (no hole punch).
	NoHole
)

// Sentinel errors; implementations wrap them with %w.
var (
	// ErrOutOfRange means an operation touched bytes past the end of the disk.
	ErrOutOfRange = errors.New("range outside the disk")
	// ErrReadOnly means a write-class operation hit a read-only disk.
	ErrReadOnly = errors.New("disk is read-only")
	// ErrClosed means the backend was used after Close.
	ErrClosed = errors.New("backend closed")
)

// Backend is a fixed-size disk. Implementations are safe for concurrent use;
// the caller orders overlapping operations (the NBD server and the event log
// both do, see rangelock), so a backend need not.
type Backend interface {
	// Size is the disk size in bytes; it never changes.
	Size() int64
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, fl Flags) error
	// Trim discards a range. Implementations make it read back as zeroes,
	// so a primary and a replica that replay the same trims stay equal.
	Trim(ctx context.Context, off, n int64, fl Flags) error
	// WriteZeroes makes a range read back as zeroes; NoHole keeps it allocated.
	WriteZeroes(ctx context.Context, off, n int64, fl Flags) error
	// Flush returns once every completed write is durable.
	Flush(ctx context.Context) error
}

// CheckRange returns ErrOutOfRange (wrapped, naming the range) unless
// [off, off+n) lies inside a disk of the given size.
func CheckRange(size, off, n int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("offset %d length %d on a %d-byte disk: %w", off, n, size, ErrOutOfRange)
	}
	return nil
}
