package memsync

import (
	"bytes"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// PageSize is the tracking granularity: the x86-64 base page, which is also
// the unit of /proc/PID/pagemap.
const PageSize = 4096

// Pages gives read access to page-sized slices of some memory: a Region, a
// shadow copy, a Base.
type Pages interface {
	// NumPages is the number of pages.
	NumPages() int
	// Page returns page i; the slice has length and capacity PageSize.
	Page(i int) []byte
}

// Region is a guest RAM file mapped MAP_SHARED into this process, so reads
// see the guest's writes and (if writable) writes reach the file.
type Region struct {
	path string
	mem  []byte
}

// OpenRegion maps the whole file at path. The file size must be a non-zero
// multiple of PageSize.
func OpenRegion(path string, writable bool) (*Region, error) {
	flag, prot := os.O_RDONLY, unix.PROT_READ
	if writable {
		flag, prot = os.O_RDWR, unix.PROT_READ|unix.PROT_WRITE
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open guest RAM %s: %w", ErrBadInput, path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: stat %s: %w", ErrBadInput, path, err)
	}
	size := st.Size()
	if size <= 0 || size%PageSize != 0 {
		return nil, fmt.Errorf("%w: guest RAM %s has size %d, not a non-zero multiple of %d", ErrBadInput, path, size, PageSize)
	}
	if int64(int(size)) != size {
		return nil, fmt.Errorf("%w: guest RAM %s too large to map (%d bytes)", ErrBadInput, path, size)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%w: mmap %s: %w", ErrBadInput, path, err)
	}
	return &Region{path: path, mem: mem}, nil
}

// Path is the file this region maps.
func (r *Region) Path() string { return r.path }

// Size is the mapped length in bytes.
func (r *Region) Size() int { return len(r.mem) }

// NumPages is Size()/PageSize.
func (r *Region) NumPages() int { return len(r.mem) / PageSize }

// Bytes is the whole mapping. It is invalid after Close.
func (r *Region) Bytes() []byte { return r.mem }

// Page returns page i of the mapping.
func (r *Region) Page(i int) []byte {
	off := i * PageSize
	return r.mem[off : off+PageSize : off+PageSize]
}

// Sync flushes writes to the file (msync MS_SYNC). On tmpfs this only
// orders; on a disk-backed file it makes the data durable.
func (r *Region) Sync() error {
	if r.mem == nil {
		return ErrClosed
	}
	if err := unix.Msync(r.mem, unix.MS_SYNC); err != nil {
		return fmt.Errorf("msync %s: %w", r.path, err)
	}
	return nil
}

// Close unmaps the file. Closing twice is harmless.
func (r *Region) Close() error {
	if r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem = nil
	if err != nil {
		return fmt.Errorf("munmap %s: %w", r.path, err)
	}
	return nil
}

var zeroPage [PageSize]byte

// isZero reports whether p is all zero bytes. bytes.Equal against a zero
// page runs the runtime's vectorised memequal, several times faster than a
// byte or word loop.
func isZero(p []byte) bool {
	for len(p) >= PageSize {
		if !bytes.Equal(p[:PageSize], zeroPage[:]) {
			return false
		}
		p = p[PageSize:]
	}
	return bytes.Equal(p, zeroPage[:len(p)])
}
