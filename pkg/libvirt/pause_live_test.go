package libvirt_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/blockreplay"
	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/initsync"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/qmp"
	"github.com/ftctl/ftctl/pkg/vm"
)

// phases is one checkpoint's pause, split as the agent's coordinator
// splits it (pkg/lockstep EpochStats), without the secondary.
type phases struct {
	stop, dirty, capture, dev, cont, pause time.Duration
	pages, devBytes                        int
}

type phaseRun []phases

func med[T any](r phaseRun, f func(phases) T, less func(a, b T) bool) T {
	v := make([]T, len(r))
	for i, p := range r {
		v[i] = f(p)
	}
	sort.Slice(v, func(i, j int) bool { return less(v[i], v[j]) })
	return v[len(v)/2]
}

func (r phaseRun) String() string {
	d := func(f func(phases) time.Duration) time.Duration {
		return med(r, f, func(a, b time.Duration) bool { return a < b }).Round(10 * time.Microsecond)
	}
	i := func(f func(phases) int) int { return med(r, f, func(a, b int) bool { return a < b }) }
	return fmt.Sprintf("pause %v = stop %v + dirty %v + capture %v + devstate %v + cont %v; pages %d, devstate %d B",
		d(func(p phases) time.Duration { return p.pause }), d(func(p phases) time.Duration { return p.stop }),
		d(func(p phases) time.Duration { return p.dirty }), d(func(p phases) time.Duration { return p.capture }),
		d(func(p phases) time.Duration { return p.dev }), d(func(p phases) time.Duration { return p.cont }),
		i(func(p phases) int { return p.pages }), i(func(p phases) int { return p.devBytes }))
}

// measurePauses takes n checkpoints the way the agent's coordinator does
// (stop, dirty scan, capture, device state, cont), interval apart.
func measurePauses(ctx context.Context, t testing.TB, c *qmp.Client, ramFile string, n int, interval time.Duration) phaseRun {
	t.Helper()
	if err := checkpoint.Prepare(ctx, c); err != nil {
		t.Fatal(err)
	}
	reg, err := memsync.OpenRegion(ramFile, false)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	tr := memsync.NewShadow(reg, 0)
	defer tr.Close()
	if err := tr.Begin(ctx); err != nil {
		t.Fatal(err)
	}
	cp := memsync.NewCapturer(reg, 0)
	var run phaseRun
	for i := 0; i < n; i++ {
		time.Sleep(interval)
		var p phases
		t0 := time.Now()
		if err := c.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		t1 := time.Now()
		bm, err := tr.Dirty(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t2 := time.Now()
		snap, err := cp.Capture(ctx, uint64(i+1), bm)
		if err != nil {
			t.Fatal(err)
		}
		t3 := time.Now()
		st, err := checkpoint.SaveDeviceState(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		t4 := time.Now()
		if err := c.Cont(ctx); err != nil {
			t.Fatal(err)
		}
		t5 := time.Now()
		p.stop, p.dirty, p.capture, p.dev, p.cont, p.pause = t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), t4.Sub(t3), t5.Sub(t4), t5.Sub(t0)
		p.pages, p.devBytes = len(snap.Pages), len(st)
		snap.Release()
		run = append(run, p)
	}
	return run
}

func hmp(ctx context.Context, t testing.TB, c *qmp.Client, line string) string {
	t.Helper()
	out, err := c.HumanMonitorCommand(ctx, line)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func rawDisk(t testing.TB, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 8<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

// servedDisk is a raw image in dir served on dir/nbd0.sock by a logging
// export, as the agent serves a protected disk.
type servedDisk struct {
	sock   string
	export *blockreplay.Export
	events *eventlog.Pipe
}

func serveDisk(t testing.TB, dir string) *servedDisk {
	t.Helper()
	img := rawDisk(t, dir)
	events := eventlog.NewPipe(32 << 20)
	ex, err := blockreplay.OpenExport(blockreplay.ExportConfig{Path: img, Name: "disk", Sink: events})
	if err != nil {
		t.Fatal(err)
	}
	sd := &servedDisk{sock: filepath.Join(dir, "nbd0.sock"), export: ex, events: events}
	ln, err := net.Listen("unix", sd.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ex.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done; ex.Close() })
	return sd
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// protectRun runs the agent's coordinator pair (pkg/lockstep Primary and
// Secondary over an in-memory link) on a running guest for n epochs
// after its first resumable checkpoint, the replica's files in
// replicaDir, and returns the epochs' figures.
func protectRun(ctx context.Context, t testing.TB, q *qmp.Client, ramFile string, memMiB int, sd *servedDisk, replicaDir string, n int) []lockstep.EpochStats {
	t.Helper()
	reg, err := memsync.OpenRegion(ramFile, false)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	tr := memsync.NewShadow(reg, 0)
	defer tr.Close()
	rep, err := memsync.OpenReplica(filepath.Join(replicaDir, "replica.ram"), int64(memMiB)<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	rdisk := rawDisk(t, replicaDir)
	rimg, err := backend.OpenFile(rdisk, backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rimg.Close()
	rp, err := replay.Open(ctx, rimg, filepath.Join(replicaDir, "replay"), quiet)
	if err != nil {
		t.Fatal(err)
	}
	sec, err := lockstep.OpenSecondary(ctx, lockstep.SecondaryConfig{Replica: rep, Replayer: rp, StateDir: filepath.Join(replicaDir, "state"), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu     sync.Mutex
		epochs []lockstep.EpochStats
		enough = make(chan struct{})
	)
	pc, sc := wire.Pipe(64)
	prim, err := lockstep.NewPrimary(lockstep.PrimaryConfig{
		QMP: q, RAM: reg, Tracker: tr, Block: sd.export.Log, BlockEvents: sd.events,
		DiskSync: func(ctx context.Context) error {
			return initsync.New(sd.export.Log, sd.export.Image, initsync.Options{}).Run(ctx)
		},
		Conn: pc, Policy: lockstep.Policy{MaxInterval: 100 * time.Millisecond}, Logger: quiet,
		OnEpoch: func(s lockstep.EpochStats) {
			mu.Lock()
			defer mu.Unlock()
			if len(epochs) < n {
				epochs = append(epochs, s)
				if len(epochs) == n {
					close(enough)
				}
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	errs := make(chan error, 2)
	go func() { errs <- sec.Run(rctx, sc) }()
	go func() { errs <- prim.Run(rctx) }()
	select {
	case <-enough:
	case err := <-errs:
		t.Fatalf("coordinator stopped: %v", err)
	case <-ctx.Done():
		t.Fatalf("no %d epochs: %v (%+v)", n, ctx.Err(), prim.Stats())
	}
	cancel()
	pc.Close()
	sc.Close()
	<-errs
	<-errs
	mu.Lock()
	defer mu.Unlock()
	return append([]lockstep.EpochStats(nil), epochs[:n]...)
}

func summary(es []lockstep.EpochStats) string {
	var r phaseRun
	var hold, mark []time.Duration
	for _, e := range es {
		r = append(r, phases{stop: e.Stop, dirty: e.Dirty, capture: e.Capture, dev: e.DevState, cont: e.Cont, pause: e.Pause, pages: e.DirtyPages, devBytes: e.DevStateRawBytes})
		hold, mark = append(hold, e.Hold), append(mark, e.Mark)
	}
	sort.Slice(hold, func(i, j int) bool { return hold[i] < hold[j] })
	sort.Slice(mark, func(i, j int) bool { return mark[i] < mark[j] })
	return fmt.Sprintf("%v; mark %v, hold %v", r, mark[len(mark)/2].Round(10*time.Microsecond), hold[len(hold)/2].Round(10*time.Microsecond))
}

const guestWork = " ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=50ms"

// startGuestDomain defines and starts the test guest as the agent's
// tests do (libvirttest.GuestDomain with a disk, prepared), with its
// sockets and guest RAM file in sockDir, and returns its dedicated QMP
// client and RAM file.
func startGuestDomain(ctx context.Context, t testing.TB, d *libvirttest.Daemon, name, sockDir, devices string, opts domxml.Options) (*qmp.Client, string) {
	t.Helper()
	img := testenv.Guest(t)
	g := libvirttest.GuestDomain{
		Name: name, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline + guestWork,
		Serial:  filepath.Join(sockDir, "serial.log"),
		Devices: "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='" + filepath.Join(sockDir, "disk.raw") + "'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n" + devices,
	}
	opts.SocketDir = sockDir
	x, _, err := domxml.Prepare(g.XML(), opts)
	if err != nil {
		t.Fatal(err)
	}
	c := d.Conn(t)
	if err := c.Define(ctx, x); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, name, false); err != nil {
		t.Fatalf("start: %v\n%s", err, d.QEMULog(name))
	}
	t.Cleanup(func() { c.Destroy(context.Background(), name) })
	q, err := qmp.Dial(ctx, "unix", filepath.Join(sockDir, "qmp.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	waitFor(ctx, t, "the guest to be ready", func() bool {
		b, _ := os.ReadFile(g.Serial)
		return bytes.Contains(b, []byte("ftguest ready"))
	})
	return q, filepath.Join(sockDir, "guest.ram")
}

// TestLivePauseDevices measures what a libvirt domain's checkpoint
// pause costs against the same guest run by pkg/vm (the agent's own
// QEMU argv), primary side (stop, dirty scan, capture, device state,
// cont), and what display devices add to it; it logs the figures and
// QEMU's RAM blocks. It asserts only what must hold whatever the speed:
// guest RAM is the shared ftmem block, and every device state fits.
func TestLivePauseDevices(t *testing.T) {
	ctx := testenv.Deadline(t, 4*time.Minute)
	d := libvirttest.Start(t, libvirttest.Options{})
	img := testenv.Guest(t)
	const n = 10
	dir, err := os.MkdirTemp("", "ftpz")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	vd := serveDisk(t, filepath.Join(mkdir(t, dir, "vm")))
	m, err := vm.Start(ctx, vm.Spec{Name: "pvm", MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline + guestWork,
		Disks: []vm.Disk{{NBD: &vm.NBD{Socket: vd.sock, Export: "disk"}}}, Accel: vm.AccelTCG}, vm.Options{RAMDir: filepath.Join(dir, "vm")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := m.WaitSerial(ctx, func(b []byte) bool { return bytes.Contains(b, []byte("ftguest ready")) }); err != nil {
		t.Fatal(err)
	}
	t.Logf("pkg/vm:          %v", measurePauses(ctx, t, m.QMP(), m.RAMFile(), n, 100*time.Millisecond))
	logCoordinator(ctx, t, "pkg/vm", m.QMP(), m.RAMFile(), vd, mkdir(t, dir, "vm-replica"))
	m.Close()

	for _, v := range []struct{ name, devices string }{
		{"none", ""},
		{"vga", "    <video><model type='vga' vram='16384'/></video>\n"},
		{"qxl", "    <video><model type='qxl' ram='65536' vram='65536' vgamem='16384'/></video>\n"},
	} {
		sub := mkdir(t, dir, v.name)
		sd := serveDisk(t, sub)
		q, ram := startGuestDomain(ctx, t, d, "pz"+v.name, sub, v.devices, domxml.Options{})
		blocks := hmp(ctx, t, q, "info ramblock")
		if !bytes.Contains([]byte(blocks), []byte("ftmem")) {
			t.Errorf("video %s: no ftmem RAM block:\n%s", v.name, blocks)
		}
		t.Logf("libvirt video %-4s %v\n%s", v.name+":", measurePauses(ctx, t, q, ram, n, 100*time.Millisecond), blocks)
		if v.name == "none" {
			logCoordinator(ctx, t, "libvirt", q, ram, sd, mkdir(t, dir, "none-replica"))
		}
		if err := d.Conn(t).Destroy(ctx, "pz"+v.name); err != nil {
			t.Fatal(err)
		}
	}
}

// logCoordinator runs the agent's coordinator pair on the guest and logs
// its first checkpoint apart from the rest: the first one completes the
// initial synchronisation (more dirty pages, the wait for the secondary's
// first commit) and costs about ten times a steady one, so a median
// over the first two or three checkpoints (what an agent's pause_p50
// shows right after protection starts) is that first pause.
func logCoordinator(ctx context.Context, t testing.TB, what string, q *qmp.Client, ram string, sd *servedDisk, replicaDir string) {
	t.Helper()
	es := protectRun(ctx, t, q, ram, 128, sd, replicaDir, 20)
	f := es[0]
	for _, e := range es {
		if e.DevStateRawBytes == 0 {
			t.Errorf("%s: epoch %d has no device state", what, e.Epoch)
		}
	}
	t.Logf("%s coordinator: first checkpoint (epoch %d) pause %v = dirty %v + capture %v + devstate %v + hold %v, %d pages; then %s",
		what, f.Epoch, f.Pause.Round(10*time.Microsecond), f.Dirty.Round(10*time.Microsecond), f.Capture.Round(10*time.Microsecond),
		f.DevState.Round(10*time.Microsecond), f.Hold.Round(10*time.Microsecond), f.DirtyPages, summary(es[1:]))
}

func mkdir(t testing.TB, dir, sub string) string {
	t.Helper()
	p := filepath.Join(dir, sub)
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}
