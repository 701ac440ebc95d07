// Package initsync owns the initial disk sync: copying a running guest's
// whole disk to a new secondary without pausing it, skipping zero regions,
// while the guest's write events keep flowing.
//
// Why the result is exact: the copy travels in the same ordered event
// stream as the guest's writes. The sync first streams a whole-disk zero
// event (the replica may hold anything), then copies each chunk as a write
// event read under the event log's range lock (eventlog.Log.CopyRange). For
// any byte, the replica ends with the value of the last event touching it.
// A guest write that reached the image before the chunk was read is in the
// chunk; one that did not is numbered after the chunk, so it is replayed
// after it. A chunk found all zero (or inside a hole, per SEEK_DATA) is not
// sent: the replica already has zeroes there from the first event, and any
// guest write that makes it non-zero has its own event after that one. So
// with no special case for "already copied" or "not yet copied" regions,
// replaying the stream yields the primary's disk as of the last epoch mark.
package initsync

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
)

// DataSeeker is implemented by backends that can skip holes cheaply
// (backend.File, with SEEK_DATA/SEEK_HOLE).
type DataSeeker interface {
	SeekData(off int64) (data, hole int64, ok bool)
}

// Progress describes a running sync.
type Progress struct {
	Done    int64         // bytes of the disk scanned (copied or skipped)
	Total   int64         // disk size
	Sent    int64         // bytes streamed as data
	Elapsed time.Duration // since Run started
	Rate    float64       // bytes scanned per second
	ETA     time.Duration // at the current rate; 0 when unknown or done
}

func (p Progress) String() string {
	pct := 0.0
	if p.Total > 0 {
		pct = 100 * float64(p.Done) / float64(p.Total)
	}
	return fmt.Sprintf("%.1f%% (%d/%d bytes, %d sent) %.1f MiB/s ETA %s",
		pct, p.Done, p.Total, p.Sent, p.Rate/(1<<20), p.ETA.Round(time.Second))
}

// Options tune a sync; zero values pick defaults.
type Options struct {
	// ChunkSize is the copy unit (default 1 MiB). The range lock holds
	// guest writes to a chunk while it is read, so keep it modest.
	ChunkSize int
	// EpochBytes: mark an epoch after this much data was sent (default
	// 64 MiB), so the secondary can commit and drop staging as it goes.
	EpochBytes int64
	// OnProgress, if set, is called after every chunk.
	OnProgress func(Progress)
}

// Syncer copies one disk.
type Syncer struct {
	log    *eventlog.Log
	seeker DataSeeker
	opt    Options

	mu   sync.Mutex
	prog Progress
}

// New prepares a sync of the disk behind log. local is the log's inner
// backend; if it is a DataSeeker, holes are skipped without reading them.
func New(log *eventlog.Log, local any, opt Options) *Syncer {
	if opt.ChunkSize <= 0 {
		opt.ChunkSize = 1 << 20
	}
	if opt.EpochBytes <= 0 {
		opt.EpochBytes = 64 << 20
	}
	s := &Syncer{log: log, opt: opt}
	s.seeker, _ = local.(DataSeeker)
	s.prog.Total = log.Size()
	return s
}

// Progress returns a snapshot, for the CLI.
func (s *Syncer) Progress() Progress {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.prog
}

func (s *Syncer) advance(start time.Time, scanned, sent int64) {
	s.mu.Lock()
	p := &s.prog
	p.Done += scanned
	p.Sent += sent
	p.Elapsed = time.Since(start)
	if secs := p.Elapsed.Seconds(); secs > 0 {
		p.Rate = float64(p.Done) / secs
	}
	p.ETA = 0
	if p.Rate > 0 && p.Done < p.Total {
		p.ETA = time.Duration(float64(p.Total-p.Done) / p.Rate * float64(time.Second))
	}
	snap := *p
	s.mu.Unlock()
	if s.opt.OnProgress != nil {
		s.opt.OnProgress(snap)
	}
}

// Run copies the disk and marks a final epoch; the replica equals the
// primary as of that mark once the secondary has applied the stream. The
// guest keeps running throughout.
func (s *Syncer) Run(ctx context.Context) error {
	start := time.Now()
	size := s.log.Size()
	if err := s.log.ZeroRemote(ctx); err != nil {
		return fmt.Errorf("initial sync: zero the replica: %w", err)
	}
	buf := make([]byte, s.opt.ChunkSize)
	var sinceMark int64
	for off := int64(0); off < size; {
		end := size
		if s.seeker != nil {
			if d, h, ok := s.seeker.SeekData(off); ok {
				if d > off {
					s.advance(start, min(d, size)-off, 0)
					off = d
					if off >= size {
						break
					}
				}
				end = max(h, off+1)
			}
		}
		n := min(int64(len(buf)), end-off)
		sent, err := s.log.CopyRange(ctx, off, buf[:n])
		if err != nil {
			return fmt.Errorf("initial sync at offset %d: %w", off, err)
		}
		var sentBytes int64
		if sent {
			sentBytes = n
			sinceMark += n
		}
		off += n
		s.advance(start, n, sentBytes)
		if sinceMark >= s.opt.EpochBytes {
			if _, _, err := s.log.MarkEpoch(ctx); err != nil {
				return fmt.Errorf("initial sync: %w", err)
			}
			sinceMark = 0
		}
	}
	if _, _, err := s.log.MarkEpoch(ctx); err != nil {
		return fmt.Errorf("initial sync: %w", err)
	}
	return nil
}
