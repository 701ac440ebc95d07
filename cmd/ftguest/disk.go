package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/internal/diskrec"
)

// diskWriter appends chained records to a block device.
type diskWriter struct {
	con      *console
	path     string
	interval time.Duration
	wait     time.Duration
}

func (d *diskWriter) name() string { return "disk" }

func (d *diskWriter) start(ctx context.Context) (func(context.Context) error, error) {
	if err := waitForPath(ctx, d.path, d.wait); err != nil {
		return nil, err
	}
	// Read the existing chain through the page cache (O_DIRECT reads would
	// need aligned buffers), then write with O_DIRECT so every record goes
	// to the virtual disk at once, and fdatasync so it is also flushed.
	rf, err := os.Open(d.path)
	if err != nil {
		return nil, err
	}
	size, err := rf.Seek(0, io.SeekEnd)
	if err != nil {
		rf.Close()
		return nil, fmt.Errorf("size of %s: %w", d.path, err)
	}
	rep, err := diskrec.Verify(rf, size)
	rf.Close()
	if err != nil {
		return nil, fmt.Errorf("%s holds records that do not form one chain (wipe it to start over): %w", d.path, err)
	}
	f, err := os.OpenFile(d.path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if errors.Is(err, syscall.EINVAL) { // e.g. tmpfs on a test host
		f, err = os.OpenFile(d.path, os.O_WRONLY, 0)
	}
	if err != nil {
		return nil, err
	}
	w, err := diskrec.NewWriter(fdatasyncFile{f}, size)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", d.path, err)
	}
	w.Resume(rep.LastSeq, rep.LastSum)
	if rep.LastSeq > 0 {
		d.con.printf("ftguest disk resume seq=%d", rep.LastSeq)
	}
	return func(ctx context.Context) error {
		defer f.Close()
		return tick(ctx, d.interval, func() error {
			seq, err := w.Write()
			if err != nil {
				// Keep going: the next tick rewrites the same seq, and a
				// transient error (a replica switching over) shows in the log.
				d.con.printf("ftguest disk error: %v", err)
				return nil
			}
			d.con.printf("ftguest disk seq=%d", seq)
			return nil
		})
	}, nil
}

// fdatasyncFile makes Sync flush only data, as a database would.
type fdatasyncFile struct{ *os.File }

func (f fdatasyncFile) Sync() error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			return err
		}
	}
}

// waitForPath waits for the device node to show up: virtio_blk probes the
// disk while /init loads it, but devtmpfs may add the node a little later.
func waitForPath(ctx context.Context, path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		_, err := os.Stat(path)
		if err == nil || !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v: %w", path, limit, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
