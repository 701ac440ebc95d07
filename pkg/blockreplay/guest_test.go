package blockreplay

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/vm"
)

// TestGuestDiskThroughNBDReplicatesPerEpoch boots the test guest under TCG
// with its virtio-blk disk served by our NBD export; the guest appends
// hash-chained records and fdatasyncs each. Epochs are cut the way the
// lockstep layer will cut them: QMP stop (which drains the guest's I/O),
// MarkEpoch, cont. After each commit the replica equals the primary's disk
// as it was at the stop, and holds every record the guest reported durable
// before the stop; when the primary dies mid-epoch, the replica stays on the
// last committed cut with an intact chain.
func TestGuestDiskThroughNBDReplicatesPerEpoch(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("needs qemu-system-x86_64 (hack/deps.sh):", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	img, err := guestimage.Default(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const size = 16 << 20
	dir := t.TempDir()
	primPath := rawImage(t, dir, "primary.raw", size)
	replPath := rawImage(t, dir, "replica.raw", size)

	pipe := eventlog.NewPipe(32 << 20)
	ex, err := OpenExport(ExportConfig{Path: primPath, Name: "vda", Sink: pipe})
	if err != nil {
		t.Fatal(err)
	}
	defer ex.Close()
	sock := filepath.Join(dir, "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srvCtx, stopSrv := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- ex.Serve(srvCtx, ln) }()
	shutdown := sync.OnceFunc(func() {
		stopSrv()
		if err := <-served; err != nil {
			t.Error(err)
		}
	})
	defer shutdown()

	// The secondary: stage everything, report each sealed epoch.
	rimg, err := backend.OpenFile(replPath, backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rimg.Close()
	r, err := replay.Open(ctx, rimg, filepath.Join(dir, "state"), quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	sealed := make(chan uint64, 16)
	staged := make(chan error, 1)
	go func() {
		for {
			rec, err := pipe.Recv(ctx)
			if err != nil {
				staged <- nil
				return
			}
			if err := r.Stage(ctx, rec); err != nil {
				staged <- err
				return
			}
			if rec.Kind == eventlog.KindEpochEnd {
				sealed <- rec.Epoch
			}
			eventlog.Recycle(rec)
		}
	}()

	m, err := vm.Start(ctx, vm.Spec{
		Name: "blockreplay", MemoryMiB: 256, Accel: vm.AccelTCG,
		Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline: img.Cmdline + " ftguest.run=disk ftguest.diskinterval=20ms",
		Disks:   []vm.Disk{{NBD: &vm.NBD{Socket: sock, Export: "vda"}}},
	}, vm.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	waitCtx, waitCancel := context.WithTimeout(ctx, 90*time.Second)
	defer waitCancel()
	if err := m.WaitSerial(waitCtx, func(b []byte) bool { return counterlog.LastDiskSeq(b) >= 3 }); err != nil {
		serial, _ := m.Serial()
		t.Fatalf("guest never wrote to its disk: %v\n%s", err, serial)
	}

	verify := func(path string) diskrec.Report {
		t.Helper()
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		rep, err := diskrec.Verify(f, size)
		if err != nil {
			t.Fatalf("%s: record chain broken: %v", filepath.Base(path), err)
		}
		return rep
	}
	var committed []byte
	var committedSeq uint64
	for i := range 4 {
		time.Sleep(time.Duration(150+100*i) * time.Millisecond)
		if err := m.QMP().Stop(ctx); err != nil {
			t.Fatal(err)
		}
		epoch, _, err := ex.Log.MarkEpoch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		snap, err := os.ReadFile(primPath)
		if err != nil {
			t.Fatal(err)
		}
		serial, _ := m.Serial()
		durable := counterlog.LastDiskSeq(serial)
		if err := m.QMP().Cont(ctx); err != nil {
			t.Fatal(err)
		}
		select {
		case e := <-sealed:
			if e != epoch {
				t.Fatalf("sealed epoch %d, marked %d", e, epoch)
			}
		case err := <-staged:
			t.Fatalf("staging stopped: %v", err)
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
		if err := r.Commit(ctx, epoch); err != nil {
			t.Fatal(err)
		}
		replica, _ := os.ReadFile(replPath)
		if !bytes.Equal(replica, snap) {
			t.Fatalf("epoch %d: replica differs from the primary's disk at the stop", epoch)
		}
		rep := verify(replPath)
		if rep.LastSeq < durable || rep.LastSeq <= committedSeq {
			t.Fatalf("epoch %d: replica chain ends at %d; guest reported %d durable before the stop, previous epoch had %d",
				epoch, rep.LastSeq, durable, committedSeq)
		}
		committed, committedSeq = snap, rep.LastSeq
		t.Logf("epoch %d: replica chain 1..%d, guest reported %d before the stop", epoch, rep.LastSeq, durable)
	}

	// The primary dies in the middle of an epoch: more records were
	// written and streamed, but the epoch never ends.
	before := counterlog.LastDiskSeq(mustSerial(t, m))
	if err := m.WaitSerial(waitCtx, func(b []byte) bool { return counterlog.LastDiskSeq(b) >= before+3 }); err != nil {
		t.Fatal(err)
	}
	m.Kill()
	shutdown()
	if err := r.Discard(ctx); err != nil {
		t.Fatal(err)
	}
	replica, _ := os.ReadFile(replPath)
	if !bytes.Equal(replica, committed) {
		t.Fatal("after the primary died mid-epoch, the replica is not the last committed cut")
	}
	if rep := verify(replPath); rep.LastSeq != committedSeq {
		t.Fatalf("replica chain ends at %d, last commit had %d", rep.LastSeq, committedSeq)
	}
	if rep := verify(primPath); rep.LastSeq <= committedSeq {
		t.Fatalf("test is vacuous: the primary wrote nothing after the last commit (%d)", rep.LastSeq)
	}
}

func mustSerial(t *testing.T, m *vm.Machine) []byte {
	t.Helper()
	b, err := m.Serial()
	if err != nil {
		t.Fatal(err)
	}
	return b
}
