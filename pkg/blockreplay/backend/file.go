package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Align is the buffer, offset and length alignment O_DIRECT needs here.
// 4096 covers both 512-byte and 4K-native devices.
const Align = 4096

// FileOptions configure OpenFile.
type FileOptions struct {
	// ReadOnly opens the image read-only; write-class calls fail with ErrReadOnly.
	ReadOnly bool
	// Direct opens a second descriptor with O_DIRECT and sends every aligned
	// request (offset, length and buffer on Align) through it; unaligned
	// requests go through the page cache. Linux keeps the two coherent for
	// non-concurrent access to the same range (direct I/O writes back and
	// invalidates the cached range), and callers never overlap concurrent
	// operations, so the mix is safe.
	Direct bool
}

// File is a raw image file.
type File struct {
	f, direct *os.File
	size      int64
	ro        bool
	closed    atomic.Bool
	// punch and zeroRange remember that the filesystem refused a fallocate
	// mode, so the fallback is taken at once next time.
	noPunch, noZeroRange atomic.Bool
}

// OpenFile opens a raw image. Its current length is the disk size.
func OpenFile(path string, opt FileOptions) (*File, error) {
	flag := os.O_RDWR
	if opt.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open image: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat image %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("image %s is not a regular file", path)
	}
	b := &File{f: f, size: st.Size(), ro: opt.ReadOnly}
	if opt.Direct {
		d, err := os.OpenFile(path, flag|unix.O_DIRECT, 0)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("open image with O_DIRECT: %w", err)
		}
		b.direct = d
	}
	return b, nil
}

// Size implements Backend.
func (b *File) Size() int64 { return b.size }

// Fd exposes the buffered descriptor for SEEK_DATA/SEEK_HOLE scans.
func (b *File) Fd() uintptr { return b.f.Fd() }

// Close closes the image.
func (b *File) Close() error {
	if b.closed.Swap(true) {
		return nil
	}
	err := b.f.Close()
	if b.direct != nil {
		err = errors.Join(err, b.direct.Close())
	}
	return err
}

func aligned(p []byte, off int64) bool {
	if len(p) == 0 || off%Align != 0 || len(p)%Align != 0 {
		return false
	}
	return uintptr(unsafe.Pointer(&p[0]))%Align == 0
}

// pick chooses the descriptor for a data transfer.
func (b *File) pick(p []byte, off int64) *os.File {
	if b.direct != nil && aligned(p, off) {
		return b.direct
	}
	return b.f
}

func (b *File) check(off, n int64, write bool) error {
	if b.closed.Load() {
		return ErrClosed
	}
	if write && b.ro {
		return ErrReadOnly
	}
	return CheckRange(b.size, off, n)
}

// ReadAt implements Backend.
func (b *File) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := b.check(off, int64(len(p)), false); err != nil {
		return err
	}
	n, err := b.pick(p, off).ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	if err == io.EOF {
		// The file shrank under us; the disk size is fixed, so read zeroes.
		clear(p[n:])
		err = nil
	}
	if err != nil {
		return fmt.Errorf("read %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

// WriteAt implements Backend.
func (b *File) WriteAt(_ context.Context, p []byte, off int64, fl Flags) error {
	if err := b.check(off, int64(len(p)), true); err != nil {
		return err
	}
	if _, err := b.pick(p, off).WriteAt(p, off); err != nil {
		return fmt.Errorf("write %d bytes at %d: %w", len(p), off, err)
	}
	return b.fua(fl)
}

func (b *File) fua(fl Flags) error {
	if fl&FUA == 0 {
		return nil
	}
	return b.sync()
}

func (b *File) sync() error {
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync image: %w", err)
	}
	return nil
}

// Trim implements Backend: it punches a hole, or writes zeroes where the
// filesystem cannot, so the range always reads back as zeroes.
func (b *File) Trim(ctx context.Context, off, n int64, fl Flags) error {
	return b.WriteZeroes(ctx, off, n, fl&^NoHole)
}

// WriteZeroes implements Backend.
func (b *File) WriteZeroes(_ context.Context, off, n int64, fl Flags) error {
	if err := b.check(off, n, true); err != nil {
		return err
	}
	if n == 0 {
		return b.fua(fl)
	}
	done := false
	if fl&NoHole == 0 && !b.noPunch.Load() {
		done = b.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n, &b.noPunch)
	}
	if !done && !b.noZeroRange.Load() {
		done = b.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n, &b.noZeroRange)
	}
	if !done {
		if err := b.writeZeroes(off, n); err != nil {
			return err
		}
	}
	return b.fua(fl)
}

// fallocate reports whether the mode worked; a refusal marks it unsupported.
func (b *File) fallocate(mode uint32, off, n int64, unsupported *atomic.Bool) bool {
	err := unix.Fallocate(int(b.f.Fd()), mode, off, n)
	if err == nil {
		return true
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) {
		unsupported.Store(true)
	}
	return false
}

var zeroes = make([]byte, 1<<20)

func (b *File) writeZeroes(off, n int64) error {
	for n > 0 {
		c := min(n, int64(len(zeroes)))
		if _, err := b.f.WriteAt(zeroes[:c], off); err != nil {
			return fmt.Errorf("write zeroes at %d: %w", off, err)
		}
		off += c
		n -= c
	}
	return nil
}

// Flush implements Backend.
func (b *File) Flush(context.Context) error {
	if b.closed.Load() {
		return ErrClosed
	}
	return b.sync()
}

// SeekData returns the start of the first data region at or after off and
// the hole that ends it, using SEEK_DATA/SEEK_HOLE. ok is false when the
// filesystem cannot tell (callers then treat everything as data). A disk
// with no data after off returns (size, size, true).
func (b *File) SeekData(off int64) (data, hole int64, ok bool) {
	fd := int(b.f.Fd())
	d, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return b.size, b.size, true
	}
	if err != nil {
		return off, b.size, false
	}
	h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
	if err != nil {
		return off, b.size, false
	}
	return min(d, b.size), min(h, b.size), true
}

// AlignedBuf returns a zeroed buffer of n bytes whose start is Align-aligned,
// so O_DIRECT can use it without a bounce copy.
func AlignedBuf(n int) []byte {
	raw := make([]byte, n+Align)
	shift := int((Align - uintptr(unsafe.Pointer(&raw[0]))%Align) % Align)
	return raw[shift : shift+n : shift+n]
}
