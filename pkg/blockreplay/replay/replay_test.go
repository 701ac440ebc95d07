package replay

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
)

const diskSize = 1 << 20

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// rig is a primary (Mem disk behind an event log) streaming to a replayer
// over a replica file, with the primary snapshotted at every epoch end.
type rig struct {
	t       *testing.T
	ctx     context.Context
	prim    *backend.Mem
	log     *eventlog.Log
	pipe    *eventlog.Pipe
	imgPath string
	img     *backend.File
	dir     string
	r       *Replayer
	snaps   map[uint64][]byte
}

func newRig(t *testing.T) *rig {
	t.Helper()
	rg := &rig{t: t, ctx: context.Background(), prim: backend.NewMem(diskSize), pipe: eventlog.NewPipe(64 << 20),
		dir: t.TempDir(), snaps: map[uint64][]byte{0: make([]byte, diskSize)}}
	rg.log = eventlog.New(rg.prim, rg.pipe, eventlog.Options{})
	rg.imgPath = filepath.Join(rg.dir, "replica.raw")
	if err := os.WriteFile(rg.imgPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(rg.imgPath, diskSize); err != nil {
		t.Fatal(err)
	}
	rg.reopen(nil)
	return rg
}

// reopen opens a fresh Replayer (and image) on the same files, as after a
// restart; wrap may interpose on the image backend.
func (rg *rig) reopen(wrap func(backend.Backend) backend.Backend) {
	rg.t.Helper()
	if rg.r != nil {
		rg.r.Close()
		rg.img.Close()
	}
	img, err := backend.OpenFile(rg.imgPath, backend.FileOptions{})
	if err != nil {
		rg.t.Fatal(err)
	}
	rg.img = img
	var b backend.Backend = img
	if wrap != nil {
		b = wrap(img)
	}
	r, err := Open(rg.ctx, b, filepath.Join(rg.dir, "state"), quiet)
	if err != nil {
		rg.t.Fatal(err)
	}
	rg.r = r
	rg.t.Cleanup(func() { r.Close(); img.Close() })
}

// epoch runs a random concurrent workload on the primary, then marks the
// epoch (the VM is "stopped": no write in flight) and snapshots the disk.
func (rg *rig) epoch(rng *rand.Rand, ops int) uint64 {
	rg.t.Helper()
	var wg sync.WaitGroup
	for w := range 3 {
		seed := rng.Uint64()
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			for range ops / 3 {
				off := rng.Int64N(diskSize - 1)
				n := 1 + rng.Int64N(min(64<<10, diskSize-off))
				var err error
				switch rng.IntN(5) {
				case 0, 1, 2:
					b := make([]byte, n)
					for i := range b {
						b[i] = byte(rng.Uint32())
					}
					err = rg.log.WriteAt(rg.ctx, b, off, 0)
				case 3:
					err = rg.log.Trim(rg.ctx, off, n, 0)
				case 4:
					err = rg.log.WriteZeroes(rg.ctx, off, n, backend.NoHole)
				}
				if err != nil {
					rg.t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	e, _, err := rg.log.MarkEpoch(rg.ctx)
	if err != nil {
		rg.t.Fatal(err)
	}
	rg.snaps[e] = rg.prim.Snapshot()
	return e
}

// records takes everything waiting in the pipe.
func (rg *rig) records() []eventlog.Record {
	var out []eventlog.Record
	for rg.pipe.Len() > 0 {
		r, err := rg.pipe.Recv(rg.ctx)
		if err != nil {
			rg.t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func (rg *rig) stage(recs []eventlog.Record) {
	rg.t.Helper()
	for _, r := range recs {
		if err := rg.r.Stage(rg.ctx, r); err != nil {
			rg.t.Fatalf("stage %s seq %d: %v", r.Kind, r.Seq, err)
		}
	}
}

func (rg *rig) replica() []byte {
	rg.t.Helper()
	b, err := os.ReadFile(rg.imgPath)
	if err != nil {
		rg.t.Fatal(err)
	}
	return b
}

// expectAt checks the replica equals the primary as of epoch e.
func (rg *rig) expectAt(e uint64, when string) {
	rg.t.Helper()
	if !bytes.Equal(rg.replica(), rg.snaps[e]) {
		rg.t.Fatalf("%s: replica differs from the primary at epoch %d", when, e)
	}
	if got, _ := rg.r.Applied(); got != e {
		rg.t.Fatalf("%s: applied epoch %d, want %d", when, got, e)
	}
}

// TestCommitProperty: random write/trim/zero mixes cut into epochs; epochs
// are committed now or later in batches; after each commit the replica is
// the primary as of that cut, and staged epochs never show before commit.
func TestCommitProperty(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(11, 12))
	committed := uint64(0)
	for range 14 {
		e := rg.epoch(rng, 30+rng.IntN(60))
		rg.stage(rg.records())
		rg.expectAt(committed, "after staging, before commit")
		if rng.IntN(3) > 0 {
			if err := rg.r.Commit(rg.ctx, e); err != nil {
				t.Fatal(err)
			}
			committed = e
			rg.expectAt(e, "after commit")
		}
	}
	final, _ := rg.log.Position()
	if err := rg.r.Commit(rg.ctx, final-1); err != nil {
		t.Fatal(err)
	}
	committed = final - 1
	rg.expectAt(committed, "final commit")

	// Committing again, and after a restart, changes nothing.
	if err := rg.r.Commit(rg.ctx, committed); err != nil {
		t.Fatal(err)
	}
	if err := rg.r.Commit(rg.ctx, 1); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(committed, "double commit")
	rg.reopen(nil)
	rg.expectAt(committed, "after restart")
	if err := rg.r.Commit(rg.ctx, committed); err != nil {
		t.Fatalf("commit of an applied epoch after restart: %v", err)
	}
	// The stream goes on after the restart.
	e := rg.epoch(rng, 40)
	rg.stage(rg.records())
	if err := rg.r.Commit(rg.ctx, e); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(e, "commit after restart")
}

// TestCrashMidEpoch: the primary dies while sending an epoch; the replica
// stays on the previous epoch, whole, also across a restart.
func TestCrashMidEpoch(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(13, 14))
	e1 := rg.epoch(rng, 60)
	rg.stage(rg.records())
	if err := rg.r.Commit(rg.ctx, e1); err != nil {
		t.Fatal(err)
	}
	rg.epoch(rng, 60)
	recs := rg.records()
	rg.stage(recs[:len(recs)/2]) // the END never arrives
	if err := rg.r.Commit(rg.ctx, e1+1); !errors.Is(err, ErrNotSealed) {
		t.Fatalf("commit of a half-received epoch: %v", err)
	}
	rg.expectAt(e1, "half an epoch staged")
	rg.reopen(nil)
	rg.expectAt(e1, "restart after half an epoch")
	if open, seq := rg.r.Staged(); open != e1+1 || seq != rg.snapSeq(recs) {
		t.Errorf("after restart staging resumes at epoch %d seq %d", open, seq)
	}
	// Failover path: Discard also drops sealed-but-uncommitted epochs.
	rg.stage(recs)
	if err := rg.r.Discard(rg.ctx); err != nil {
		t.Fatal(err)
	}
	if err := rg.r.Commit(rg.ctx, e1+1); !errors.Is(err, ErrNotSealed) {
		t.Fatalf("commit after discard: %v", err)
	}
	rg.expectAt(e1, "after discard")
}

// snapSeq is the sequence number before the first record of recs.
func (rg *rig) snapSeq(recs []eventlog.Record) uint64 { return recs[0].Seq - 1 }

func TestRefusedRecordsLeaveStateUntouched(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(15, 16))
	e1 := rg.epoch(rng, 30)
	rg.stage(rg.records())
	if err := rg.r.Commit(rg.ctx, e1); err != nil {
		t.Fatal(err)
	}
	rg.epoch(rng, 30)
	recs := rg.records()
	open0, seq0 := rg.r.Staged()

	corrupt := recs[0]
	corrupt.Data = bytes.Clone(corrupt.Data)
	if len(corrupt.Data) > 0 {
		corrupt.Data[0] ^= 0x40
	} else {
		corrupt.Offset++
	}
	backwards := recs[0]
	backwards.Epoch = e1
	backwards.Seal()
	outside := recs[0]
	outside.Kind, outside.Flags, outside.Data, outside.Offset, outside.Length = eventlog.KindTrim, 0, nil, diskSize-1, 2
	outside.Seal()
	commitInStream := eventlog.Record{Kind: eventlog.KindCommit, Epoch: e1 + 1}
	commitInStream.Seal()
	cases := []struct {
		name string
		rec  eventlog.Record
		want error
	}{
		{"checksum mismatch", corrupt, eventlog.ErrCorrupt},
		{"gap", recs[1], ErrGap},
		{"epoch backwards", backwards, ErrOrder},
		{"end before its events", recs[len(recs)-1], ErrGap},
		{"range outside the disk", outside, backend.ErrOutOfRange},
		{"commit marker in the stream", commitInStream, eventlog.ErrCorrupt},
	}
	for _, tc := range cases {
		if err := rg.r.Stage(rg.ctx, tc.rec); !errors.Is(err, tc.want) {
			t.Errorf("%s: Stage = %v, want %v", tc.name, err, tc.want)
		}
		if open, seq := rg.r.Staged(); open != open0 || seq != seq0 {
			t.Errorf("%s: staged position moved to %d/%d", tc.name, open, seq)
		}
	}
	rg.expectAt(e1, "after refusals")
	// The genuine records are still accepted afterwards.
	rg.stage(recs)
	if err := rg.r.Commit(rg.ctx, e1+1); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(e1+1, "after the genuine stream")
	// A stale duplicate after commit is a gap, not a double apply.
	if err := rg.r.Stage(rg.ctx, recs[0]); !errors.Is(err, ErrGap) && !errors.Is(err, ErrOrder) {
		t.Errorf("replayed old record: %v", err)
	}
}

// flaky fails the image's writes after a budget, like a crash mid-apply.
type flaky struct {
	backend.Backend
	left atomic.Int64
}

var errInjected = errors.New("injected I/O error")

func (f *flaky) spend() error {
	if f.left.Add(-1) < 0 {
		return errInjected
	}
	return nil
}
func (f *flaky) WriteAt(ctx context.Context, p []byte, off int64, fl backend.Flags) error {
	if err := f.spend(); err != nil {
		return err
	}
	return f.Backend.WriteAt(ctx, p, off, fl)
}
func (f *flaky) Trim(ctx context.Context, off, n int64, fl backend.Flags) error {
	if err := f.spend(); err != nil {
		return err
	}
	return f.Backend.Trim(ctx, off, n, fl)
}
func (f *flaky) WriteZeroes(ctx context.Context, off, n int64, fl backend.Flags) error {
	if err := f.spend(); err != nil {
		return err
	}
	return f.Backend.WriteZeroes(ctx, off, n, fl)
}

// TestCrashDuringApplyIsRedone: applying dies half way; reopening finishes
// the committed epoch from its staging file.
func TestCrashDuringApplyIsRedone(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(17, 18))
	e1 := rg.epoch(rng, 30)
	rg.stage(rg.records())
	if err := rg.r.Commit(rg.ctx, e1); err != nil {
		t.Fatal(err)
	}
	var fl *flaky
	rg.reopen(func(b backend.Backend) backend.Backend {
		fl = &flaky{Backend: b}
		fl.left.Store(1 << 30) // Open redoes the kept epoch: let it succeed
		return fl
	})
	fl.left.Store(10)
	e2 := rg.epoch(rng, 60)
	rg.stage(rg.records())
	if err := rg.r.Commit(rg.ctx, e2); !errors.Is(err, ErrBroken) || !errors.Is(err, errInjected) {
		t.Fatalf("commit with failing image: %v", err)
	}
	if bytes.Equal(rg.replica(), rg.snaps[e1]) {
		t.Fatal("test is vacuous: the failed apply changed nothing")
	}
	if err := rg.r.Stage(rg.ctx, eventlog.Record{}); err == nil {
		t.Error("broken replayer accepted a record")
	}
	rg.reopen(nil)
	rg.expectAt(e2, "redo after a crash during apply")
}

func TestCorruptStagingFileIsNotApplied(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(19, 20))
	e1 := rg.epoch(rng, 30)
	rg.stage(rg.records())
	p := rg.r.stagePath(e1)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := rg.r.Commit(rg.ctx, e1); !errors.Is(err, eventlog.ErrCorrupt) {
		t.Fatalf("commit of a corrupt staging file: %v", err)
	}
	rg.expectAt(0, "after refusing a corrupt staging file")
}

func TestOpenRejectsCorruptState(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, stateFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), backend.NewMem(4096), dir, quiet); err == nil {
		t.Fatal("Open accepted a corrupt state file")
	}
}

func TestPumpAutoCommit(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(21, 22))
	var last uint64
	for range 3 {
		last = rg.epoch(rng, 30)
	}
	rg.pipe.Close()
	if err := Pump(rg.ctx, rg.pipe, rg.r, true); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(last, "after pump")
}

// TestStateRecordIsTheLastCommittedStagingFile: only the newest committed
// staging file is kept; if a crash lost the deletion of an older one, the
// redo at Open replays both, in order, to the same result.
func TestStateRecordIsTheLastCommittedStagingFile(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(23, 24))
	e1 := rg.epoch(rng, 40)
	rg.stage(rg.records())
	if err := rg.r.Commit(rg.ctx, e1); err != nil {
		t.Fatal(err)
	}
	old, err := os.ReadFile(rg.r.stagePath(e1))
	if err != nil {
		t.Fatalf("the committed epoch's staging file is gone: %v", err)
	}
	e2 := rg.epoch(rng, 40)
	rg.stage(rg.records())
	if err := rg.r.Commit(rg.ctx, e2); err != nil {
		t.Fatal(err)
	}
	es, err := rg.r.stagedEpochs()
	if err != nil || len(es) != 1 || es[0] != e2 {
		t.Fatalf("staging files after two commits: %v (%v), want only epoch %d", es, err, e2)
	}
	if err := os.WriteFile(rg.r.stagePath(e1), old, 0o600); err != nil {
		t.Fatal(err)
	}
	rg.reopen(nil)
	rg.expectAt(e2, "restart with a stale committed staging file")
	if _, seq := rg.r.Applied(); seq != rg.lastSeq() {
		t.Errorf("applied seq %d after restart, primary issued %d", seq, rg.lastSeq())
	}
}

func (rg *rig) lastSeq() uint64 {
	_, s := rg.log.Position()
	return s
}

// slowFlush holds the image sync until released.
type slowFlush struct {
	backend.Backend
	entered chan struct{}
	release chan struct{}
}

func (s *slowFlush) Flush(ctx context.Context) error {
	select {
	case s.entered <- struct{}{}:
	default:
	}
	<-s.release
	return s.Backend.Flush(ctx)
}

// TestStagingContinuesDuringCommit: while epoch N is being applied, the
// records of epoch N+1 are staged without waiting, so a commit does not
// push back on the primary's guest writes.
func TestStagingContinuesDuringCommit(t *testing.T) {
	rg := newRig(t)
	var sf *slowFlush
	rg.reopen(func(b backend.Backend) backend.Backend {
		sf = &slowFlush{Backend: b, entered: make(chan struct{}, 1), release: make(chan struct{})}
		return sf
	})
	rng := rand.New(rand.NewPCG(25, 26))
	e1 := rg.epoch(rng, 40)
	rg.stage(rg.records())
	committed := make(chan error, 1)
	go func() { committed <- rg.r.Commit(rg.ctx, e1) }()
	<-sf.entered // the commit is inside its image sync
	e2 := rg.epoch(rng, 40)
	staged := make(chan struct{})
	go func() { rg.stage(rg.records()); close(staged) }()
	select {
	case <-staged:
	case <-time.After(10 * time.Second):
		t.Fatal("staging waited for the commit to finish")
	}
	if open, _ := rg.r.Staged(); open != e2+1 {
		t.Errorf("open epoch %d after staging epoch %d", open, e2)
	}
	close(sf.release)
	if err := <-committed; err != nil {
		t.Fatal(err)
	}
	rg.expectAt(e1, "first commit")
	if err := rg.r.Commit(rg.ctx, e2); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(e2, "second commit")
}

// TestSealedEpochsSurviveRestart: epochs sealed but not committed before a
// restart are kept, so a commit the lockstep layer decided before the crash
// (its commit point is the replica RAM) can be finished afterwards; a partly
// staged epoch after them is dropped.
func TestSealedEpochsSurviveRestart(t *testing.T) {
	rg := newRig(t)
	rng := rand.New(rand.NewPCG(21, 22))
	e1 := rg.epoch(rng, 30)
	e2 := rg.epoch(rng, 30)
	rg.stage(rg.records())
	rg.epoch(rng, 30)
	partial := rg.records()
	rg.stage(partial[:len(partial)/2])
	rg.reopen(nil)
	rg.expectAt(0, "restart with two sealed epochs staged")
	if open, _ := rg.r.Staged(); open != e2+1 {
		t.Fatalf("after restart staging resumes at epoch %d, want %d", open, e2+1)
	}
	if err := rg.r.Commit(rg.ctx, e1); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(e1, "commit of a sealed epoch after restart")
	if err := rg.r.Commit(rg.ctx, e2); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(e2, "commit of the second sealed epoch")
	// The half-staged epoch was dropped: staging it again from the start works.
	rg.stage(partial)
	if err := rg.r.Commit(rg.ctx, e2+1); err != nil {
		t.Fatal(err)
	}
	rg.expectAt(e2+1, "re-staged epoch")
}
