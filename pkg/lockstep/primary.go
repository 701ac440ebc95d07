package lockstep

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/qmp"
)

// BlockLog is the primary's disk write log (blockreplay's eventlog.Log):
// MarkEpoch closes the open block epoch while the VM is stopped.
type BlockLog interface {
	MarkEpoch(ctx context.Context) (epoch, lastSeq uint64, err error)
}

// Output is the output-commit buffer of the guest's NIC (netbuf.Buffer).
type Output interface {
	Seal(n uint64) (frames int, bytes int64)
	Release(n uint64)
	Outbound() <-chan struct{}
	SetPassthrough(on bool)
}

// PrimaryConfig wires a coordinator to one protected VM.
type PrimaryConfig struct {
	QMP     *qmp.Client     // the primary QEMU (checkpoint.Prepare is run on it)
	RAM     memsync.Pages   // the agent's mapping of guest RAM (a memsync.Region)
	Tracker memsync.Tracker // dirty-page tracker over RAM
	Codec   memsync.Codec   // page codec; zero value: memsync's default

	// Block and BlockEvents: the disk's write log and the stream of its
	// records (the log's sink). Both nil when the VM has no replicated disk.
	Block       BlockLog
	BlockEvents eventlog.Source
	// DiskSync, if set, copies the disk to the secondary (initsync) while
	// the memory pre-copy runs; the first checkpoint waits for it.
	DiskSync func(ctx context.Context) error

	Output Output // nil: the VM has no buffered NIC

	Conn        wire.Conn
	Policy      Policy
	MaxInflight int // unacknowledged epochs before the guest is held paused (default 2)
	// PreCopy tunes the initial memory synchronisation.
	PreCopy memsync.PreCopyOptions
	// Heartbeat is the idle interval between heartbeats (default 100ms).
	Heartbeat time.Duration
	Logger    *slog.Logger
	// OnEpoch, if set, is called (from the coordinator's goroutine) after
	// each checkpoint's pause with its figures.
	OnEpoch func(EpochStats)
}

// EpochStats are one epoch's figures on the primary.
type EpochStats struct {
	Epoch  uint64
	Kind   Kind
	Reason Reason
	// Pause is stop issued .. cont returned; the parts below add up to it
	// (Hold is time spent paused waiting for the secondary).
	Pause, Stop, Dirty, Capture, DevState, Mark, Hold, Cont time.Duration
	// Encode (memory pages) and DevEncode (device state) run after cont.
	Encode, DevEncode time.Duration
	DirtyPages        int
	MemBytes          int
	// DevStateBytes is the device state's payload on the wire,
	// DevStateRawBytes what QEMU produced; DevCodec says how it was encoded.
	DevStateBytes, DevStateRawBytes int
	DevCodec                        DevCodec
	HeldFrames                      int
}

// Stats is a snapshot of a coordinator's progress.
type Stats struct {
	State          string // syncing, protected, stopped
	Sent, Acked    uint64 // last epoch sent and acknowledged
	Checkpoints    uint64 // resumable epochs acknowledged
	WireBytes      int64  // payload bytes sent
	BlockEvents    int64
	LastPause      time.Duration
	PauseP50       time.Duration // over the last 1024 checkpoints
	PauseP99       time.Duration
	LastAckLatency time.Duration // pause start .. ACK received, last epoch
	Sync           memsync.Progress
	Err            error
}

// Primary coordinates checkpoints of one VM towards one secondary.
type Primary struct {
	cfg     PrimaryConfig
	log     *slog.Logger
	trigger *Trigger
	capt    *memsync.Capturer
	enc     *memsync.Encoder
	base    *memsync.Base
	dev     *devEncoder // device state against the previous checkpoint's

	jobs    chan job
	blockCh chan eventlog.Record
	request chan struct{}
	ctl     chan ctlReq

	next     uint64 // next epoch number
	protects bool   // output buffering switched on

	mu        sync.Mutex
	acked     uint64
	ackCh     chan struct{} // closed and replaced on every ACK
	sent      uint64
	pausedAt  map[uint64]time.Time
	pauses    []time.Duration
	stats     Stats
	failed    error
	failedCh  chan struct{}
	wireBytes atomic.Int64
	blockN    atomic.Int64
}

// ctlReq asks the checkpoint loop for a checkpoint that leaves the VM
// paused until resume is closed (never, for a final one).
type ctlReq struct {
	kind  Kind
	reply chan ctlReply
}

type ctlReply struct {
	epoch  uint64
	resume chan struct{}
	err    error
}

type job struct {
	man Manifest
	mem [][]byte
	dev []byte
}

// NewPrimary checks the configuration and prepares the coordinator.
func NewPrimary(cfg PrimaryConfig) (*Primary, error) {
	switch {
	case cfg.QMP == nil:
		return nil, fmt.Errorf("%w: primary needs a QMP client", ErrConfig)
	case cfg.RAM == nil || cfg.Tracker == nil:
		return nil, fmt.Errorf("%w: primary needs guest RAM and a tracker", ErrConfig)
	case cfg.Conn == nil:
		return nil, fmt.Errorf("%w: primary needs a link to the secondary", ErrConfig)
	case (cfg.Block == nil) != (cfg.BlockEvents == nil):
		return nil, fmt.Errorf("%w: Block and BlockEvents go together", ErrConfig)
	}
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = 2
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 100 * time.Millisecond
	}
	if cfg.Codec == 0 {
		cfg.Codec = memsync.DefaultCodec
	}
	tr, err := NewTrigger(cfg.Policy, nil)
	if err != nil {
		return nil, err
	}
	enc, err := memsync.NewEncoder(cfg.Codec, 0)
	if err != nil {
		return nil, err
	}
	dev, err := newDevEncoder()
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Primary{
		cfg:      cfg,
		log:      log,
		trigger:  tr,
		capt:     memsync.NewCapturer(cfg.RAM, 0),
		enc:      enc,
		base:     memsync.NewBase(cfg.RAM.NumPages()),
		dev:      dev,
		jobs:     make(chan job, 1),
		blockCh:  make(chan eventlog.Record, 256),
		request:  make(chan struct{}, 1),
		ctl:      make(chan ctlReq),
		next:     1,
		ackCh:    make(chan struct{}),
		pausedAt: map[uint64]time.Time{},
		failedCh: make(chan struct{}),
		stats:    Stats{State: "syncing"},
	}, nil
}

// fail records the first fatal error and wakes everyone waiting.
func (p *Primary) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed == nil {
		p.failed = err
		p.stats.State, p.stats.Err = "stopped", err
		close(p.failedCh)
	}
}

func (p *Primary) failure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failed
}

// Stats returns the coordinator's current figures.
func (p *Primary) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats
	s.Sent, s.Acked = p.sent, p.acked
	s.WireBytes, s.BlockEvents = p.wireBytes.Load(), p.blockN.Load()
	if n := len(p.pauses); n > 0 {
		sorted := slices.Clone(p.pauses)
		slices.Sort(sorted)
		s.PauseP50 = sorted[n/2]
		s.PauseP99 = sorted[min(n-1, n*99/100)]
	}
	return s
}

// Run synchronises the secondary (memory pre-copy and, if configured, the
// disk) and then checkpoints the VM until ctx ends or the link fails. The
// VM keeps running when Run returns; held output stays held (the caller
// decides whether the secondary is gone and the output can go).
func (p *Primary) Run(ctx context.Context) error {
	if err := checkpoint.Prepare(ctx, p.cfg.QMP); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	run := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx); err != nil && ctx.Err() == nil {
				p.fail(fmt.Errorf("%w: %s: %w", ErrStopped, name, err))
				cancel()
			}
		}()
	}
	run("sender", p.sendLoop)
	run("acknowledgements", p.ackLoop)
	if p.cfg.BlockEvents != nil {
		run("block events", p.pumpBlocks)
	}
	err := p.runCheckpoints(ctx)
	if f := p.failure(); f != nil {
		return f
	}
	if err != nil && ctx.Err() == nil {
		p.fail(err)
	}
	return err
}

func (p *Primary) runCheckpoints(ctx context.Context) error {
	if err := p.sync(ctx); err != nil {
		return err
	}
	var outbound <-chan struct{}
	if p.cfg.Output != nil {
		outbound = p.cfg.Output.Outbound()
	}
	reason := ReasonRequest // the first checkpoint completes the sync at once
	for {
		t := time.Now()
		if _, err := p.checkpoint(ctx, KindCheckpoint, reason, false); err != nil {
			return err
		}
		last := t
	wait:
		for {
			var err error
			select {
			case req := <-p.ctl:
				done, err := p.paused(ctx, req)
				if err != nil || done {
					return err
				}
				last = time.Now()
				continue
			default:
			}
			reason, err = p.trigger.Wait(ctx, last, outbound, p.request)
			if err != nil {
				return err
			}
			break wait
		}
	}
}

// paused serves a Pause or Handover request: a checkpoint that leaves the
// VM paused, acknowledged before the requester hears of it. It returns
// done for a final checkpoint, after which the coordinator stops.
func (p *Primary) paused(ctx context.Context, req ctlReq) (done bool, err error) {
	n, err := p.checkpoint(ctx, req.kind, ReasonRequest, true)
	if err == nil {
		err = p.WaitAcked(ctx, n)
	}
	if err != nil {
		// A failed pause or handover must not leave the guest stopped: the
		// primary goes on alone.
		if cerr := p.cfg.QMP.Cont(context.WithoutCancel(ctx)); cerr != nil {
			err = errors.Join(err, fmt.Errorf("resume after failed pause: %w", cerr))
		}
		req.reply <- ctlReply{err: err}
		return false, err
	}
	resume := make(chan struct{})
	req.reply <- ctlReply{epoch: n, resume: resume}
	if req.kind == KindFinal {
		return true, nil
	}
	select {
	case <-resume:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	if err := p.cfg.QMP.Cont(ctx); err != nil {
		return false, fmt.Errorf("resume after pause: %w", err)
	}
	return false, nil
}

func (p *Primary) ask(ctx context.Context, kind Kind) (ctlReply, error) {
	req := ctlReq{kind: kind, reply: make(chan ctlReply, 1)}
	select {
	case p.ctl <- req:
	case <-ctx.Done():
		return ctlReply{}, ctx.Err()
	case <-p.failedCh:
		return ctlReply{}, p.failure()
	}
	p.Checkpoint() // wake the trigger
	select {
	case r := <-req.reply:
		return r, r.err
	case <-ctx.Done():
		return ctlReply{}, ctx.Err()
	case <-p.failedCh:
		return ctlReply{}, p.failure()
	}
}

// Pause takes a checkpoint that leaves the VM paused, waits until the
// secondary has committed it, and returns its epoch: at that moment the
// replica equals the primary. resume lets the VM and the checkpoint loop go
// on. Used by tests and by operations that need a quiescent pair.
func (p *Primary) Pause(ctx context.Context) (epoch uint64, resume func(), err error) {
	r, err := p.ask(ctx, KindCheckpoint)
	if err != nil {
		return 0, nil, err
	}
	var once sync.Once
	return r.epoch, func() { once.Do(func() { close(r.resume) }) }, nil
}

// Handover is the planned-switchover primitive: a final checkpoint after
// which the VM stays paused for good, committed and acknowledged (so all
// held output of the VM has been released) before it returns. The
// secondary can then be promoted with zero loss; Run returns nil.
func (p *Primary) Handover(ctx context.Context) (uint64, error) {
	r, err := p.ask(ctx, KindFinal)
	return r.epoch, err
}

// sync runs the memory pre-copy and the disk sync side by side.
func (p *Primary) sync(ctx context.Context) error {
	var diskErr chan error
	if p.cfg.DiskSync != nil {
		diskErr = make(chan error, 1)
		go func() { diskErr <- p.cfg.DiskSync(ctx) }()
	}
	o := p.cfg.PreCopy
	o.FirstEpoch = p.next
	userProgress := o.Progress
	o.Progress = func(pr memsync.Progress) {
		p.mu.Lock()
		p.stats.Sync = pr
		p.mu.Unlock()
		if userProgress != nil {
			userProgress(pr)
		}
	}
	if ls, ok := p.cfg.Tracker.(memsync.LiveSafe); !ok || !ls.LiveSafe() {
		o.Pause = func(ctx context.Context) (func(context.Context) error, error) {
			if err := p.cfg.QMP.Stop(ctx); err != nil {
				return nil, err
			}
			return p.cfg.QMP.Cont, nil
		}
	}
	res, err := memsync.PreCopy(ctx, p.cfg.RAM, p.cfg.Tracker, func(ctx context.Context, s *memsync.Snapshot) error {
		frames, err := p.encode(s)
		if err != nil {
			return err
		}
		return p.enqueue(ctx, job{man: Manifest{Epoch: s.Epoch, Kind: KindSync, MemFrames: uint32(len(frames))}, mem: frames})
	}, o)
	if err != nil {
		return fmt.Errorf("memory pre-copy: %w", err)
	}
	p.next = res.NextEpoch
	p.log.Info("memory pre-copy done", "rounds", res.Rounds, "pages", res.PagesSent, "last_dirty", res.LastDirty, "converged", res.Converged)
	if diskErr != nil {
		select {
		case err := <-diskErr:
			if err != nil {
				return fmt.Errorf("disk sync: %w", err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	// The secondary may still be storing the last pre-copy rounds. Wait for
	// it with the guest running: the first checkpoint's window wait would
	// otherwise keep the guest paused for it (230-510 ms measured with a
	// 128 MiB guest under TCG, against ~15 ms for later checkpoints).
	return p.waitWindow(ctx, p.next)
}

// maxFramePages bounds the pages per memory frame (1 MiB before encoding).
// Liveness on the link is judged per frame received, so no single frame
// may take long to arrive: a 16 MiB frame of a pre-copy batch took over a
// second on a loaded host and its receiver declared the link silent while
// bytes were still flowing.
const maxFramePages = 256

// encode turns a snapshot into memory frames, updating the base.
func (p *Primary) encode(s *memsync.Snapshot) ([][]byte, error) {
	var frames [][]byte
	for lo := 0; lo < len(s.Pages) || (lo == 0 && len(s.Pages) == 0); lo += maxFramePages {
		hi := min(lo+maxFramePages, len(s.Pages))
		part := &memsync.Snapshot{Epoch: s.Epoch, Pages: s.Pages[lo:hi], Data: s.Data[lo*memsync.PageSize : hi*memsync.PageSize]}
		f, _, err := p.enc.Encode(nil, part, p.base)
		if err != nil {
			return nil, fmt.Errorf("encode epoch %d: %w", s.Epoch, err)
		}
		frames = append(frames, f)
		if len(s.Pages) == 0 {
			break
		}
	}
	return frames, nil
}

func (p *Primary) enqueue(ctx context.Context, j job) error {
	select {
	case p.jobs <- j:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-p.failedCh:
		return p.failure()
	}
}

// Checkpoint asks for a checkpoint now (coalesced with one already due).
func (p *Primary) Checkpoint() {
	select {
	case p.request <- struct{}{}:
	default:
	}
}

// resumeGuest makes sure the guest runs again after a checkpoint that
// failed part way: it conts, and checks, until QEMU says running. A
// device-state migration that was under way can stop the guest again
// after a cont (it completes into postmigrate), or refuse one while it
// finalizes; a cont on a running guest does nothing.
func resumeGuest(ctx context.Context, c *qmp.Client) error {
	ctx, cancel := context.WithTimeout(ctx, resumeTimeout)
	defer cancel()
	var last error
	for {
		if last = c.Cont(ctx); errors.Is(last, qmp.ErrClosed) {
			return last // QEMU is gone: nothing to resume
		} else if last == nil {
			st, err := c.QueryStatus(ctx)
			if err == nil && st.Running {
				return nil
			}
			last = fmt.Errorf("still %s after cont (%v)", st.Status, err)
		}
		select {
		case <-ctx.Done():
			return last
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// resumeTimeout bounds resumeGuest.
const resumeTimeout = 5 * time.Second

// checkpoint pauses the VM and captures epoch N; with keepPaused the VM
// is left paused. On failure the VM is resumed.
func (p *Primary) checkpoint(ctx context.Context, kind Kind, reason Reason, keepPaused bool) (n uint64, err error) {
	n = p.next
	c := p.cfg.QMP
	st := EpochStats{Epoch: n, Kind: kind, Reason: reason}
	t0 := time.Now()
	resumed := false
	defer func() {
		// Replication trouble must never leave the guest paused. Also
		// when the stop itself failed: a stop whose reply was cut short
		// by ctx may have stopped the guest all the same.
		if !resumed {
			if cerr := resumeGuest(context.WithoutCancel(ctx), c); cerr != nil {
				err = errors.Join(err, fmt.Errorf("epoch %d: resume after a failed checkpoint: %w", n, cerr))
			}
		}
	}()
	if err := c.Stop(ctx); err != nil {
		return 0, fmt.Errorf("epoch %d: stop: %w", n, err)
	}
	t := time.Now()
	st.Stop = t.Sub(t0)
	dirty, err := p.cfg.Tracker.Dirty(ctx)
	if err != nil {
		return 0, fmt.Errorf("epoch %d: dirty pages: %w", n, err)
	}
	st.Dirty, t = time.Since(t), time.Now()
	snap, err := p.capt.Capture(ctx, n, dirty)
	if err != nil {
		return 0, fmt.Errorf("epoch %d: capture: %w", n, err)
	}
	defer snap.Release()
	st.DirtyPages = len(snap.Pages)
	st.Capture, t = time.Since(t), time.Now()
	dev, err := checkpoint.SaveDeviceState(ctx, c)
	if err != nil {
		return 0, fmt.Errorf("epoch %d: %w", n, err)
	}
	st.DevState, t = time.Since(t), time.Now()
	man := Manifest{Epoch: n, Kind: kind, PausedNano: t0.UnixNano()}
	if p.cfg.Block != nil {
		if man.BlockEpoch, man.BlockSeq, err = p.cfg.Block.MarkEpoch(ctx); err != nil {
			return 0, fmt.Errorf("epoch %d: block epoch mark: %w", n, err)
		}
	}
	if p.cfg.Output != nil {
		if !p.protects {
			// From here on the guest's output waits for commits: what it
			// sent before is part of this, the first resumable, epoch.
			p.cfg.Output.SetPassthrough(false)
			p.protects = true
		}
		st.HeldFrames, _ = p.cfg.Output.Seal(n)
	}
	st.Mark, t = time.Since(t), time.Now()
	p.mu.Lock()
	p.pausedAt[n] = t0
	p.stats.State = "protected"
	p.mu.Unlock()
	p.next = n + 1
	if err := p.waitWindow(ctx, n); err != nil {
		return 0, err
	}
	st.Hold, t = time.Since(t), time.Now()
	if keepPaused {
		resumed = true
	} else {
		// A cont that fails (ctx ended as it went out) is retried by
		// the deferred resumeGuest, which does not give up with ctx.
		if err := c.Cont(ctx); err != nil {
			return 0, fmt.Errorf("epoch %d: cont: %w", n, err)
		}
		resumed = true
	}
	st.Cont = time.Since(t)
	st.Pause = time.Since(t0)

	t = time.Now()
	frames, err := p.encode(snap)
	if err != nil {
		return 0, err
	}
	st.Encode, t = time.Since(t), time.Now()
	for _, f := range frames {
		st.MemBytes += len(f)
	}
	// Relative to the previous checkpoint's state: this Primary sends
	// every checkpoint it encodes, in order, on its one link.
	devWire, dh, err := p.dev.encode(n, dev)
	if err != nil {
		return 0, err
	}
	st.DevEncode = time.Since(t)
	st.DevStateBytes, st.DevStateRawBytes, st.DevCodec = len(devWire), len(dev), dh.Codec
	man.MemFrames = uint32(len(frames))
	p.mu.Lock()
	p.stats.LastPause = st.Pause
	if len(p.pauses) >= 1024 {
		p.pauses = p.pauses[1:]
	}
	p.pauses = append(p.pauses, st.Pause)
	p.mu.Unlock()
	if p.cfg.OnEpoch != nil {
		p.cfg.OnEpoch(st)
	}
	return n, p.enqueue(ctx, job{man: man, mem: frames, dev: devWire})
}

// waitWindow holds the (paused) guest while more than MaxInflight epochs
// before n are unacknowledged.
func (p *Primary) waitWindow(ctx context.Context, n uint64) error {
	for {
		p.mu.Lock()
		acked, ch := p.acked, p.ackCh
		p.mu.Unlock()
		if n-acked <= uint64(p.cfg.MaxInflight) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.failedCh:
			return p.failure()
		}
	}
}

// WaitAcked blocks until epoch n is acknowledged.
func (p *Primary) WaitAcked(ctx context.Context, n uint64) error {
	for {
		p.mu.Lock()
		acked, ch := p.acked, p.ackCh
		p.mu.Unlock()
		if acked >= n {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.failedCh:
			return p.failure()
		}
	}
}

// pumpBlocks moves block records from the log's stream to the sender.
func (p *Primary) pumpBlocks(ctx context.Context) error {
	for {
		r, err := p.cfg.BlockEvents.Recv(ctx)
		if err != nil {
			return fmt.Errorf("block event stream: %w", err)
		}
		select {
		case p.blockCh <- r:
		case <-ctx.Done():
			return nil
		}
	}
}

// blockBatch bounds one block frame's payload.
const blockBatch = 1 << 20

// sendLoop is the only sender on the link: block events as they come, whole
// epochs when the checkpoint loop hands one over, heartbeats when idle.
func (p *Primary) sendLoop(ctx context.Context) error {
	es := wire.NewEpochSender(p.cfg.Conn)
	hb := time.NewTicker(p.cfg.Heartbeat)
	defer hb.Stop()
	var (
		buf       []byte
		sealedEnd uint64 // highest block epoch whose end has been sent
	)
	// sendBlocks sends first and whatever else is queued (up to a batch),
	// stopping early after the end of block epoch stopAt.
	sendBlocks := func(first eventlog.Record, stopAt uint64) error {
		buf = first.AppendBinary(buf[:0])
		last, n := first, int64(1)
	batch:
		for len(buf) < blockBatch && !(last.Kind == eventlog.KindEpochEnd && last.Epoch == stopAt) {
			select {
			case r := <-p.blockCh:
				buf = r.AppendBinary(buf)
				last = r
				n++
			default:
				break batch
			}
		}
		if last.Kind == eventlog.KindEpochEnd {
			sealedEnd = last.Epoch
		}
		p.blockN.Add(n)
		p.wireBytes.Add(int64(len(buf)))
		return p.cfg.Conn.Send(ctx, wire.Frame{Type: wire.TypeBlock, Epoch: last.Epoch, Payload: buf})
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case r := <-p.blockCh:
			if err := sendBlocks(r, 0); err != nil {
				return err
			}
		case j := <-p.jobs:
			// Every block event of the epoch precedes its END.
			for sealedEnd < j.man.BlockEpoch {
				select {
				case r := <-p.blockCh:
					if err := sendBlocks(r, j.man.BlockEpoch); err != nil {
						return err
					}
				case <-ctx.Done():
					return nil
				}
			}
			if err := p.sendEpoch(ctx, es, j); err != nil {
				return err
			}
		case <-hb.C:
			if err := p.cfg.Conn.Send(ctx, wire.Frame{Type: wire.TypeHeartbeat}); err != nil {
				return err
			}
		}
	}
}

func (p *Primary) sendEpoch(ctx context.Context, es *wire.EpochSender, j job) error {
	man, _ := j.man.MarshalBinary()
	if err := es.Begin(j.man.Epoch); err != nil {
		return err
	}
	n := len(man)
	if err := es.Send(ctx, wire.TypeManifest, man); err != nil {
		return err
	}
	for _, f := range j.mem {
		if err := es.Send(ctx, wire.TypeMemory, f); err != nil {
			return err
		}
		n += len(f)
	}
	if j.man.Kind.Resumable() {
		if err := es.Send(ctx, wire.TypeDevState, j.dev); err != nil {
			return err
		}
		n += len(j.dev)
	}
	if err := es.End(ctx); err != nil {
		return err
	}
	p.wireBytes.Add(int64(n))
	p.mu.Lock()
	p.sent = j.man.Epoch
	p.mu.Unlock()
	return nil
}

// ackLoop reads the secondary's acknowledgements and heartbeats.
func (p *Primary) ackLoop(ctx context.Context) error {
	for {
		f, err := p.cfg.Conn.Recv(ctx)
		if err != nil {
			return err
		}
		switch f.Type {
		case wire.TypeHeartbeat:
		case wire.TypeAck:
			if err := p.onAck(f.Epoch); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%w: unexpected %v frame from the secondary", ErrProtocol, f.Type)
		}
	}
}

func (p *Primary) onAck(n uint64) error {
	p.mu.Lock()
	if n <= p.acked || n > p.sent {
		acked, sent := p.acked, p.sent
		p.mu.Unlock()
		return fmt.Errorf("%w: ACK(%d) with %d acknowledged and %d sent", ErrProtocol, n, acked, sent)
	}
	p.acked = n
	if t, ok := p.pausedAt[n]; ok {
		p.stats.LastAckLatency = time.Since(t)
		p.stats.Checkpoints++
	}
	for e := range p.pausedAt {
		if e <= n {
			delete(p.pausedAt, e)
		}
	}
	close(p.ackCh)
	p.ackCh = make(chan struct{})
	p.mu.Unlock()
	if p.cfg.Output != nil {
		p.cfg.Output.Release(n)
	}
	return nil
}
