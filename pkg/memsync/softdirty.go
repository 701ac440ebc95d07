package memsync

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmSoftDirty = 1 << 55
	pmEntrySize = 8
	// pagemapChunk is how many bytes of pagemap one read fetches: 1 MiB
	// describes 512 MiB of RAM, so a 256 MiB guest is one read.
	pagemapChunk = 1 << 20
	// clearSoftDirty is the clear_refs command that clears soft-dirty bits.
	clearSoftDirty = "4"
)

var probeOnce = sync.OnceValue(probeSoftDirty)

// ProbeSoftDirty reports whether soft-dirty tracking really works on this
// kernel; the result is computed once per process. Some kernels (without
// CONFIG_MEM_SOFT_DIRTY) accept the write to clear_refs and do nothing, and
// never set bit 55: the probe dirties a private page, clears, checks the bit
// went to 0, writes again, and checks it came back to 1. The error wraps
// ErrUnsupported and says which step failed.
func ProbeSoftDirty() error { return probeOnce() }

func probeSoftDirty() error {
	if os.Getpagesize() != PageSize {
		return fmt.Errorf("%w: soft-dirty: page size %d, want %d", ErrUnsupported, os.Getpagesize(), PageSize)
	}
	mem, err := unix.Mmap(-1, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("%w: soft-dirty probe: mmap: %w", ErrUnsupported, err)
	}
	defer unix.Munmap(mem)
	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return fmt.Errorf("%w: soft-dirty probe: %w", ErrUnsupported, err)
	}
	defer pm.Close()
	addr := uintptr(unsafe.Pointer(&mem[0]))
	bit := func() (bool, error) {
		var e [pmEntrySize]byte
		if _, err := pm.ReadAt(e[:], int64(addr/PageSize)*pmEntrySize); err != nil {
			return false, err
		}
		return binary.LittleEndian.Uint64(e[:])&pmSoftDirty != 0, nil
	}
	clearRefs := func() error {
		return os.WriteFile("/proc/self/clear_refs", []byte(clearSoftDirty), 0)
	}

	mem[0] = 1
	if err := clearRefs(); err != nil {
		return fmt.Errorf("%w: soft-dirty probe: write clear_refs: %w", ErrUnsupported, err)
	}
	set, err := bit()
	if err != nil {
		return fmt.Errorf("%w: soft-dirty probe: read pagemap: %w", ErrUnsupported, err)
	}
	if set {
		return fmt.Errorf("%w: soft-dirty: clear_refs is a no-op on this kernel (bit 55 still set after clearing)", ErrUnsupported)
	}
	mem[0] = 2
	if set, err = bit(); err != nil {
		return fmt.Errorf("%w: soft-dirty probe: read pagemap: %w", ErrUnsupported, err)
	}
	if !set {
		return fmt.Errorf("%w: soft-dirty: bit 55 never set after a write (kernel without CONFIG_MEM_SOFT_DIRTY?)", ErrUnsupported)
	}
	return nil
}

// segment is one mapping of (part of) the guest RAM file in the target.
type segment struct {
	va     uint64 // start address in the target
	pgoff  int    // first file page it maps
	npages int
}

// SoftDirty tracks guest writes through the soft-dirty bits of the QEMU
// process's page tables. It reads 8 bytes of pagemap per guest page and
// keeps no copy of RAM. Reading and clearing are separate steps, so Dirty
// must be called with the VM stopped.
type SoftDirty struct {
	pid       int
	region    *Region
	segs      []segment
	pagemap   *os.File
	clearRefs *os.File
	buf       []byte
	begun     bool
}

// NewSoftDirty returns a soft-dirty tracker for the guest RAM file mapped by
// region, as mapped in process pid. It does not probe the kernel; New does.
func NewSoftDirty(ctx context.Context, pid int, region *Region) (*SoftDirty, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("%w: soft-dirty needs the QEMU pid, got %d", ErrBadInput, pid)
	}
	if region == nil {
		return nil, fmt.Errorf("%w: soft-dirty needs the guest RAM region", ErrBadInput)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	segs, err := findMappings(pid, region.Path(), region.NumPages())
	if err != nil {
		return nil, err
	}
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return nil, fmt.Errorf("%w: soft-dirty: %w", ErrNotFound, err)
	}
	cr, err := os.OpenFile(fmt.Sprintf("/proc/%d/clear_refs", pid), os.O_WRONLY, 0)
	if err != nil {
		pm.Close()
		return nil, fmt.Errorf("%w: soft-dirty: %w", ErrUnsupported, err)
	}
	return &SoftDirty{pid: pid, region: region, segs: segs, pagemap: pm, clearRefs: cr,
		buf: make([]byte, pagemapChunk)}, nil
}

// findMappings parses /proc/PID/maps for shared mappings of the file at
// path (matched by device and inode, so renames and "(deleted)" suffixes do
// not matter) and checks that together they cover all npages file pages.
func findMappings(pid int, path string, npages int) ([]segment, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("%w: stat guest RAM %s: %w", ErrBadInput, path, err)
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, fmt.Errorf("%w: process %d: %w", ErrNotFound, pid, err)
	}
	defer f.Close()
	segs, err := parseMaps(f, unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	if err != nil {
		return nil, err
	}
	if len(segs) == 0 {
		return nil, fmt.Errorf("%w: process %d has no shared mapping of %s", ErrNotFound, pid, path)
	}
	covered := NewBitmap(npages)
	for _, s := range segs {
		for i := s.pgoff; i < s.pgoff+s.npages && i < npages; i++ {
			covered.Set(i)
		}
	}
	if c := covered.Count(); c != npages {
		return nil, fmt.Errorf("%w: process %d maps only %d of %d pages of %s", ErrNotFound, pid, c, npages, path)
	}
	return segs, nil
}

// parseMaps returns the writable shared mappings of the file with the given device
// and inode from a /proc/PID/maps listing.
func parseMaps(r io.Reader, major, minor uint32, ino uint64) ([]segment, error) {
	var segs []segment
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// start-end perms offset major:minor inode [path]
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		if i, err := strconv.ParseUint(fields[4], 10, 64); err != nil || i != ino {
			continue
		}
		maj, min, ok := strings.Cut(fields[3], ":")
		if !ok {
			continue
		}
		ma, err1 := strconv.ParseUint(maj, 16, 32)
		mi, err2 := strconv.ParseUint(min, 16, 32)
		if err1 != nil || err2 != nil || uint32(ma) != major || uint32(mi) != minor {
			continue
		}
		if len(fields[1]) < 4 || fields[1][1] != 'w' || fields[1][3] != 's' {
			continue // a read-only or private mapping cannot change the file
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			return nil, fmt.Errorf("%w: maps line %q", ErrCorrupt, sc.Text())
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		off, err3 := strconv.ParseUint(fields[2], 16, 64)
		if err := errors.Join(err1, err2, err3); err != nil || end <= start || start%PageSize != 0 || end%PageSize != 0 || off%PageSize != 0 {
			return nil, fmt.Errorf("%w: maps line %q", ErrCorrupt, sc.Text())
		}
		segs = append(segs, segment{va: start, pgoff: int(off / PageSize), npages: int((end - start) / PageSize)})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("memsync: read maps: %w", err)
	}
	return segs, nil
}

// Kind is KindSoftDirty.
func (t *SoftDirty) Kind() Kind { return KindSoftDirty }

// Begin clears the target's soft-dirty bits.
func (t *SoftDirty) Begin(ctx context.Context) error {
	if t.pagemap == nil {
		return ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := t.clear(); err != nil {
		return err
	}
	t.begun = true
	return nil
}

func (t *SoftDirty) clear() error {
	if _, err := t.clearRefs.Write([]byte(clearSoftDirty)); err != nil {
		return fmt.Errorf("memsync: clear soft-dirty of process %d: %w", t.pid, err)
	}
	return nil
}

// Dirty reads bit 55 of the target's pagemap over the guest-RAM mapping,
// then clears the bits for the next interval.
func (t *SoftDirty) Dirty(ctx context.Context) (*Bitmap, error) {
	if t.pagemap == nil {
		return nil, ErrClosed
	}
	if !t.begun {
		return nil, fmt.Errorf("%w: Dirty before Begin", ErrBadInput)
	}
	n := t.region.NumPages()
	dirty := NewBitmap(n)
	perRead := len(t.buf) / pmEntrySize
	for _, s := range t.segs {
		for j := 0; j < s.npages; j += perRead {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			k := min(perRead, s.npages-j)
			b := t.buf[:k*pmEntrySize]
			off := int64(s.va/PageSize+uint64(j)) * pmEntrySize
			if _, err := t.pagemap.ReadAt(b, off); err != nil {
				return nil, fmt.Errorf("memsync: read pagemap of process %d: %w", t.pid, err)
			}
			for e := range k {
				if binary.LittleEndian.Uint64(b[e*pmEntrySize:])&pmSoftDirty != 0 {
					if p := s.pgoff + j + e; p < n {
						dirty.Set(p)
					}
				}
			}
		}
	}
	if err := t.clear(); err != nil {
		return nil, err
	}
	return dirty, nil
}

// Close closes the /proc files.
func (t *SoftDirty) Close() error {
	if t.pagemap == nil {
		return nil
	}
	err := errors.Join(t.pagemap.Close(), t.clearRefs.Close())
	t.pagemap, t.clearRefs = nil, nil
	return err
}
