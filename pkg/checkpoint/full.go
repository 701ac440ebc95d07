package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftctl/ftctl/pkg/qmp"
)

// Full is a complete local checkpoint: copies of the RAM file and the disk
// images taken while the VM was paused, and its device state. A standby
// started over RAM (and Disks) restores it exactly.
type Full struct {
	RAM         string
	Disks       []string
	DeviceState []byte
	Stats       Stats
}

// Stats breaks the pause of one checkpoint down by step.
type Stats struct {
	Stop, CopyRAM, CopyDisks, DeviceState, Cont time.Duration
	Pause                                       time.Duration // stop issued .. cont returned
	RAMBytes, DiskBytes                         int64         // data actually copied (holes skipped)
}

// FullOptions says what to copy and where.
type FullOptions struct {
	RAMFile string   // the running guest's RAM file
	Disks   []string // its local disk images (raw or qcow2 files)
	Dir     string   // destination directory; files are overwritten
	// Paused, if set, runs while the VM is paused, after stop: the moment at
	// which the checkpoint's contents are fixed (tests read the serial log
	// size there).
	Paused func()
}

// TakeFull pauses the VM, copies RAM and disks, saves the device state and
// resumes it. QEMU's stop drains in-flight block I/O, so the disk copies
// hold exactly the writes the guest issued before the pause (DESIGN.md,
// invariant 2). The VM is resumed even when a step fails.
func TakeFull(ctx context.Context, c *qmp.Client, o FullOptions) (f *Full, err error) {
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	f = &Full{RAM: filepath.Join(o.Dir, "ram")}
	for i := range o.Disks {
		f.Disks = append(f.Disks, filepath.Join(o.Dir, fmt.Sprintf("disk%d", i)))
	}
	t0 := time.Now()
	if err := c.Stop(ctx); err != nil {
		return nil, fmt.Errorf("checkpoint: stop: %w", err)
	}
	t1 := time.Now()
	f.Stats.Stop = t1.Sub(t0)
	defer func() {
		tc := time.Now()
		cerr := c.Cont(context.WithoutCancel(ctx))
		f.Stats.Cont = time.Since(tc)
		f.Stats.Pause = time.Since(t0)
		if cerr != nil {
			err = errors.Join(err, fmt.Errorf("checkpoint: cont: %w", cerr))
		}
		if err != nil {
			f = nil
		}
	}()
	if o.Paused != nil {
		o.Paused()
	}
	n, err := CopySparse(f.RAM, o.RAMFile)
	if err != nil {
		return f, fmt.Errorf("checkpoint: copy RAM: %w", err)
	}
	f.Stats.RAMBytes = n
	t2 := time.Now()
	f.Stats.CopyRAM = t2.Sub(t1)
	for i, d := range o.Disks {
		n, err := CopySparse(f.Disks[i], d)
		if err != nil {
			return f, fmt.Errorf("checkpoint: copy disk %s: %w", d, err)
		}
		f.Stats.DiskBytes += n
	}
	t3 := time.Now()
	f.Stats.CopyDisks = t3.Sub(t2)
	f.DeviceState, err = SaveDeviceState(ctx, c)
	if err != nil {
		return f, err
	}
	f.Stats.DeviceState = time.Since(t3)
	return f, nil
}

// CopySparse copies src to dst (created or truncated), copying only the
// data extents of src so that untouched guest RAM and unwritten disk areas
// stay holes. It returns the number of bytes copied.
func CopySparse(dst, src string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return 0, err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer out.Close()
	size := fi.Size()
	if err := out.Truncate(size); err != nil {
		return 0, err
	}
	var copied int64
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after off
				break
			}
			// No SEEK_DATA support: copy everything that is left.
			data = off
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		n, err := copyRange(out, in, data, hole-data)
		copied += n
		if err != nil {
			return copied, err
		}
		off = hole
	}
	return copied, nil
}

func copyRange(out, in *os.File, off, n int64) (int64, error) {
	if _, err := in.Seek(off, io.SeekStart); err != nil {
		return 0, err
	}
	if _, err := out.Seek(off, io.SeekStart); err != nil {
		return 0, err
	}
	// io.Copy on two *os.File uses copy_file_range where the kernel has it.
	return io.Copy(out, io.LimitReader(in, n))
}
