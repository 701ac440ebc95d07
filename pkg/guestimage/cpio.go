package guestimage

import (
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// File-type bits of a cpio mode (from <sys/stat.h>).
const (
	modeDir     = 0o040000
	modeRegular = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
	modePerm    = 0o7777
)

// entry is one file of the initramfs. Name is relative ("bin/busybox").
type entry struct {
	name       string
	mode       uint32 // type bits | permissions
	data       []byte // file content, or the target of a symlink
	rdevMajor  uint32
	rdevMinor  uint32
	fromSource string // where the content came from, for error messages
}

// writeCPIO writes entries as a "newc" (070701) cpio archive, the format
// the kernel unpacks into its rootfs. Entries are sorted by name and
// missing parent directories are added, so every directory precedes its
// contents; inode numbers count up from 1 in that order and every
// timestamp and owner is 0, so the same entries always give the same bytes.
func writeCPIO(w io.Writer, entries []entry) error {
	all, err := withParents(entries)
	if err != nil {
		return err
	}
	cw := &cpioWriter{w: w}
	for i, e := range all {
		cw.header(uint32(i+1), e.mode, uint32(len(e.data)), e.rdevMajor, e.rdevMinor, e.name)
		cw.write(e.data)
		cw.pad()
	}
	cw.header(0, 0, 0, 0, 0, "TRAILER!!!")
	// The kernel reads archives in 512-byte blocks; pad like cpio(1) does.
	if rem := cw.n % 512; rem != 0 {
		cw.write(make([]byte, 512-rem))
	}
	return cw.err
}

// withParents validates names, adds missing parent directories and sorts.
func withParents(entries []entry) ([]entry, error) {
	byName := map[string]entry{}
	for _, e := range entries {
		if e.name == "" || e.name != path.Clean(e.name) || strings.HasPrefix(e.name, "/") || strings.HasPrefix(e.name, "../") || e.name == "." || e.name == ".." {
			return nil, fmt.Errorf("%w: bad initramfs path %q", ErrBadOptions, e.name)
		}
		if _, dup := byName[e.name]; dup {
			return nil, fmt.Errorf("%w: two initramfs entries named /%s", ErrBadOptions, e.name)
		}
		byName[e.name] = e
	}
	for _, e := range entries {
		for dir := path.Dir(e.name); dir != "."; dir = path.Dir(dir) {
			if p, ok := byName[dir]; ok {
				if p.mode&^modePerm != modeDir {
					return nil, fmt.Errorf("%w: /%s is a file but /%s needs it to be a directory", ErrBadOptions, dir, e.name)
				}
				continue
			}
			byName[dir] = entry{name: dir, mode: modeDir | 0o755}
		}
	}
	all := make([]entry, 0, len(byName))
	for _, e := range byName {
		all = append(all, e)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].name < all[j].name })
	return all, nil
}

type cpioWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil || len(b) == 0 {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if rem := c.n % 4; rem != 0 {
		c.write(make([]byte, 4-rem))
	}
}

func (c *cpioWriter) header(ino, mode, size, rmaj, rmin uint32, name string) {
	nlink := uint32(1)
	if mode&^modePerm == modeDir {
		nlink = 2
	}
	// Fields: ino mode uid gid nlink mtime filesize devmajor devminor
	// rdevmajor rdevminor namesize check.
	h := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name)+1, 0)
	c.write([]byte(h))
	c.write(append([]byte(name), 0))
	c.pad()
}
