package memsync

import (
	"context"
	"fmt"
	"time"
)

// Progress reports a live pre-copy's advance, for the CLI.
type Progress struct {
	Round      int           // 1: the full pass; 2..: dirty passes
	RoundPages int           // pages this round has to send
	RoundDone  int           // of which sent
	PagesSent  int           // over all rounds
	BytesSent  int64         // page bytes handed to send, over all rounds
	Elapsed    time.Duration // since PreCopy started
	Rate       float64       // BytesSent per second of Elapsed
}

// PreCopyOptions tune PreCopy. Zero values pick the defaults.
type PreCopyOptions struct {
	// Pause stops the guest briefly around each Dirty call and returns the
	// function that resumes it (QMP stop/cont). Required unless the tracker
	// is LiveSafe: soft-dirty's read-then-clear would lose a write landing
	// between the two.
	Pause func(ctx context.Context) (resume func(context.Context) error, err error)
	// MaxRounds bounds the passes, the full one included (default 30).
	MaxRounds int
	// SmallPages: stop once a dirty pass has at most this many pages
	// (default 256, 1 MiB: about one checkpoint's worth).
	SmallPages int
	// BatchPages is how many pages one Snapshot carries (default 4096,
	// 16 MiB), bounding the memory in flight.
	BatchPages int
	// FirstEpoch numbers the first batch; each batch is one epoch so the
	// replica can commit it on its own (default 1).
	FirstEpoch uint64
	// Progress, if set, is called after every batch.
	Progress func(Progress)
}

// PreCopyResult says how a pre-copy ended.
type PreCopyResult struct {
	Rounds    int
	PagesSent int
	BytesSent int64
	// LastDirty is the size of the last dirty pass: about what the first
	// stopped checkpoint will have to send.
	LastDirty int
	// Converged is true when the last pass was at most SmallPages, false
	// when it stopped because the dirty set stopped shrinking or MaxRounds
	// was reached.
	Converged bool
	// NextEpoch is the epoch number after the last batch sent.
	NextEpoch uint64
}

// PreCopy performs the first full synchronisation while the guest runs:
// it starts tracker tr, sends every non-zero page of guest RAM (src, the
// Region), then repeatedly sends the pages dirtied meanwhile, until a pass
// is small or stops shrinking. It returns with the tracker's interval open:
// the caller then stops the VM and takes the first ordinary checkpoint,
// whose Dirty covers every write since the last pass.
//
// Pages are handed to send as Snapshots (released when send returns), which
// the caller encodes against a Base and ships. Zero pages are skipped in the
// full pass, so the replica must start all zero (a fresh replica file).
func PreCopy(ctx context.Context, src Pages, tr Tracker, send func(context.Context, *Snapshot) error, o PreCopyOptions) (PreCopyResult, error) {
	if o.MaxRounds <= 0 {
		o.MaxRounds = 30
	}
	if o.SmallPages <= 0 {
		o.SmallPages = 256
	}
	if o.BatchPages <= 0 {
		o.BatchPages = 4096
	}
	if o.FirstEpoch == 0 {
		o.FirstEpoch = 1
	}
	live, _ := tr.(LiveSafe)
	if o.Pause == nil && (live == nil || !live.LiveSafe()) {
		return PreCopyResult{}, fmt.Errorf("%w: pre-copy with a %s tracker needs a Pause hook", ErrBadInput, tr.Kind())
	}
	// A shadow tracker's result is relative to its copy, so that is what
	// must be sent (see LiveSource).
	from := src
	if ls, ok := tr.(LiveSource); ok {
		from = ls.Source()
	}
	pc := &precopy{o: o, send: send, cap: NewCapturer(from, 0), start: time.Now(), epoch: o.FirstEpoch}
	res := PreCopyResult{}
	finish := func(err error) (PreCopyResult, error) {
		res.Rounds = pc.round
		res.PagesSent, res.BytesSent, res.NextEpoch = pc.pages, pc.bytes, pc.epoch
		return res, err
	}

	if err := pc.paused(ctx, func() error { return tr.Begin(ctx) }); err != nil {
		return finish(err)
	}
	pc.round = 1
	var nonZero []int
	for i := range from.NumPages() {
		if !isZero(from.Page(i)) {
			nonZero = append(nonZero, i)
		}
	}
	if err := pc.sendPages(ctx, nonZero); err != nil {
		return finish(err)
	}
	prev := -1
	for pc.round < o.MaxRounds {
		var dirty *Bitmap
		err := pc.paused(ctx, func() (err error) {
			dirty, err = tr.Dirty(ctx)
			return err
		})
		if err != nil {
			return finish(err)
		}
		pc.round++
		pages := dirty.Pages()
		if err := pc.sendPages(ctx, pages); err != nil {
			return finish(err)
		}
		res.LastDirty = len(pages)
		if len(pages) <= o.SmallPages {
			res.Converged = true
			break
		}
		if prev >= 0 && len(pages) >= prev {
			break
		}
		prev = len(pages)
	}
	return finish(nil)
}

type precopy struct {
	o     PreCopyOptions
	send  func(context.Context, *Snapshot) error
	cap   *Capturer
	start time.Time
	round int
	pages int
	bytes int64
	epoch uint64
}

func (pc *precopy) paused(ctx context.Context, fn func() error) error {
	if pc.o.Pause == nil {
		return fn()
	}
	resume, err := pc.o.Pause(ctx)
	if err != nil {
		return fmt.Errorf("memsync: pre-copy pause: %w", err)
	}
	ferr := fn()
	if err := resume(ctx); err != nil {
		return fmt.Errorf("memsync: pre-copy resume: %w", err)
	}
	return ferr
}

func (pc *precopy) sendPages(ctx context.Context, pages []int) error {
	for lo := 0; lo < len(pages); lo += pc.o.BatchPages {
		hi := min(lo+pc.o.BatchPages, len(pages))
		snap, err := pc.cap.capturePages(ctx, pc.epoch, pages[lo:hi])
		if err != nil {
			return err
		}
		err = pc.send(ctx, snap)
		snap.Release()
		if err != nil {
			return fmt.Errorf("memsync: pre-copy send: %w", err)
		}
		pc.epoch++
		pc.pages += hi - lo
		pc.bytes += int64(hi-lo) * PageSize
		if pc.o.Progress != nil {
			el := time.Since(pc.start)
			pc.o.Progress(Progress{Round: pc.round, RoundPages: len(pages), RoundDone: hi,
				PagesSent: pc.pages, BytesSent: pc.bytes, Elapsed: el,
				Rate: float64(pc.bytes) / max(el.Seconds(), 1e-9)})
		}
	}
	return nil
}
