package lockstep_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/blockreplay"
	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/initsync"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/vm"
)

const (
	memMiB   = 128
	diskSize = 16 << 20
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// pair is a protected guest on one host: a primary QEMU whose disk is served
// by a logging NBD export, and a secondary replica (RAM file, disk image,
// state) fed over a link.
type pair struct {
	t        testing.TB
	dir      string
	spec     vm.Spec
	primary  *vm.Machine
	export   *blockreplay.Export
	region   *memsync.Region
	replica  *memsync.Replica
	replayer *replay.Replayer
	replDisk string
	primDisk string
	prim     *lockstep.Primary
	sec      *lockstep.Secondary

	primErr, secErr   chan error
	primDone, secDone chan struct{} // closed when Run returned
	cancel            context.CancelFunc
}

type linkFunc func(t *testing.T) (primary, secondary wire.Conn)

func pipeLink(t *testing.T) (wire.Conn, wire.Conn) {
	a, b := wire.Pipe(64)
	return a, b
}

// tlsLink is a real link: TCP on loopback with mutual TLS, credentials
// issued by a fresh pair CA, as `ftctl cert` makes them.
func tlsLink(t *testing.T) (wire.Conn, wire.Conn) { return tlsLinkTB(t) }

// tlsLinkTB is tlsLink for benchmarks too.
func tlsLinkTB(t testing.TB) (wire.Conn, wire.Conn) {
	t.Helper()
	ctx := context.Background()
	ca, err := wire.NewCA("test-pair")
	if err != nil {
		t.Fatal(err)
	}
	creds := func(name string) *wire.Credentials {
		cert, key, err := ca.Issue(name, []string{"127.0.0.1", "localhost"})
		if err != nil {
			t.Fatal(err)
		}
		c, err := wire.CredentialsFromPEM(ca.CertPEM(), cert, key)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ln, err := wire.Listen(ctx, "127.0.0.1:0", creds("host-b"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan wire.Conn, 1)
	go func() {
		c, err := ln.Accept(ctx)
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	a, err := wire.Dial(ctx, ln.Addr().String(), creds("host-a"))
	if err != nil {
		t.Fatal(err)
	}
	b := <-accepted
	if b == nil {
		t.FailNow()
	}
	if b.Peer() != "host-a" || a.Peer() != "host-b" {
		t.Fatalf("peers authenticated as %q and %q", b.Peer(), a.Peer())
	}
	return a, b
}

// pairOptions shape a pair; zero values give the defaults.
type pairOptions struct {
	link     linkFunc                      // default pipeLink
	workload string                        // ftguest.* words; default counter and disk
	memMiB   int                           // default memMiB
	primary  func(*lockstep.PrimaryConfig) // adjusts the coordinator's config
	// linkTB, if set, replaces link; it works for benchmarks too (newPair
	// takes a testing.TB, link needs a *testing.T).
	linkTB func(testing.TB) (wire.Conn, wire.Conn)

	nics      []vm.NIC                        // the primary's NICs; default none
	secondary func(*lockstep.SecondaryConfig) // adjusts the receiver's config
	tracker   memsync.Kind                    // default: probe (soft-dirty if it works, else shadow)
	// unprotected boots the primary (same spec, same disk export) and
	// stops there: no tracker, replica or coordinator. A baseline for
	// benchmarks; p.prim and p.sec stay nil.
	unprotected bool
}

func newPair(t testing.TB, ctx context.Context, o pairOptions) *pair {
	t.Helper()
	if o.link == nil {
		o.link = pipeLink
	}
	if o.workload == "" {
		o.workload = "ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=30ms"
	}
	if o.memMiB == 0 {
		o.memMiB = memMiB
	}
	img := testenv.Guest(t)
	p := &pair{t: t, dir: t.TempDir(), primErr: make(chan error, 1), secErr: make(chan error, 1),
		primDone: make(chan struct{}), secDone: make(chan struct{})}
	p.primDisk = filepath.Join(p.dir, "primary.raw")
	p.replDisk = filepath.Join(p.dir, "replica.raw")
	for _, d := range []string{p.primDisk, p.replDisk} {
		if err := os.WriteFile(d, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(d, diskSize); err != nil {
			t.Fatal(err)
		}
	}

	// Primary side: the disk served by a logging export.
	events := eventlog.NewPipe(32 << 20)
	ex, err := blockreplay.OpenExport(blockreplay.ExportConfig{Path: p.primDisk, Name: "vda", Sink: events})
	if err != nil {
		t.Fatal(err)
	}
	p.export = ex
	sock := filepath.Join(p.dir, "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { defer close(served); ex.Serve(sctx, ln) }()
	t.Cleanup(func() { scancel(); <-served; ex.Close() })

	p.spec = vm.Spec{
		Name: "ls", MemoryMiB: o.memMiB, Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline: img.Cmdline + " " + o.workload,
		Disks:   []vm.Disk{{NBD: &vm.NBD{Socket: sock, Export: "vda"}}},
		NICs:    o.nics,
		Accel:   vm.AccelTCG,
	}
	p.primary, err = vm.Start(ctx, p.spec, vm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.primary.Close() })
	if err := p.primary.WaitSerial(ctx, func(b []byte) bool { return bytes.Contains(b, []byte("ftguest ready")) }); err != nil {
		t.Fatal(err)
	}
	if o.unprotected {
		return p
	}
	p.region, err = memsync.OpenRegion(p.primary.RAMFile(), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.region.Close() })
	tracker, err := memsync.New(ctx, memsync.Config{Kind: o.tracker, PID: p.primary.PID(), Region: p.region})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tracker.Close() })

	// Secondary side.
	p.replica, err = memsync.OpenReplica(filepath.Join(p.dir, "replica.ram"), int64(o.memMiB)<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.replica.Close() })
	rimg, err := backend.OpenFile(p.replDisk, backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rimg.Close() })
	p.replayer, err = replay.Open(ctx, rimg, filepath.Join(p.dir, "replay"), quiet)
	if err != nil {
		t.Fatal(err)
	}
	scfg := lockstep.SecondaryConfig{
		Replica: p.replica, Replayer: p.replayer, StateDir: filepath.Join(p.dir, "state"), Logger: quiet,
	}
	if o.secondary != nil {
		o.secondary(&scfg)
	}
	p.sec, err = lockstep.OpenSecondary(ctx, scfg)
	if err != nil {
		t.Fatal(err)
	}

	var pc, sc wire.Conn
	if o.linkTB != nil {
		pc, sc = o.linkTB(t)
	} else {
		tt, ok := t.(*testing.T)
		if !ok {
			t.Fatal("newPair: a benchmark needs pairOptions.linkTB")
		}
		pc, sc = o.link(tt)
	}
	pcfg := lockstep.PrimaryConfig{
		QMP: p.primary.QMP(), RAM: p.region, Tracker: tracker,
		Block: ex.Log, BlockEvents: events,
		DiskSync: func(ctx context.Context) error {
			return initsync.New(ex.Log, ex.Image, initsync.Options{}).Run(ctx)
		},
		Conn:   pc,
		Policy: lockstep.Policy{MaxInterval: 100 * time.Millisecond},
		Logger: quiet,
	}
	if o.primary != nil {
		o.primary(&pcfg)
	}
	p.prim, err = lockstep.NewPrimary(pcfg)
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	p.cancel = cancel
	go func() { p.secErr <- p.sec.Run(rctx, sc); close(p.secDone) }()
	go func() { p.primErr <- p.prim.Run(rctx); close(p.primDone) }()
	// Registered last, so it runs first: both Runs must have returned
	// before the replica and the region they use are closed.
	t.Cleanup(func() {
		cancel()
		pc.Close()
		sc.Close()
		for _, ch := range []chan struct{}{p.primDone, p.secDone} {
			select {
			case <-ch:
			case <-time.After(30 * time.Second):
				t.Error("a Run did not return after cancel")
			}
		}
	})
	return p
}

// waitResumable waits until the secondary holds a complete checkpoint.
func (p *pair) waitResumable(ctx context.Context) {
	p.t.Helper()
	for !p.sec.Committed().Resumable {
		select {
		case err := <-p.primErr:
			p.t.Fatalf("primary stopped during sync: %v", err)
		case err := <-p.secErr:
			p.t.Fatalf("secondary stopped during sync: %v", err)
		case <-ctx.Done():
			p.t.Fatalf("no checkpoint committed: %v (stats %+v)", ctx.Err(), p.prim.Stats())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func fileEqual(t *testing.T, a, b string) (bool, string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(x) != len(y) {
		return false, fmt.Sprintf("sizes %d and %d", len(x), len(y))
	}
	if bytes.Equal(x, y) {
		return true, ""
	}
	diff, first := 0, -1
	for i := 0; i < len(x); i += 4096 {
		if !bytes.Equal(x[i:i+4096], y[i:i+4096]) {
			diff++
			if first < 0 {
				first = i / 4096
			}
		}
	}
	return false, fmt.Sprintf("%d pages differ, first %d", diff, first)
}

// TestReplicaEqualsPrimaryAtCommittedEpochs: a guest writing memory and
// disk is protected; at several committed epochs, with the primary paused,
// the replica RAM equals the primary RAM and the replica disk equals the
// primary disk, byte for byte. Then a planned switchover hands the guest
// to a standby over the replica, which goes on from exactly where the
// primary stopped. The link is real: TCP on loopback with mutual TLS.
func TestReplicaEqualsPrimaryAtCommittedEpochs(t *testing.T) {
	ctx := testenv.Deadline(t, 4*time.Minute)
	log := &epochLog{}
	var (
		commitMu sync.Mutex
		commits  = map[uint64]lockstep.CommitStats{}
	)
	p := newPair(t, ctx, pairOptions{link: tlsLink,
		primary: func(c *lockstep.PrimaryConfig) { c.OnEpoch = log.add },
		secondary: func(c *lockstep.SecondaryConfig) {
			c.OnCommit = func(cs lockstep.CommitStats) {
				commitMu.Lock()
				commits[cs.Manifest.Epoch] = cs
				commitMu.Unlock()
			}
		},
	})
	p.waitResumable(ctx)
	for i := 0; i < 3; i++ {
		time.Sleep(400 * time.Millisecond)
		n, resume, err := p.prim.Pause(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if c := p.sec.Committed(); c.Epoch != n || !c.Resumable {
			t.Fatalf("paused at epoch %d, secondary committed %+v", n, c)
		}
		if ok, why := fileEqual(t, p.primary.RAMFile(), p.replica.Path()); !ok {
			t.Fatalf("epoch %d: replica RAM differs from primary RAM: %s", n, why)
		}
		if ok, why := fileEqual(t, p.primDisk, p.replDisk); !ok {
			t.Fatalf("epoch %d: replica disk differs from primary disk: %s", n, why)
		}
		t.Logf("epoch %d: RAM and disk equal; stats %+v", n, p.prim.Stats())
		resume()
	}

	// Planned switchover: zero loss.
	n, err := p.prim.Handover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Device states travelled as deltas against the previous checkpoint's
	// (all but the first), and the secondary rebuilt each to its full size;
	// the promotion below restores such a rebuilt state.
	epochs := log.snapshot()
	if len(epochs) < 3 {
		t.Fatalf("only %d checkpoints", len(epochs))
	}
	commitMu.Lock()
	for i, e := range epochs {
		cs, ok := commits[e.Epoch]
		switch {
		case !ok:
			t.Errorf("epoch %d: no commit seen", e.Epoch)
		case cs.DevStateBytes != e.DevStateBytes || cs.DevStateRawBytes != e.DevStateRawBytes:
			t.Errorf("epoch %d: device state sent %d bytes (%d raw), received %d (%d raw)",
				e.Epoch, e.DevStateBytes, e.DevStateRawBytes, cs.DevStateBytes, cs.DevStateRawBytes)
		case i == 0 && e.DevCodec != lockstep.DevZstd:
			t.Errorf("first checkpoint %d: device state codec %v, want a full state", e.Epoch, e.DevCodec)
		case i > 0 && (e.DevCodec == lockstep.DevZstd || e.DevStateBytes*10 > e.DevStateRawBytes):
			t.Errorf("epoch %d: device state of %d bytes sent as %d (%v), not as a delta", e.Epoch, e.DevStateRawBytes, e.DevStateBytes, e.DevCodec)
		}
	}
	commitMu.Unlock()
	last := epochs[len(epochs)-1]
	t.Logf("%d checkpoints; the last device state: %d bytes sent for %d (%v)", len(epochs), last.DevStateBytes, last.DevStateRawBytes, last.DevCodec)
	if err := <-p.primErr; err != nil {
		t.Fatalf("primary Run after handover: %v", err)
	}
	atHandover, _ := p.primary.Serial()
	p.primary.Kill()
	p.cancel()
	<-p.secErr
	standby, err := vm.Start(ctx, p.standbySpec(), vm.Options{Standby: true, ReplicaRAM: p.replica.Path()})
	if err != nil {
		t.Fatal(err)
	}
	defer standby.Close()
	e, err := p.sec.Promote(ctx, standby.QMP())
	if err != nil || e != n {
		t.Fatalf("promote = %d, %v; want epoch %d", e, err, n)
	}
	ckCount := counterlog.Last(atHandover)
	if err := standby.WaitSerial(ctx, func(b []byte) bool {
		return counterlog.Last(b) >= ckCount+5 && counterlog.LastDiskSeq(b) > counterlog.LastDiskSeq(atHandover)+2
	}); err != nil {
		t.Fatal(err)
	}
	after, _ := standby.Serial()
	if _, err := counterlog.Check(counterlog.Values(counterlog.Stitch(atHandover, after))); err != nil {
		t.Fatalf("counter across the switchover: %v", err)
	}
	standby.Kill()
	p.verifyDisk(counterlog.LastDiskSeq(after))
}

// standbySpec is the primary's spec with the replica disk as a local file.
func (p *pair) standbySpec() vm.Spec {
	s := p.spec
	s.Disks = []vm.Disk{{Path: p.replDisk}}
	return s
}

func (p *pair) verifyDisk(atLeast uint64) {
	p.t.Helper()
	f, err := os.Open(p.replDisk)
	if err != nil {
		p.t.Fatal(err)
	}
	defer f.Close()
	rep, err := diskrec.Verify(f, diskSize)
	if err != nil {
		p.t.Fatalf("replica disk after promotion: %v", err)
	}
	if rep.LastSeq < atLeast {
		p.t.Fatalf("replica disk chain ends at %d, the guest reported %d durable", rep.LastSeq, atLeast)
	}
}

// cutLink passes frames until cut is called with a predicate; from then on
// the first frame matching it kills the link (like the primary's host dying
// part way through sending an epoch).
type cutLink struct {
	wire.Conn
	mu  sync.Mutex
	cut func(wire.Frame) bool
}

func (c *cutLink) Send(ctx context.Context, f wire.Frame) error {
	c.mu.Lock()
	cut := c.cut
	c.mu.Unlock()
	if cut != nil && cut(f) {
		c.Conn.Close()
		return errors.New("link cut by test")
	}
	return c.Conn.Send(ctx, f)
}

// TestTornEpochLeavesPreviousEpochWhole: the link dies in the middle of an
// epoch (after some of its frames went out); the secondary keeps the
// previous epoch, RAM and disk byte for byte, and a standby resumes it.
func TestTornEpochLeavesPreviousEpochWhole(t *testing.T) {
	ctx := testenv.Deadline(t, 4*time.Minute)
	var cl *cutLink
	p := newPair(t, ctx, pairOptions{link: func(t *testing.T) (wire.Conn, wire.Conn) {
		a, b := wire.Pipe(64)
		cl = &cutLink{Conn: a}
		return cl, b
	}})
	p.waitResumable(ctx)
	time.Sleep(300 * time.Millisecond)
	n, resume, err := p.prim.Pause(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ram, _ := os.ReadFile(p.replica.Path())
	disk, _ := os.ReadFile(p.replDisk)
	serialAt, _ := p.primary.Serial()
	// The next epoch dies after its memory frames, before its device state
	// and END.
	cl.mu.Lock()
	cl.cut = func(f wire.Frame) bool { return f.Type == wire.TypeDevState && f.Epoch > n }
	cl.mu.Unlock()
	resume()
	select {
	case err := <-p.secErr:
		t.Logf("secondary saw the link die: %v", err)
	case <-ctx.Done():
		t.Fatal("secondary did not notice the cut link")
	}
	p.primary.Kill()
	if c := p.sec.Committed(); c.Epoch != n {
		t.Fatalf("after a torn epoch the secondary is at %+v, want epoch %d", c, n)
	}
	if ram2, _ := os.ReadFile(p.replica.Path()); !bytes.Equal(ram, ram2) {
		t.Fatal("replica RAM changed although no epoch committed")
	}
	if disk2, _ := os.ReadFile(p.replDisk); !bytes.Equal(disk, disk2) {
		t.Fatal("replica disk changed although no epoch committed")
	}
	standby, err := vm.Start(ctx, p.standbySpec(), vm.Options{Standby: true, ReplicaRAM: p.replica.Path()})
	if err != nil {
		t.Fatal(err)
	}
	defer standby.Close()
	if _, err := p.sec.Promote(ctx, standby.QMP()); err != nil {
		t.Fatal(err)
	}
	ck := counterlog.Last(serialAt)
	if err := standby.WaitSerial(ctx, func(b []byte) bool { return counterlog.Last(b) >= ck+5 }); err != nil {
		t.Fatal(err)
	}
	after, _ := standby.Serial()
	if _, err := counterlog.Check(counterlog.Values(counterlog.Stitch(serialAt, after))); err != nil {
		t.Fatalf("counter after promotion from the last whole epoch: %v", err)
	}
	standby.Kill()
	p.verifyDisk(counterlog.LastDiskSeq(after))
}
