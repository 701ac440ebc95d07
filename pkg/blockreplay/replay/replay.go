// Package replay owns the secondary's side of the Forever mechanism: it
// stages the primary's write events per epoch, applies a whole epoch to the
// replica image only when the epoch commits, and drops uncommitted epochs on
// failover, so the replica disk always matches the last committed memory
// checkpoint (DESIGN.md invariant 2).
//
// Staging: every epoch's records go to their own staging file in the state
// directory, through a 1 MiB buffer, rather than to memory. An epoch can be
// as large as the guest's write burst (or the whole disk, during the initial
// sync), so memory alone would need a spill path anyway; the page cache
// keeps small epochs in RAM for free, and a file gives crash safety: Commit
// appends a commit marker to the staging file and syncs it before touching
// the image, so if the secondary dies while applying, Open replays the
// committed epoch again from the start. Replaying is idempotent because
// every event sets its range to absolute content.
//
// Durable state costs two syncs per commit: the commit marker, and the
// image after applying. The newest committed staging file is kept until the
// next commit and is itself the durable record of the last applied epoch
// and sequence number (Open redoes it, harmlessly); older ones are deleted
// once a later epoch's image sync has covered them. state.json, replaced
// atomically, only holds the starting point set by Reset. So committing an
// epoch again, in the same process or after a restart, is a no-op.
package replay

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/ftctl/ftctl/internal/fsutil"
	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
)

// Sentinel errors. A refused record leaves both the staged and the
// committed state as they were.
var (
	// ErrGap means a sequence number is missing or repeated, or an epoch's
	// end does not match what was staged.
	ErrGap = errors.New("event sequence gap")
	// ErrOrder means a record belongs to an epoch other than the open one
	// (an epoch going backwards, or skipping ahead).
	ErrOrder = errors.New("event epoch out of order")
	// ErrNotSealed means Commit named an epoch whose end has not arrived.
	ErrNotSealed = errors.New("epoch not complete")
	// ErrBroken means applying failed part way; reopen to redo the commit.
	ErrBroken = errors.New("replayer needs reopening")
)

const stateFile = "state.json"

type state struct {
	Epoch uint64 `json:"epoch"`
	Seq   uint64 `json:"seq"`
}

// Replayer stages and applies events to one replica image.
type Replayer struct {
	img backend.Backend
	dir string
	log *slog.Logger

	// commitMu serialises Commit, Discard and Reset for their whole
	// length; mu guards the fields below and is held only briefly, so
	// staging the next epoch goes on while one is being applied.
	commitMu sync.Mutex
	mu       sync.Mutex
	applied  state
	open     uint64 // epoch being staged
	lastSeq  uint64 // last staged sequence number
	events   uint64 // events staged in the open epoch
	cur      *os.File
	curW     *bufio.Writer
	curLen   int64
	sealed   []uint64 // sealed, uncommitted epochs in order
	broken   error
}

// Open loads the state in dir (created if missing) and finishes any commit
// that a crash interrupted. Sealed epochs that were staged but not yet
// committed are kept, so a commit decided elsewhere before the crash (the
// lockstep commit point is the replica RAM) can still be carried out; a
// partly staged epoch is dropped.
func Open(ctx context.Context, img backend.Backend, dir string, log *slog.Logger) (*Replayer, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("replay state dir: %w", err)
	}
	r := &Replayer{img: img, dir: dir, log: log}
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("read replay state: %w", err)
	default:
		if err := json.Unmarshal(b, &r.applied); err != nil {
			return nil, fmt.Errorf("replay state %s is corrupt: %w", filepath.Join(dir, stateFile), err)
		}
	}
	if err := r.recover(ctx); err != nil {
		return nil, err
	}
	r.reset()
	if err := r.restoreSealed(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Replayer) stagePath(epoch uint64) string {
	return filepath.Join(r.dir, fmt.Sprintf("epoch-%020d.stage", epoch))
}

func (r *Replayer) stagedEpochs() ([]uint64, error) {
	ents, err := os.ReadDir(r.dir)
	if err != nil {
		return nil, fmt.Errorf("list staging files: %w", err)
	}
	var es []uint64
	for _, e := range ents {
		n, ok := strings.CutPrefix(e.Name(), "epoch-")
		if n, ok2 := strings.CutSuffix(n, ".stage"); ok && ok2 {
			if v, err := strconv.ParseUint(n, 10, 64); err == nil {
				es = append(es, v)
			}
		}
	}
	slices.Sort(es)
	return es, nil
}

// recover redoes the committed epochs whose staging files are still there
// (the newest is kept as the state record; an older one survives only if a
// crash came before its deletion).
func (r *Replayer) recover(ctx context.Context) error {
	es, err := r.stagedEpochs()
	if err != nil {
		return err
	}
	var redo []uint64
	for _, e := range es {
		if e <= r.applied.Epoch || !r.hasCommitMarker(e) {
			continue
		}
		if len(redo) > 0 && e != redo[len(redo)-1]+1 {
			return fmt.Errorf("%w: committed staging files skip from epoch %d to %d", eventlog.ErrCorrupt, redo[len(redo)-1], e)
		}
		redo = append(redo, e)
	}
	if len(redo) > 0 {
		r.log.Info("replay: redoing committed epochs from their staging files", "from", redo[0], "to", redo[len(redo)-1])
		if err := r.applyEpochs(ctx, redo); err != nil {
			return err
		}
	}
	return nil
}

// restoreSealed takes back the sealed, uncommitted epochs that follow the
// applied one without a gap and removes every other staging file (a partly
// staged epoch, leftovers). It runs after recover and reset.
func (r *Replayer) restoreSealed() error {
	es, err := r.stagedEpochs()
	if err != nil {
		return err
	}
	for _, e := range es {
		if e != r.open {
			continue
		}
		committed, endSeq, err := r.scan(e, nil)
		if err != nil || committed || endSeq < r.lastSeq {
			break
		}
		r.sealed = append(r.sealed, e)
		r.open, r.lastSeq = e+1, endSeq
	}
	for _, e := range es {
		if e != r.applied.Epoch && !slices.Contains(r.sealed, e) {
			if err := os.Remove(r.stagePath(e)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("remove staging file: %w", err)
			}
		}
	}
	if len(r.sealed) > 0 {
		r.log.Info("replay: kept sealed epochs staged before a restart", "from", r.sealed[0], "to", r.sealed[len(r.sealed)-1])
	}
	return nil
}

// removeUncommitted deletes the staging files of epochs after the applied
// one, and leftovers from before it, keeping the applied epoch's own file.
func (r *Replayer) removeUncommitted() error {
	es, err := r.stagedEpochs()
	if err != nil {
		return err
	}
	for _, e := range es {
		if e != r.applied.Epoch {
			if err := os.Remove(r.stagePath(e)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("remove staging file: %w", err)
			}
		}
	}
	return nil
}

func (r *Replayer) hasCommitMarker(e uint64) bool {
	committed, _, err := r.scan(e, nil)
	return err == nil && committed
}

func (r *Replayer) reset() {
	r.open = r.applied.Epoch + 1
	r.lastSeq = r.applied.Seq
	r.events = 0
	r.sealed = nil
	r.closeCur()
}

func (r *Replayer) closeCur() {
	if r.cur != nil {
		r.cur.Close()
		r.cur, r.curW, r.curLen = nil, nil, 0
	}
}

// Applied returns the last applied epoch and sequence number.
func (r *Replayer) Applied() (epoch, seq uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.applied.Epoch, r.applied.Seq
}

// Staged returns the open epoch and the last staged sequence number.
func (r *Replayer) Staged() (openEpoch, lastSeq uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.open, r.lastSeq
}

// Stage accepts the next record of the stream. Records must arrive in
// order: events of the open epoch with consecutive sequence numbers, then
// its EpochEnd. Anything else is refused and not staged.
func (r *Replayer) Stage(ctx context.Context, rec eventlog.Record) error {
	if err := rec.Verify(); err != nil {
		return fmt.Errorf("refused: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.broken != nil {
		return r.broken
	}
	switch {
	case rec.IsEvent():
		if rec.Epoch != r.open {
			return fmt.Errorf("%w: %s seq %d is tagged epoch %d, open epoch is %d", ErrOrder, rec.Kind, rec.Seq, rec.Epoch, r.open)
		}
		if rec.Seq != r.lastSeq+1 {
			return fmt.Errorf("%w: got seq %d, expected %d", ErrGap, rec.Seq, r.lastSeq+1)
		}
		if err := backend.CheckRange(r.img.Size(), int64(rec.Offset), int64(rec.Length)); err != nil || int64(rec.Offset) < 0 {
			return fmt.Errorf("refused %s seq %d: %w", rec.Kind, rec.Seq, backend.ErrOutOfRange)
		}
		if err := r.appendStaged(&rec); err != nil {
			return err
		}
		r.lastSeq++
		r.events++
	case rec.Kind == eventlog.KindEpochEnd:
		if rec.Epoch != r.open {
			return fmt.Errorf("%w: end of epoch %d while epoch %d is open", ErrOrder, rec.Epoch, r.open)
		}
		if rec.Seq != r.lastSeq || rec.Length != r.events {
			return fmt.Errorf("%w: epoch %d ends at seq %d after %d events, staged up to seq %d with %d events",
				ErrGap, rec.Epoch, rec.Seq, rec.Length, r.lastSeq, r.events)
		}
		if err := r.appendStaged(&rec); err != nil {
			return err
		}
		if err := r.curW.Flush(); err != nil {
			return fmt.Errorf("stage end of epoch %d: %w", rec.Epoch, err)
		}
		r.closeCur()
		r.sealed = append(r.sealed, r.open)
		r.open++
		r.events = 0
	default:
		return fmt.Errorf("%w: unexpected %s record in the stream", eventlog.ErrCorrupt, rec.Kind)
	}
	return nil
}

// appendStaged writes one record to the open epoch's staging file; on
// failure it cuts the file back so the record is not half staged.
func (r *Replayer) appendStaged(rec *eventlog.Record) error {
	if r.cur == nil {
		f, err := os.OpenFile(r.stagePath(r.open), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("create staging file: %w", err)
		}
		r.cur, r.curW, r.curLen = f, bufio.NewWriterSize(f, 1<<20), 0
	}
	if err := eventlog.WriteRecord(r.curW, rec); err != nil {
		r.curW.Reset(r.cur)
		r.cur.Truncate(r.curLen)
		return fmt.Errorf("stage %s seq %d: %w", rec.Kind, rec.Seq, err)
	}
	r.curLen += int64(rec.EncodedLen())
	return nil
}

// Commit applies every sealed epoch up to and including epoch, in order,
// then syncs the image and records the new state. Epochs already applied
// are skipped, so committing twice is harmless.
func (r *Replayer) Commit(ctx context.Context, epoch uint64) error {
	r.commitMu.Lock()
	defer r.commitMu.Unlock()
	r.mu.Lock()
	if r.broken != nil {
		r.mu.Unlock()
		return r.broken
	}
	if epoch <= r.applied.Epoch {
		r.mu.Unlock()
		return nil
	}
	n := 0
	for n < len(r.sealed) && r.sealed[n] <= epoch {
		n++
	}
	if n == 0 || r.sealed[n-1] != epoch {
		err := fmt.Errorf("%w: commit of epoch %d, applied up to %d, sealed %v", ErrNotSealed, epoch, r.applied.Epoch, r.sealed)
		r.mu.Unlock()
		return err
	}
	// Only Commit, Discard and Reset shrink sealed, and they hold commitMu,
	// so this prefix stays put while staging goes on.
	todo := slices.Clone(r.sealed[:n])
	r.mu.Unlock()

	// Check every staged epoch before changing anything: a corrupt staging
	// file must not leave the replica half way between two epochs.
	for _, e := range todo {
		if _, _, err := r.scan(e, nil); err != nil {
			return err
		}
	}
	for _, e := range todo {
		if err := r.markCommitted(e); err != nil {
			return err
		}
	}
	err := r.applyEpochs(ctx, todo)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.broken = fmt.Errorf("%w: %w", ErrBroken, err)
		return r.broken
	}
	r.sealed = r.sealed[n:]
	return nil
}

func (r *Replayer) markCommitted(e uint64) error {
	f, err := os.OpenFile(r.stagePath(e), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("mark epoch %d committed: %w", e, err)
	}
	defer f.Close()
	m := eventlog.Record{Kind: eventlog.KindCommit, Epoch: e}
	m.Seal()
	if err := eventlog.WriteRecord(f, &m); err != nil {
		return fmt.Errorf("mark epoch %d committed: %w", e, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync staging file of epoch %d: %w", e, err)
	}
	return nil
}

// applyEpochs replays committed staging files in order and syncs the
// image; then the last file is the state record and the older ones go.
func (r *Replayer) applyEpochs(ctx context.Context, es []uint64) error {
	var endSeq uint64
	for _, e := range es {
		var err error
		_, endSeq, err = r.scan(e, func(rec *eventlog.Record) error { return r.apply(ctx, rec) })
		if err != nil {
			return err
		}
	}
	if err := r.img.Flush(ctx); err != nil {
		return fmt.Errorf("sync replica image: %w", err)
	}
	r.mu.Lock()
	r.applied = state{Epoch: es[len(es)-1], Seq: endSeq}
	r.mu.Unlock()
	// A deletion lost to a crash only means one more harmless redo.
	older, err := r.stagedEpochs()
	if err != nil {
		return err
	}
	for _, e := range older {
		if e < es[len(es)-1] {
			os.Remove(r.stagePath(e))
		}
	}
	return nil
}

func (r *Replayer) apply(ctx context.Context, rec *eventlog.Record) error {
	off, n := int64(rec.Offset), int64(rec.Length)
	var err error
	switch rec.Kind {
	case eventlog.KindWrite:
		err = r.img.WriteAt(ctx, rec.Data, off, 0)
	case eventlog.KindTrim:
		err = r.img.Trim(ctx, off, n, 0)
	case eventlog.KindZero:
		var fl backend.Flags
		if rec.Flags&eventlog.FlagNoHole != 0 {
			fl = backend.NoHole
		}
		err = r.img.WriteZeroes(ctx, off, n, fl)
	}
	if err != nil {
		return fmt.Errorf("apply %s seq %d to the replica: %w", rec.Kind, rec.Seq, err)
	}
	return nil
}

// scan reads epoch e's staging file, checking every record, the sequence
// and the end marker, and calls fn on each event. It reports whether the
// epoch carries a commit marker and the sequence number at its end.
func (r *Replayer) scan(e uint64, fn func(*eventlog.Record) error) (committed bool, endSeq uint64, err error) {
	f, err := os.Open(r.stagePath(e))
	if err != nil {
		return false, 0, fmt.Errorf("open staging file of epoch %d: %w", e, err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 1<<20)
	var (
		events uint64
		seq    uint64
		ended  bool
	)
	bad := func(why string) error {
		return fmt.Errorf("%w: staging file of epoch %d: %s", eventlog.ErrCorrupt, e, why)
	}
	for {
		rec, err := eventlog.ReadRecord(br)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return false, 0, fmt.Errorf("staging file of epoch %d: %w", e, err)
		}
		switch {
		case rec.Epoch != e:
			return false, 0, bad(fmt.Sprintf("record of epoch %d", rec.Epoch))
		case committed:
			return false, 0, bad("records after the commit marker")
		case ended && rec.Kind != eventlog.KindCommit:
			return false, 0, bad("records after the end of the epoch")
		case rec.IsEvent():
			if events > 0 && rec.Seq != seq+1 {
				return false, 0, bad(fmt.Sprintf("seq %d after %d", rec.Seq, seq))
			}
			seq = rec.Seq
			events++
			if fn != nil {
				if err := fn(&rec); err != nil {
					return false, 0, err
				}
			}
		case rec.Kind == eventlog.KindEpochEnd:
			if rec.Length != events || (events > 0 && rec.Seq != seq) {
				return false, 0, bad("end marker does not match the events")
			}
			ended = true
			endSeq = rec.Seq
		case rec.Kind == eventlog.KindCommit:
			if !ended {
				return false, 0, bad("commit marker before the end")
			}
			committed = true
		}
	}
	if !ended {
		return false, 0, fmt.Errorf("%w: staging file of epoch %d has no end marker", ErrNotSealed, e)
	}
	return committed, endSeq, nil
}

func (r *Replayer) writeState(s state) error {
	b, _ := json.Marshal(s)
	if err := fsutil.WriteFileAtomic(filepath.Join(r.dir, stateFile), b, 0o600); err != nil {
		return fmt.Errorf("write replay state: %w", err)
	}
	r.applied = s
	return nil
}

// Discard drops every staged epoch that has not been committed (failover,
// or a broken stream); staging restarts after the last applied epoch.
func (r *Replayer) Discard(context.Context) error {
	r.commitMu.Lock()
	defer r.commitMu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reset()
	return r.removeUncommitted()
}

// Reset forgets everything staged and declares the replica to be at the
// given epoch and sequence number; it is used before an initial sync, whose
// stream starts wherever the primary's log is.
func (r *Replayer) Reset(_ context.Context, epoch, seq uint64) error {
	r.commitMu.Lock()
	defer r.commitMu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closeCur()
	es, err := r.stagedEpochs()
	if err != nil {
		return err
	}
	for _, e := range es {
		if err := os.Remove(r.stagePath(e)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove staging file: %w", err)
		}
	}
	if err := r.writeState(state{Epoch: epoch, Seq: seq}); err != nil {
		return err
	}
	r.broken = nil
	r.reset()
	return nil
}

// Close drops the open staging file; staged, uncommitted epochs are dropped
// at the next Open.
func (r *Replayer) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closeCur()
	return nil
}

// Pump stages records from src until it ends (io.EOF returns nil). With
// autoCommit every epoch is committed as soon as it is sealed, which is what
// the initial sync wants; the lockstep layer instead commits when the
// matching memory checkpoint is complete.
func Pump(ctx context.Context, src eventlog.Source, r *Replayer, autoCommit bool) error {
	for {
		rec, err := src.Recv(ctx)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := r.Stage(ctx, rec); err != nil {
			return err
		}
		eventlog.Recycle(rec) // staged to the file: the data is no longer needed
		if autoCommit && rec.Kind == eventlog.KindEpochEnd {
			if err := r.Commit(ctx, rec.Epoch); err != nil {
				return err
			}
		}
	}
}
