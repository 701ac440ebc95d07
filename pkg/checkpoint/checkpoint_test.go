package checkpoint_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/vm"
)

func guestSpec(t *testing.T, name string) (vm.Spec, string) {
	img := testenv.Guest(t)
	disk := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 8<<20); err != nil {
		t.Fatal(err)
	}
	return vm.Spec{
		Name:      name,
		MemoryMiB: 128,
		Kernel:    img.Kernel,
		Initrd:    img.Initrd,
		Cmdline:   img.Cmdline + " ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=50ms",
		Disks:     []vm.Disk{{Path: disk}},
		Accel:     vm.AccelTCG,
	}, disk
}

func start(t *testing.T, ctx context.Context, spec vm.Spec, o vm.Options) *vm.Machine {
	t.Helper()
	m, err := vm.Start(ctx, spec, o)
	if err != nil {
		t.Fatalf("start %s: %v", spec.Name, err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// TestCheckpointKillRestore is the foundation's end-to-end proof: a guest
// that counts on its console and writes chained records to its disk is
// checkpointed several times, its QEMU is SIGKILLed, and a standby restored
// from the last checkpoint goes on from exactly the checkpointed state.
func TestCheckpointKillRestore(t *testing.T) {
	ctx := testenv.Deadline(t, 4*time.Minute)
	spec, disk := guestSpec(t, "ckpt")
	primary := start(t, ctx, spec, vm.Options{})
	if err := primary.WaitSerial(ctx, func(b []byte) bool { return counterlog.Last(b) >= 3 && counterlog.LastDiskSeq(b) >= 2 }); err != nil {
		t.Fatal(err)
	}
	c := primary.QMP()
	if err := checkpoint.Prepare(ctx, c); err != nil {
		t.Fatal(err)
	}

	// A running VM's device state would not match the RAM copied beside it.
	if _, err := checkpoint.SaveDeviceState(ctx, c); !errors.Is(err, checkpoint.ErrNotPaused) {
		t.Fatalf("SaveDeviceState on a running VM = %v, want ErrNotPaused", err)
	}

	dir := t.TempDir()
	var (
		last       *checkpoint.Full
		atCk       []byte
		prevCount  uint64
		stateSizes []int
	)
	for i := 0; i < 4; i++ {
		time.Sleep(300 * time.Millisecond)
		var atPause []byte
		ck, err := checkpoint.TakeFull(ctx, c, checkpoint.FullOptions{
			RAMFile: primary.RAMFile(), Disks: []string{disk}, Dir: dir,
			Paused: func() { atPause, _ = primary.Serial() },
		})
		if err != nil {
			t.Fatalf("checkpoint %d: %v", i, err)
		}
		st, err := c.QueryStatus(ctx)
		if err != nil || !st.Running {
			t.Fatalf("after checkpoint %d the VM is %+v, %v; want running", i, st, err)
		}
		n := counterlog.Last(atPause)
		if n <= prevCount {
			t.Fatalf("checkpoint %d at counter %d: guest did not advance since %d", i, n, prevCount)
		}
		prevCount = n
		stateSizes = append(stateSizes, len(ck.DeviceState))
		t.Logf("checkpoint %d at counter=%d: pause %v (RAM %v, state %d bytes in %v)", i, n, ck.Stats.Pause, ck.Stats.CopyRAM, len(ck.DeviceState), ck.Stats.DeviceState)
		last, atCk = ck, atPause
	}
	for _, s := range stateSizes {
		// RAM must not be in the stream (x-ignore-shared): 128 MiB guest,
		// device state a few hundred KB.
		if s > 8<<20 {
			t.Fatalf("device state of %d bytes: guest RAM leaked into the migration stream", s)
		}
	}

	// The primary runs on past the checkpoint, then dies like a host does.
	ckCount := counterlog.Last(atCk)
	if err := primary.WaitSerial(ctx, func(b []byte) bool { return counterlog.Last(b) >= ckCount+3 }); err != nil {
		t.Fatal(err)
	}
	if err := primary.Kill(); err != nil {
		t.Fatal(err)
	}

	sspec := spec
	sspec.Name = "ckpt" // same name: same MACs and ids
	sspec.Disks = []vm.Disk{{Path: last.Disks[0]}}
	standby := start(t, ctx, sspec, vm.Options{Standby: true, ReplicaRAM: last.RAM})
	if st, err := standby.QMP().QueryStatus(ctx); err != nil || st.Status != "inmigrate" {
		t.Fatalf("standby status %+v, %v; want inmigrate", st, err)
	}
	if err := checkpoint.RestoreDeviceState(ctx, standby.QMP(), last.DeviceState, true); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if err := standby.WaitSerial(ctx, func(b []byte) bool {
		return counterlog.Last(b) >= ckCount+10 && counterlog.LastDiskSeq(b) > counterlog.LastDiskSeq(atCk)+3
	}); err != nil {
		t.Fatal(err)
	}
	after, _ := standby.Serial()
	vals := counterlog.Values(after)
	if len(vals) == 0 || vals[0] > ckCount+1 {
		t.Fatalf("restored guest's first counter %v, want %d (checkpoint held %d)", vals, ckCount+1, ckCount)
	}
	if _, err := counterlog.Check(counterlog.Values(counterlog.Stitch(atCk, after))); err != nil {
		t.Fatalf("primary up to the checkpoint + restored guest: %v", err)
	}
	if err := standby.Kill(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(last.Disks[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rep, err := diskrec.Verify(f, 8<<20)
	if err != nil {
		t.Fatalf("disk after restore: %v", err)
	}
	if rep.LastSeq < counterlog.LastDiskSeq(after) {
		t.Fatalf("disk chain ends at %d but the restored guest reported seq %d durable", rep.LastSeq, counterlog.LastDiskSeq(after))
	}
}

func TestRestoreRefusals(t *testing.T) {
	ctx := testenv.Deadline(t, 2*time.Minute)
	spec, _ := guestSpec(t, "refuse")
	ram := filepath.Join(t.TempDir(), "ram")
	if err := os.Truncate(mustCreate(t, ram), 128<<20); err != nil {
		t.Fatal(err)
	}
	standby := start(t, ctx, spec, vm.Options{Standby: true, ReplicaRAM: ram})
	if err := checkpoint.RestoreDeviceState(ctx, standby.QMP(), nil, true); !errors.Is(err, checkpoint.ErrEmptyState) {
		t.Fatalf("restore of empty state = %v", err)
	}
	// Garbage is refused by QEMU's loader with its reason, not hung on.
	err := checkpoint.RestoreDeviceState(ctx, standby.QMP(), []byte("this is not a migration stream"), true)
	if !errors.Is(err, checkpoint.ErrRejected) {
		t.Fatalf("restore of garbage = %v, want ErrRejected", err)
	}
	<-standby.Exited()
	if !strings.Contains(standby.Stderr(), "load of migration failed") {
		t.Fatalf("QEMU's reason missing from its stderr: %q", standby.Stderr())
	}

	running := start(t, ctx, spec, vm.Options{})
	if err := checkpoint.RestoreDeviceState(ctx, running.QMP(), []byte{1}, true); !errors.Is(err, checkpoint.ErrNotIncoming) {
		t.Fatalf("restore into a running VM = %v, want ErrNotIncoming", err)
	}
}

func mustCreate(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

func TestCopySparseKeepsHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(64 << 20)
	f.WriteAt([]byte("hello"), 1<<20)
	f.WriteAt([]byte("world"), 40<<20)
	f.Close()
	n, err := checkpoint.CopySparse(filepath.Join(dir, "dst"), src)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(filepath.Join(dir, "dst"))
	if string(a) != string(b) {
		t.Fatal("copy differs from source")
	}
	if n >= 64<<20 {
		t.Fatalf("copied %d bytes of a 64 MiB file holding 10 bytes: holes not skipped", n)
	}
}

// TestSaveDeviceStateGivenUpLeavesNoMigration: however early or late its
// context ends, SaveDeviceState returns with no migration in flight, so the
// guest its caller resumes stays running (a migration that completed after
// the resume would stop it again for good, in postmigrate).
func TestSaveDeviceStateGivenUpLeavesNoMigration(t *testing.T) {
	ctx := testenv.Deadline(t, 3*time.Minute)
	spec, _ := guestSpec(t, "giveup")
	m := start(t, ctx, spec, vm.Options{})
	if err := m.WaitSerial(ctx, func(b []byte) bool { return counterlog.Last(b) >= 2 }); err != nil {
		t.Fatal(err)
	}
	c := m.QMP()
	if err := checkpoint.Prepare(ctx, c); err != nil {
		t.Fatal(err)
	}
	var gaveUp, saved int
	for i := range 40 {
		if err := c.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		// From before the migrate command reaches QEMU to well after it
		// completed.
		sctx, cancel := context.WithTimeout(ctx, time.Duration(i)*250*time.Microsecond)
		_, serr := checkpoint.SaveDeviceState(sctx, c)
		cancel()
		if serr != nil {
			gaveUp++
		} else {
			saved++
		}
		info, err := c.QueryMigrate(ctx)
		if err != nil {
			t.Fatal(err)
		}
		switch info.Status {
		case "setup", "active", "device", "pre-switchover", "cancelling":
			t.Fatalf("try %d: SaveDeviceState returned (%v) with the migration %s", i, serr, info.Status)
		}
		if err := c.Cont(ctx); err != nil {
			t.Fatalf("try %d: cont after SaveDeviceState (%v): %v", i, serr, err)
		}
		time.Sleep(20 * time.Millisecond)
		if st, err := c.QueryStatus(ctx); err != nil || !st.Running {
			t.Fatalf("try %d: the guest resumed after SaveDeviceState (%v) is %+v (%v)", i, serr, st, err)
		}
	}
	if gaveUp == 0 || saved == 0 {
		t.Fatalf("%d tries gave up and %d saved: the deadlines missed the migration", gaveUp, saved)
	}
	t.Logf("%d tries gave up, %d saved; none left a migration behind", gaveUp, saved)
}
