package lockstep

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ftctl/ftctl/internal/fsutil"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/qmp"
)

// SecondaryConfig wires a receiver to one replica.
type SecondaryConfig struct {
	Replica  *memsync.Replica // replica RAM (the standby QEMU maps its file)
	Replayer *replay.Replayer // replica disk; nil when the VM has no replicated disk
	// StateDir keeps each committed epoch's manifest and device state.
	StateDir  string
	Heartbeat time.Duration // idle interval between heartbeats (default 100ms)
	Logger    *slog.Logger
	// OnCommit, if set, is called after each epoch committed.
	OnCommit func(CommitStats)
	// OnControl, if set, receives the payload of control frames (the
	// agents' own messages, e.g. a planned switchover). An error it returns
	// ends Run with that error; without it, control frames are refused.
	OnControl func(ctx context.Context, payload []byte) error
}

// CommitStats are one committed epoch's figures on the secondary.
type CommitStats struct {
	Manifest Manifest
	Pages    int
	// DevStateBytes is the device state's payload as it arrived,
	// DevStateRawBytes the state decoded from it (and stored).
	DevStateBytes, DevStateRawBytes int
	Stage, Commit                   time.Duration
}

// Committed describes the replica's committed state.
type Committed struct {
	Epoch uint64 // last committed epoch (0: none)
	Kind  Kind
	// Resumable: the replica holds a complete checkpoint (RAM, disk and
	// device state of one epoch) that a standby can resume.
	Resumable bool
}

// Secondary receives epochs from a primary and commits them.
type Secondary struct {
	cfg SecondaryConfig
	log *slog.Logger

	mu        sync.Mutex
	committed Committed
	// devBase caches the committed checkpoint's decoded device state, the
	// base of the next epoch's; empty after a restart (the file is read).
	devBase struct {
		epoch uint64
		state []byte
	}
	sendMu sync.Mutex

	// crashAfterRAMCommit, set by tests only, stops a commit right after
	// its commit point, the way a crash there would.
	crashAfterRAMCommit func() error
}

// OpenSecondary opens the receiver's state and finishes a commit that a
// crash interrupted (RAM committed, disk not yet replayed).
func OpenSecondary(ctx context.Context, cfg SecondaryConfig) (*Secondary, error) {
	if cfg.Replica == nil || cfg.StateDir == "" {
		return nil, fmt.Errorf("%w: secondary needs a replica and a state directory", ErrConfig)
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 100 * time.Millisecond
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Secondary{cfg: cfg, log: log}
	e := cfg.Replica.Epoch()
	if e > 0 {
		b, err := os.ReadFile(s.metaPath(e))
		if err != nil {
			return nil, fmt.Errorf("lockstep: replica RAM is at epoch %d but its manifest is unreadable: %w", e, err)
		}
		var m Manifest
		if err := m.UnmarshalBinary(b); err != nil || m.Epoch != e {
			return nil, fmt.Errorf("lockstep: manifest of committed epoch %d is damaged: %v", e, err)
		}
		if m.BlockEpoch != 0 {
			if cfg.Replayer == nil {
				return nil, fmt.Errorf("%w: committed epoch %d has disk writes but no replayer is configured", ErrConfig, e)
			}
			if err := cfg.Replayer.Commit(ctx, m.BlockEpoch); err != nil {
				return nil, fmt.Errorf("lockstep: finishing the disk commit of epoch %d: %w", e, err)
			}
		}
		s.committed = Committed{Epoch: e, Kind: m.Kind, Resumable: m.Kind.Resumable()}
	}
	s.prune(e)
	return s, nil
}

func (s *Secondary) metaPath(e uint64) string {
	return filepath.Join(s.cfg.StateDir, fmt.Sprintf("manifest-%020d", e))
}

func (s *Secondary) devPath(e uint64) string {
	return filepath.Join(s.cfg.StateDir, fmt.Sprintf("devstate-%020d", e))
}

// prune removes state of epochs other than keep (older ones are obsolete,
// newer ones never committed).
func (s *Secondary) prune(keep uint64) {
	ents, _ := os.ReadDir(s.cfg.StateDir)
	for _, d := range ents {
		name := d.Name()
		if strings.HasPrefix(name, ".") { // a temporary file a crash left
			os.Remove(filepath.Join(s.cfg.StateDir, name))
			continue
		}
		_, num, ok := strings.Cut(name, "-")
		if !ok || (!strings.HasPrefix(name, "manifest-") && !strings.HasPrefix(name, "devstate-")) {
			continue
		}
		e, err := strconv.ParseUint(strings.TrimSuffix(num, ".tmp"), 10, 64)
		if err != nil || (e == keep && !strings.HasSuffix(name, ".tmp")) {
			continue
		}
		os.Remove(filepath.Join(s.cfg.StateDir, name))
	}
}

// Committed returns the replica's committed state.
func (s *Secondary) Committed() Committed {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.committed
}

// DeviceState returns the device state of the committed checkpoint.
func (s *Secondary) DeviceState() ([]byte, uint64, error) {
	c := s.Committed()
	if !c.Resumable {
		return nil, c.Epoch, ErrNotPromotable
	}
	b, err := os.ReadFile(s.devPath(c.Epoch))
	if err != nil {
		return nil, c.Epoch, fmt.Errorf("lockstep: device state of epoch %d: %w", c.Epoch, err)
	}
	return b, c.Epoch, nil
}

func (s *Secondary) send(ctx context.Context, c wire.Conn, f wire.Frame) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return c.Send(ctx, f)
}

// Run receives from conn until it fails or ctx ends. An epoch that does
// not arrive whole and verified is discarded; the committed state is never
// touched by bad input. Run returns the link's error (or a protocol
// violation); the caller decides between waiting for a new link and
// promoting.
//
// A failed write (an ACK or a heartbeat) does not end Run at once: the
// primary may have sent its last message (that its VM died) and closed the
// link just before, so Run goes on reading what had arrived until the link
// ends there too (wire.Conn promises that it does).
func (s *Secondary) Run(ctx context.Context, conn wire.Conn) error {
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var sendErr sendFailure
	hbDone := make(chan struct{})
	go func() {
		defer close(hbDone)
		t := time.NewTicker(s.cfg.Heartbeat)
		defer t.Stop()
		for {
			select {
			case <-hctx.Done():
				return
			case <-t.C:
				if err := s.send(hctx, conn, wire.Frame{Type: wire.TypeHeartbeat}); err != nil {
					if hctx.Err() == nil {
						sendErr.set(err)
					}
					return
				}
			}
		}
	}()
	err := s.receive(ctx, conn, &sendErr)
	cancel()
	<-hbDone
	if first := sendErr.get(); first != nil && (err == nil || errors.Is(err, wire.ErrClosed)) {
		// The link failed on a write first: that says why it ended.
		err = first
	}
	// Staged pages of an epoch that did not complete are dropped now;
	// staged block events wait in the replayer until the next commit or
	// promotion discards them.
	s.cfg.Replica.Discard()
	return err
}

// sendFailure keeps the first failed write on a link.
type sendFailure struct {
	mu  sync.Mutex
	err error
}

func (f *sendFailure) set(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.mu.Unlock()
}

func (f *sendFailure) get() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

func (s *Secondary) receive(ctx context.Context, conn wire.Conn, sendErr *sendFailure) error {
	er := wire.NewEpochReceiver(conn)
	if c := s.Committed(); c.Epoch > 0 {
		// A new link must continue where the replica is: an older epoch
		// (replayed) or a later one (skipped) is refused.
		er.ResumeAfter(c.Epoch)
	}
	for {
		ep, oob, err := er.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if oob != nil {
			if err := s.handleOOB(ctx, *oob); err != nil {
				return err
			}
			continue
		}
		// An epoch that arrived whole is committed even once ACKs can no
		// longer be sent: a later checkpoint is as good to resume.
		if err := s.commit(ctx, ep); err != nil {
			return err
		}
		if sendErr.get() != nil {
			continue
		}
		if err := s.send(ctx, conn, wire.Frame{Type: wire.TypeAck, Epoch: ep.N}); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			sendErr.set(err)
		}
	}
}

func (s *Secondary) handleOOB(ctx context.Context, f wire.Frame) error {
	switch f.Type {
	case wire.TypeHeartbeat:
		return nil
	case wire.TypeControl:
		if s.cfg.OnControl == nil {
			return fmt.Errorf("%w: control frame, but no handler is configured", ErrProtocol)
		}
		return s.cfg.OnControl(ctx, f.Payload)
	case wire.TypeBlock:
		if s.cfg.Replayer == nil {
			return fmt.Errorf("%w: block events for a VM without a replicated disk", ErrProtocol)
		}
		for b := f.Payload; len(b) > 0; {
			r, n, err := eventlog.Decode(b)
			if err != nil {
				return fmt.Errorf("%w: block frame: %w", ErrProtocol, err)
			}
			if err := s.cfg.Replayer.Stage(ctx, r); err != nil {
				return fmt.Errorf("%w: block event: %w", ErrProtocol, err)
			}
			b = b[n:]
		}
		return nil
	}
	return fmt.Errorf("%w: unexpected %v frame outside an epoch", ErrProtocol, f.Type)
}

// commit stages and commits one verified epoch (see the package doc for
// why this order survives a crash at any point).
func (s *Secondary) commit(ctx context.Context, ep *wire.Epoch) (err error) {
	t0 := time.Now()
	prev := s.Committed()
	if len(ep.Frames) == 0 || ep.Frames[0].Type != wire.TypeManifest {
		return fmt.Errorf("%w: epoch %d does not start with a manifest", ErrProtocol, ep.N)
	}
	var m Manifest
	if err := m.UnmarshalBinary(ep.Frames[0].Payload); err != nil {
		return err
	}
	want := 1 + int(m.MemFrames)
	if m.Kind.Resumable() {
		want++
	}
	switch {
	case m.Epoch != ep.N:
		return fmt.Errorf("%w: manifest of epoch %d inside epoch %d", ErrProtocol, m.Epoch, ep.N)
	case m.Epoch != prev.Epoch+1:
		return fmt.Errorf("%w: epoch %d after committed epoch %d", ErrProtocol, m.Epoch, prev.Epoch)
	case len(ep.Frames) != want:
		return fmt.Errorf("%w: epoch %d has %d frames, its manifest announces %d", ErrProtocol, m.Epoch, len(ep.Frames), want)
	case prev.Resumable && m.Kind == KindSync:
		return fmt.Errorf("%w: sync epoch %d after checkpoint epoch %d", ErrProtocol, m.Epoch, prev.Epoch)
	}
	if m.BlockEpoch != 0 {
		if s.cfg.Replayer == nil {
			return fmt.Errorf("%w: epoch %d closes block epoch %d but the VM has no replicated disk", ErrProtocol, m.Epoch, m.BlockEpoch)
		}
		open, last := s.cfg.Replayer.Staged()
		if open <= m.BlockEpoch || last < m.BlockSeq {
			return fmt.Errorf("%w: epoch %d closes block epoch %d (seq %d) but only epochs before %d (seq %d) arrived",
				ErrProtocol, m.Epoch, m.BlockEpoch, m.BlockSeq, open, last)
		}
	}
	defer func() {
		if err != nil {
			s.cfg.Replica.Discard()
		}
	}()
	pages := 0
	for _, f := range ep.Frames[1 : 1+m.MemFrames] {
		if f.Type != wire.TypeMemory {
			return fmt.Errorf("%w: epoch %d: %v frame where memory was announced", ErrProtocol, m.Epoch, f.Type)
		}
		e, err := s.cfg.Replica.StageFrame(f.Payload)
		if err != nil {
			return fmt.Errorf("%w: epoch %d: memory frame: %w", ErrProtocol, m.Epoch, err)
		}
		if e != m.Epoch {
			return fmt.Errorf("%w: memory frame of epoch %d inside epoch %d", ErrProtocol, e, m.Epoch)
		}
	}
	if _, n, ok := s.cfg.Replica.Staged(); ok {
		pages = n
	}
	var dev, devWire []byte
	if m.Kind.Resumable() {
		f := ep.Frames[len(ep.Frames)-1]
		if f.Type != wire.TypeDevState || len(f.Payload) == 0 {
			return fmt.Errorf("%w: checkpoint epoch %d lacks its device state", ErrProtocol, m.Epoch)
		}
		devWire = f.Payload
		if dev, err = s.decodeDevState(m.Epoch, prev, devWire); err != nil {
			return err
		}
		if err := fsutil.WriteFileAtomic(s.devPath(m.Epoch), dev, 0o600); err != nil {
			return fmt.Errorf("lockstep: store device state of epoch %d: %w", m.Epoch, err)
		}
	}
	mb, _ := m.MarshalBinary()
	if err := fsutil.WriteFileAtomic(s.metaPath(m.Epoch), mb, 0o600); err != nil {
		return fmt.Errorf("lockstep: store manifest of epoch %d: %w", m.Epoch, err)
	}
	t1 := time.Now()
	// The commit point: the replica journal makes RAM move to epoch N
	// atomically; everything after it is redone by OpenSecondary.
	if err := s.cfg.Replica.Commit(ctx, m.Epoch); err != nil {
		return fmt.Errorf("lockstep: commit RAM of epoch %d: %w", m.Epoch, err)
	}
	if s.crashAfterRAMCommit != nil {
		if err := s.crashAfterRAMCommit(); err != nil {
			return err
		}
	}
	if m.BlockEpoch != 0 {
		if err := s.cfg.Replayer.Commit(ctx, m.BlockEpoch); err != nil {
			return fmt.Errorf("lockstep: commit disk of epoch %d: %w", m.Epoch, err)
		}
	}
	s.mu.Lock()
	s.committed = Committed{Epoch: m.Epoch, Kind: m.Kind, Resumable: m.Kind.Resumable()}
	s.devBase.epoch, s.devBase.state = m.Epoch, dev
	s.mu.Unlock()
	s.prune(m.Epoch)
	if s.cfg.OnCommit != nil {
		s.cfg.OnCommit(CommitStats{Manifest: m, Pages: pages, DevStateBytes: len(devWire), DevStateRawBytes: len(dev),
			Stage: t1.Sub(t0), Commit: time.Since(t1)})
	}
	return nil
}

// decodeDevState rebuilds epoch n's device state from its payload; a delta
// must be relative to the committed checkpoint prev, the only base this
// replica holds.
func (s *Secondary) decodeDevState(n uint64, prev Committed, payload []byte) ([]byte, error) {
	h, body, err := parseDevHeader(payload)
	if err != nil {
		return nil, fmt.Errorf("epoch %d: %w", n, err)
	}
	var base []byte
	if h.BaseEpoch != 0 {
		if !prev.Resumable || h.BaseEpoch != prev.Epoch {
			return nil, fmt.Errorf("%w: epoch %d: device state is relative to epoch %d, the replica holds checkpoint %d (resumable %v)",
				ErrProtocol, n, h.BaseEpoch, prev.Epoch, prev.Resumable)
		}
		s.mu.Lock()
		if s.devBase.epoch == prev.Epoch {
			base = s.devBase.state
		}
		s.mu.Unlock()
		if base == nil {
			if base, err = os.ReadFile(s.devPath(prev.Epoch)); err != nil {
				return nil, fmt.Errorf("lockstep: epoch %d: base device state of epoch %d: %w", n, prev.Epoch, err)
			}
		}
	}
	dev, err := decodeDevState(h, body, base)
	if err != nil {
		return nil, fmt.Errorf("epoch %d: %w", n, err)
	}
	return dev, nil
}

// Promote resumes the committed checkpoint in a standby QEMU: one started
// with -incoming defer over the replica RAM file and the replica disk.
// Staged, uncommitted work is dropped first (DESIGN.md invariant 2: the
// disk must match the memory epoch being resumed). Run must have returned.
func (s *Secondary) Promote(ctx context.Context, standby *qmp.Client) (uint64, error) {
	dev, e, err := s.DeviceState()
	if err != nil {
		return e, err
	}
	s.cfg.Replica.Discard()
	if s.cfg.Replayer != nil {
		if err := s.cfg.Replayer.Discard(ctx); err != nil {
			return e, fmt.Errorf("lockstep: drop uncommitted disk writes: %w", err)
		}
	}
	if err := checkpoint.RestoreDeviceState(ctx, standby, dev, true); err != nil {
		return e, err
	}
	// Move the VM's addresses to this host: switches learn the guest MAC
	// from the announcement frames.
	if err := standby.AnnounceSelf(ctx); err != nil {
		s.log.Warn("announce-self failed", "err", err)
	}
	return e, nil
}
