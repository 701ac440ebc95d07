package lockstep_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/klauspost/compress/zstd"
)

const (
	fakePages    = 64
	fakeDiskSize = 1 << 20
)

// fakePrimary produces real epochs (memsync frames, eventlog records, wire
// epochs) without QEMU, so the secondary's handling of good and bad input
// can be tested exactly.
type fakePrimary struct {
	t      *testing.T
	rng    *rand.Rand
	ram    []byte // the "guest RAM"
	base   *memsync.Base
	enc    *memsync.Encoder
	disk   *backend.Mem
	log    *eventlog.Log
	events *eventlog.Pipe
	next   uint64
	dev    *lockstep.DevStateEncoder
	rom    []byte // the unchanging bulk of the fake device state
}

func newFakePrimary(t *testing.T) *fakePrimary {
	enc, err := memsync.NewEncoder(memsync.DefaultCodec, 1)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakePrimary{t: t, rng: rand.New(rand.NewPCG(1, 2)), ram: make([]byte, fakePages*memsync.PageSize),
		base: memsync.NewBase(fakePages), enc: enc, disk: backend.NewMem(fakeDiskSize), events: eventlog.NewPipe(64 << 20), next: 1}
	f.log = eventlog.New(f.disk, f.events, eventlog.Options{})
	if f.dev, err = lockstep.NewDevStateEncoder(); err != nil {
		t.Fatal(err)
	}
	f.rom = make([]byte, 32<<10)
	for i := range f.rom {
		f.rom[i] = byte(f.rng.IntN(256))
	}
	return f
}

// dirty writes random content into some pages and returns their snapshot.
func (f *fakePrimary) dirty(n uint64, count int) *memsync.Snapshot {
	pages := f.rng.Perm(fakePages)[:count]
	set := memsync.NewBitmap(fakePages)
	for _, p := range pages {
		set.Set(p)
		pg := f.ram[p*memsync.PageSize : (p+1)*memsync.PageSize]
		for i := range pg {
			pg[i] = byte(f.rng.IntN(4)) // compressible but changing
		}
	}
	s := &memsync.Snapshot{Epoch: n, Pages: set.Pages()}
	for _, p := range s.Pages {
		s.Data = append(s.Data, f.ram[p*memsync.PageSize:(p+1)*memsync.PageSize]...)
	}
	return s
}

type epochOut struct {
	man      lockstep.Manifest
	mem      [][]byte
	dev      []byte   // the device state
	devFrame []byte   // its payload on the wire (encoded against the last one)
	block    [][]byte // encoded block record batches, sent before the epoch
}

func (f *fakePrimary) epoch(kind lockstep.Kind, pages, writes int) epochOut {
	ctx := context.Background()
	n := f.next
	f.next++
	out := epochOut{man: lockstep.Manifest{Epoch: n, Kind: kind}}
	frame, _, err := f.enc.Encode(nil, f.dirty(n, pages), f.base)
	if err != nil {
		f.t.Fatal(err)
	}
	out.mem = [][]byte{frame}
	out.man.MemFrames = 1
	if kind.Resumable() {
		for range writes {
			off := int64(f.rng.IntN(fakeDiskSize/4096-2)) * 4096
			buf := bytes.Repeat([]byte{byte(f.rng.IntN(256))}, 8192)
			if err := f.log.WriteAt(ctx, buf, off, 0); err != nil {
				f.t.Fatal(err)
			}
		}
		if out.man.BlockEpoch, out.man.BlockSeq, err = f.log.MarkEpoch(ctx); err != nil {
			f.t.Fatal(err)
		}
		for f.events.Len() > 0 {
			r, err := f.events.Recv(ctx)
			if err != nil {
				f.t.Fatal(err)
			}
			out.block = append(out.block, r.AppendBinary(nil))
		}
		// Like QEMU's: a large part that never changes and a few bytes
		// that do.
		out.dev = fmt.Appendf(nil, "device state of epoch %d;", n)
		out.dev = append(out.dev, f.rom...)
		out.dev = fmt.Appendf(out.dev, "clock %d", f.rng.Uint64())
		if out.devFrame, _, err = f.dev.Encode(n, out.dev); err != nil {
			f.t.Fatal(err)
		}
	}
	return out
}

func (e epochOut) send(t *testing.T, c wire.Conn, es *wire.EpochSender) error {
	ctx := context.Background()
	for _, b := range e.block {
		if err := c.Send(ctx, wire.Frame{Type: wire.TypeBlock, Payload: b}); err != nil {
			return err
		}
	}
	mb, _ := e.man.MarshalBinary()
	if err := es.Begin(e.man.Epoch); err != nil {
		return err
	}
	if err := es.Send(ctx, wire.TypeManifest, mb); err != nil {
		return err
	}
	for _, m := range e.mem {
		if err := es.Send(ctx, wire.TypeMemory, m); err != nil {
			return err
		}
	}
	if e.devFrame != nil {
		if err := es.Send(ctx, wire.TypeDevState, e.devFrame); err != nil {
			return err
		}
	}
	return es.End(ctx)
}

type fakeSecondary struct {
	dir      string
	replica  *memsync.Replica
	img      *backend.File
	replayer *replay.Replayer
	sec      *lockstep.Secondary
}

func openFakeSecondary(t *testing.T, dir string) *fakeSecondary {
	t.Helper()
	ctx := context.Background()
	s := &fakeSecondary{dir: dir}
	var err error
	s.replica, err = memsync.OpenReplica(filepath.Join(dir, "ram"), fakePages*memsync.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "disk")
	if _, err := os.Stat(disk); err != nil {
		os.WriteFile(disk, nil, 0o600)
		os.Truncate(disk, fakeDiskSize)
	}
	if s.img, err = backend.OpenFile(disk, backend.FileOptions{}); err != nil {
		t.Fatal(err)
	}
	if s.replayer, err = replay.Open(ctx, s.img, filepath.Join(dir, "replay"), quiet); err != nil {
		t.Fatal(err)
	}
	if s.sec, err = lockstep.OpenSecondary(ctx, lockstep.SecondaryConfig{Replica: s.replica, Replayer: s.replayer, StateDir: filepath.Join(dir, "state"), Logger: quiet}); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *fakeSecondary) close() {
	s.replayer.Close()
	s.img.Close()
	s.replica.Close()
}

// run serves one link; it returns the conn to send on, a channel of ACKed
// epochs and Run's result.
func (s *fakeSecondary) run(t *testing.T) (wire.Conn, chan uint64, chan error) {
	a, b := wire.Pipe(16)
	acks := make(chan uint64, 16)
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { done <- s.sec.Run(ctx, b) }()
	go func() {
		for {
			f, err := a.Recv(ctx)
			if err != nil {
				return
			}
			if f.Type == wire.TypeAck {
				acks <- f.Epoch
			}
		}
	}()
	t.Cleanup(func() { cancel(); a.Close(); b.Close() })
	return a, acks, done
}

func waitAck(t *testing.T, acks chan uint64, done chan error, want uint64) {
	t.Helper()
	select {
	case n := <-acks:
		if n != want {
			t.Fatalf("ACK(%d), want ACK(%d)", n, want)
		}
	case err := <-done:
		t.Fatalf("secondary stopped before ACK(%d): %v", want, err)
	case <-time.After(10 * time.Second):
		t.Fatalf("no ACK(%d)", want)
	}
}

func waitRefused(t *testing.T, done chan error, want error) error {
	t.Helper()
	select {
	case err := <-done:
		if !errors.Is(err, want) {
			t.Fatalf("secondary stopped with %v, want %v", err, want)
		}
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("secondary accepted bad input")
	}
	return nil
}

// snapshot of the secondary's committed files, to prove bad input left them
// untouched.
func (s *fakeSecondary) files(t *testing.T) (ram, disk []byte) {
	t.Helper()
	ram, err := os.ReadFile(filepath.Join(s.dir, "ram"))
	if err != nil {
		t.Fatal(err)
	}
	disk, err = os.ReadFile(filepath.Join(s.dir, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	return ram, disk
}

func TestSecondaryCommitsGoodEpochs(t *testing.T) {
	p := newFakePrimary(t)
	s := openFakeSecondary(t, t.TempDir())
	defer s.close()
	c, acks, done := s.run(t)
	es := wire.NewEpochSender(c)
	if err := p.epoch(lockstep.KindSync, 20, 0).send(t, c, es); err != nil {
		t.Fatal(err)
	}
	waitAck(t, acks, done, 1)
	if got := s.sec.Committed(); got.Epoch != 1 || got.Resumable {
		t.Fatalf("after a sync epoch: %+v", got)
	}
	if _, _, err := s.sec.DeviceState(); !errors.Is(err, lockstep.ErrNotPromotable) {
		t.Fatalf("DeviceState during sync = %v, want ErrNotPromotable", err)
	}
	var last epochOut
	for i := 0; i < 3; i++ {
		last = p.epoch(lockstep.KindCheckpoint, 5, 4)
		if err := last.send(t, c, es); err != nil {
			t.Fatal(err)
		}
		waitAck(t, acks, done, last.man.Epoch)
	}
	ram, disk := s.files(t)
	if !bytes.Equal(ram, p.ram) {
		t.Fatal("replica RAM differs from the primary's")
	}
	if !bytes.Equal(disk, p.disk.Snapshot()) {
		t.Fatal("replica disk differs from the primary's")
	}
	dev, n, err := s.sec.DeviceState()
	if err != nil || n != last.man.Epoch || !bytes.Equal(dev, last.dev) {
		t.Fatalf("DeviceState = %q, %d, %v", dev, n, err)
	}

	// Reopening (an agent restart) keeps the committed checkpoint.
	c.Close()
	<-done
	s.close()
	s2 := openFakeSecondary(t, s.dir)
	defer s2.close()
	if got := s2.sec.Committed(); got.Epoch != last.man.Epoch || !got.Resumable {
		t.Fatalf("after reopening: %+v, want epoch %d", got, last.man.Epoch)
	}
}

// badCase sends some good epochs, then one bad one, and checks the bad one
// is refused with the right error and leaves the committed files as they
// were.
func badCase(t *testing.T, want error, bad func(p *fakePrimary, c wire.Conn, es *wire.EpochSender) error) {
	t.Helper()
	p := newFakePrimary(t)
	s := openFakeSecondary(t, t.TempDir())
	defer s.close()
	c, acks, done := s.run(t)
	es := wire.NewEpochSender(c)
	for _, k := range []lockstep.Kind{lockstep.KindSync, lockstep.KindCheckpoint} {
		e := p.epoch(k, 8, 3)
		if err := e.send(t, c, es); err != nil {
			t.Fatal(err)
		}
		waitAck(t, acks, done, e.man.Epoch)
	}
	ram, disk := s.files(t)
	if err := bad(p, c, es); err != nil {
		t.Fatal(err)
	}
	err := waitRefused(t, done, want)
	t.Logf("refused: %v", err)
	if got := s.sec.Committed(); got.Epoch != 2 {
		t.Fatalf("committed epoch moved to %d on bad input", got.Epoch)
	}
	ram2, disk2 := s.files(t)
	if !bytes.Equal(ram, ram2) || !bytes.Equal(disk, disk2) {
		t.Fatal("bad input changed committed replica state")
	}
	if _, n, err := s.sec.DeviceState(); err != nil || n != 2 {
		t.Fatalf("device state after bad input: epoch %d, %v", n, err)
	}
}

func TestSecondaryRefusesCorruptMemoryFrame(t *testing.T) {
	badCase(t, lockstep.ErrProtocol, func(p *fakePrimary, c wire.Conn, es *wire.EpochSender) error {
		e := p.epoch(lockstep.KindCheckpoint, 8, 0)
		e.mem[0][len(e.mem[0])/2] ^= 0x40 // corrupt inside the frame, under a valid epoch digest
		return e.send(t, c, es)
	})
}

func TestSecondaryRefusesWrongFrameCount(t *testing.T) {
	badCase(t, lockstep.ErrProtocol, func(p *fakePrimary, c wire.Conn, es *wire.EpochSender) error {
		e := p.epoch(lockstep.KindCheckpoint, 8, 0)
		e.man.MemFrames = 2
		return e.send(t, c, es)
	})
}

func TestSecondaryRefusesCheckpointWithoutDeviceState(t *testing.T) {
	badCase(t, lockstep.ErrProtocol, func(p *fakePrimary, c wire.Conn, es *wire.EpochSender) error {
		e := p.epoch(lockstep.KindCheckpoint, 8, 0)
		e.devFrame = nil
		e.man.MemFrames = 1
		return e.send(t, c, es)
	})
}

func TestSecondaryRefusesEndBeforeItsBlockEvents(t *testing.T) {
	badCase(t, lockstep.ErrProtocol, func(p *fakePrimary, c wire.Conn, es *wire.EpochSender) error {
		e := p.epoch(lockstep.KindCheckpoint, 8, 3)
		e.block = e.block[:len(e.block)-1] // the block epoch's end never arrives
		return e.send(t, c, es)
	})
}

func TestSecondaryRefusesCorruptBlockEvent(t *testing.T) {
	badCase(t, lockstep.ErrProtocol, func(p *fakePrimary, c wire.Conn, es *wire.EpochSender) error {
		e := p.epoch(lockstep.KindCheckpoint, 8, 3)
		e.block[0][len(e.block[0])-1] ^= 1
		return e.send(t, c, es)
	})
}

func TestSecondaryRefusesSyncAfterCheckpoint(t *testing.T) {
	badCase(t, lockstep.ErrProtocol, func(p *fakePrimary, c wire.Conn, es *wire.EpochSender) error {
		return p.epoch(lockstep.KindSync, 8, 0).send(t, c, es)
	})
}

func TestSecondaryRefusesReplayedEpoch(t *testing.T) {
	p := newFakePrimary(t)
	s := openFakeSecondary(t, t.TempDir())
	defer s.close()
	c, acks, done := s.run(t)
	es := wire.NewEpochSender(c)
	e1 := p.epoch(lockstep.KindSync, 8, 0)
	e2 := p.epoch(lockstep.KindCheckpoint, 8, 2)
	for _, e := range []epochOut{e1, e2} {
		if err := e.send(t, c, es); err != nil {
			t.Fatal(err)
		}
		waitAck(t, acks, done, e.man.Epoch)
	}
	ram, disk := s.files(t)
	c.Close()
	<-done
	// A new link replays epoch 2 (an attacker or a confused primary).
	c2, _, done2 := s.run(t)
	e2.block = nil
	if err := e2.send(t, c2, wire.NewEpochSender(c2)); err != nil {
		t.Fatal(err)
	}
	err := waitRefused(t, done2, wire.ErrTornEpoch)
	t.Logf("refused: %v", err)
	ram2, disk2 := s.files(t)
	if !bytes.Equal(ram, ram2) || !bytes.Equal(disk, disk2) || s.sec.Committed().Epoch != 2 {
		t.Fatal("a replayed epoch changed committed state")
	}
}

// TestSecondaryFinishesCommitAfterCrash: a crash after the RAM committed
// epoch N but before the disk was replayed is finished on reopen, so RAM,
// disk and device state are all at N.
func TestSecondaryFinishesCommitAfterCrash(t *testing.T) {
	p := newFakePrimary(t)
	s := openFakeSecondary(t, t.TempDir())
	c, acks, done := s.run(t)
	es := wire.NewEpochSender(c)
	for _, k := range []lockstep.Kind{lockstep.KindSync, lockstep.KindCheckpoint} {
		e := p.epoch(k, 8, 3)
		if err := e.send(t, c, es); err != nil {
			t.Fatal(err)
		}
		waitAck(t, acks, done, e.man.Epoch)
	}
	crash := errors.New("simulated crash")
	lockstep.CrashAfterRAMCommit(s.sec, crash)
	e3 := p.epoch(lockstep.KindCheckpoint, 8, 5)
	if err := e3.send(t, c, es); err != nil {
		t.Fatal(err)
	}
	waitRefused(t, done, crash)
	if _, disk := s.files(t); bytes.Equal(disk, p.disk.Snapshot()) {
		t.Fatal("test is void: the disk already holds epoch 3 before the reopen")
	}
	s.close()
	s2 := openFakeSecondary(t, s.dir)
	defer s2.close()
	if got := s2.sec.Committed(); got.Epoch != 3 || !got.Resumable {
		t.Fatalf("after reopening: %+v, want epoch 3", got)
	}
	ram, disk := s2.files(t)
	if !bytes.Equal(ram, p.ram) || !bytes.Equal(disk, p.disk.Snapshot()) {
		t.Fatal("reopen did not bring RAM and disk to the same epoch")
	}
	if dev, n, err := s2.sec.DeviceState(); err != nil || n != 3 || !bytes.Equal(dev, e3.dev) {
		t.Fatalf("device state after reopen: %q %d %v", dev, n, err)
	}
}

// TestSecondaryRefusesBadDeviceState: a device-state payload that is
// malformed, relative to a base the replica does not hold, or that does not
// decode to exactly what its header promises is refused with ErrProtocol,
// and the committed checkpoint (RAM, disk, device state) stays as it was.
func TestSecondaryRefusesBadDeviceState(t *testing.T) {
	const (
		offCodec     = 1
		offBaseEpoch = 2
		offBaseSum   = 10
		offRawLen    = 18
		offSum       = 22
	)
	bomb, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		mangle func(t *testing.T, p *fakePrimary, e *epochOut)
	}{
		{"ShortHeader", func(t *testing.T, p *fakePrimary, e *epochOut) {
			e.devFrame = e.devFrame[:lockstep.DevHeaderLen-1]
		}},
		{"Version", func(t *testing.T, p *fakePrimary, e *epochOut) { e.devFrame[0]++ }},
		{"UnknownCodec", func(t *testing.T, p *fakePrimary, e *epochOut) { e.devFrame[offCodec] = 77 }},
		{"BaseIsSyncEpoch", func(t *testing.T, p *fakePrimary, e *epochOut) {
			binary.BigEndian.PutUint64(e.devFrame[offBaseEpoch:], 1)
		}},
		{"BaseIsItself", func(t *testing.T, p *fakePrimary, e *epochOut) {
			binary.BigEndian.PutUint64(e.devFrame[offBaseEpoch:], e.man.Epoch)
		}},
		{"BaseChecksum", func(t *testing.T, p *fakePrimary, e *epochOut) { e.devFrame[offBaseSum+7] ^= 1 }},
		{"OtherBase", func(t *testing.T, p *fakePrimary, e *epochOut) {
			// A primary whose previous state differs from the committed one
			// (the same epoch numbers): the base checksum gives it away.
			enc, err := lockstep.NewDevStateEncoder()
			if err != nil {
				t.Fatal(err)
			}
			other := bytes.Clone(e.dev)
			other[len(other)/2] ^= 0xff
			if _, _, err := enc.Encode(e.man.Epoch-1, other); err != nil {
				t.Fatal(err)
			}
			if e.devFrame, _, err = enc.Encode(e.man.Epoch, e.dev); err != nil {
				t.Fatal(err)
			}
		}},
		{"StateChecksum", func(t *testing.T, p *fakePrimary, e *epochOut) { e.devFrame[offSum] ^= 0x80 }},
		{"CorruptBody", func(t *testing.T, p *fakePrimary, e *epochOut) {
			e.devFrame[lockstep.DevHeaderLen+(len(e.devFrame)-lockstep.DevHeaderLen)/2] ^= 0x5a
		}},
		{"TruncatedBody", func(t *testing.T, p *fakePrimary, e *epochOut) { e.devFrame = e.devFrame[:len(e.devFrame)-3] }},
		{"LengthShort", func(t *testing.T, p *fakePrimary, e *epochOut) {
			binary.BigEndian.PutUint32(e.devFrame[offRawLen:], uint32(len(e.dev)-1))
		}},
		{"LengthLong", func(t *testing.T, p *fakePrimary, e *epochOut) {
			binary.BigEndian.PutUint32(e.devFrame[offRawLen:], uint32(len(e.dev)+1))
		}},
		{"LengthOverBound", func(t *testing.T, p *fakePrimary, e *epochOut) {
			binary.BigEndian.PutUint32(e.devFrame[offRawLen:], lockstep.MaxDevState+1)
		}},
		{"Bomb", func(t *testing.T, p *fakePrimary, e *epochOut) {
			// A small payload announcing 1 KiB that inflates to 16 MiB.
			hdr := make([]byte, lockstep.DevHeaderLen)
			hdr[0], hdr[offCodec] = e.devFrame[0], 1 // version, whole state (zstd)
			binary.BigEndian.PutUint32(hdr[offRawLen:], 1024)
			e.devFrame = bomb.EncodeAll(make([]byte, 16<<20), hdr)
			if len(e.devFrame) > 64<<10 {
				t.Fatalf("test is void: the bomb is %d bytes", len(e.devFrame))
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			badCase(t, lockstep.ErrProtocol, func(p *fakePrimary, conn wire.Conn, es *wire.EpochSender) error {
				e := p.epoch(lockstep.KindCheckpoint, 8, 0)
				c.mangle(t, p, &e)
				return e.send(t, conn, es)
			})
		})
	}
}

// TestSecondaryDeviceStateDeltas: after the first checkpoint, device states
// travel as small deltas, the secondary stores them decoded (what Promote
// restores), and a reopened secondary decodes the next delta against the
// state it stored before the restart.
func TestSecondaryDeviceStateDeltas(t *testing.T) {
	p := newFakePrimary(t)
	s := openFakeSecondary(t, t.TempDir())
	c, acks, done := s.run(t)
	es := wire.NewEpochSender(c)
	send := func(c wire.Conn, es *wire.EpochSender, acks chan uint64, done chan error, e epochOut) {
		t.Helper()
		if err := e.send(t, c, es); err != nil {
			t.Fatal(err)
		}
		waitAck(t, acks, done, e.man.Epoch)
		if !e.man.Kind.Resumable() {
			return
		}
		dev, n, err := s.sec.DeviceState()
		if err != nil || n != e.man.Epoch || !bytes.Equal(dev, e.dev) {
			t.Fatalf("epoch %d: stored device state of epoch %d (%v) differs from the primary's", e.man.Epoch, n, err)
		}
	}
	send(c, es, acks, done, p.epoch(lockstep.KindSync, 8, 0))
	first := p.epoch(lockstep.KindCheckpoint, 8, 2)
	send(c, es, acks, done, first)
	for range 3 {
		e := p.epoch(lockstep.KindCheckpoint, 8, 2)
		if len(e.devFrame)*20 > len(first.devFrame) {
			t.Fatalf("epoch %d: delta of %d bytes, the first (full) state took %d", e.man.Epoch, len(e.devFrame), len(first.devFrame))
		}
		send(c, es, acks, done, e)
	}
	c.Close()
	<-done
	s.close()

	s = openFakeSecondary(t, s.dir)
	defer s.close()
	c2, acks2, done2 := s.run(t)
	e := p.epoch(lockstep.KindCheckpoint, 8, 2)
	if len(e.devFrame)*20 > len(first.devFrame) {
		t.Fatalf("epoch %d: %d bytes, not a delta", e.man.Epoch, len(e.devFrame))
	}
	send(c2, wire.NewEpochSender(c2), acks2, done2, e)
}
