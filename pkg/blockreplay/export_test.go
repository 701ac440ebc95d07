package blockreplay

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func needBin(t testing.TB, bins ...string) {
	t.Helper()
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s not installed (hack/deps.sh installs it): %v", b, err)
		}
	}
}

func rawImage(t testing.TB, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

// serve runs an export on a unix socket until the test ends.
func serve(t testing.TB, cfg ExportConfig) (*Export, string) {
	t.Helper()
	cfg.NBD.Logger = quiet
	ex, err := OpenExport(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ex.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		ex.Close()
	})
	return ex, "nbd+unix:///" + cfg.Name + "?socket=" + sock
}

func qemuIO(t testing.TB, uri string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "raw", "-d", "unmap", "-t", "writeback"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "qemu-io", append(args, uri)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
}

func randomScript(rng *rand.Rand, size int64, n int) []string {
	var cmds []string
	for range n {
		o := rng.Int64N(size/4096-16) * 4096
		l := (1 + rng.Int64N(16)) * 4096
		switch rng.IntN(4) {
		case 0, 1:
			cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+rng.IntN(255), o, l))
		case 2:
			cmds = append(cmds, fmt.Sprintf("discard %d %d", o, l))
		case 3:
			cmds = append(cmds, fmt.Sprintf("write -z %d %d", o, l))
		}
	}
	// Parallel requests too, on disjoint slots.
	for i, s := range rng.Perm(int(size / (128 << 10)))[:6] {
		cmds = append(cmds, fmt.Sprintf("aio_write -P %d %d 65536", 10+i, int64(s)*(128<<10)))
	}
	return append(cmds, "aio_flush", "flush")
}

// TestPrimaryToReplicaWithQemuAndPromotion: qemu-io writes through the
// primary's NBD export in epochs (one qemu-io run is one epoch: it has
// exited, so no I/O is in flight when the epoch is marked, as after QMP
// stop); the replica equals the primary at each committed cut, never shows
// an uncommitted epoch, and after promotion serves its image with its own
// log continuing the numbering.
func TestPrimaryToReplicaWithQemuAndPromotion(t *testing.T) {
	needBin(t, "qemu-io")
	const size = 4 << 20
	ctx := context.Background()
	dir := t.TempDir()
	primPath := rawImage(t, dir, "primary.raw", size)
	replPath := rawImage(t, dir, "replica.raw", size)
	pipe := eventlog.NewPipe(16 << 20)
	prim, uri := serve(t, ExportConfig{Path: primPath, Name: "vda", Sink: pipe})

	img, err := backend.OpenFile(replPath, backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := replay.Open(ctx, img, filepath.Join(dir, "state"), quiet)
	if err != nil {
		t.Fatal(err)
	}
	stageAll := func() {
		for pipe.Len() > 0 {
			rec, err := pipe.Recv(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Stage(ctx, rec); err != nil {
				t.Fatal(err)
			}
		}
	}
	rng := rand.New(rand.NewPCG(4, 2))
	committed := make([]byte, size)
	var lastEpoch uint64
	for i := range 5 {
		qemuIO(t, uri, randomScript(rng, size, 40)...)
		epoch, _, err := prim.Log.MarkEpoch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		snap, err := os.ReadFile(primPath)
		if err != nil {
			t.Fatal(err)
		}
		stageAll()
		replica, _ := os.ReadFile(replPath)
		if !bytes.Equal(replica, committed) {
			t.Fatalf("epoch %d: staged but uncommitted writes reached the replica", epoch)
		}
		if i == 4 {
			break // the last epoch is never committed: the primary "dies"
		}
		if err := r.Commit(ctx, epoch); err != nil {
			t.Fatal(err)
		}
		committed, lastEpoch = snap, epoch
		replica, _ = os.ReadFile(replPath)
		if !bytes.Equal(replica, snap) {
			t.Fatalf("epoch %d: replica differs from the primary after commit", epoch)
		}
	}

	// Failover: promote the replica and serve it with a fresh log.
	logOpt, err := Promote(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	img.Close()
	appliedSeq := logOpt.LastSeq
	if appliedSeq == 0 {
		t.Fatal("no events were applied: the test proves nothing")
	}
	if logOpt.Epoch != lastEpoch+1 {
		t.Fatalf("promoted log starts at epoch %d, want %d", logOpt.Epoch, lastEpoch+1)
	}
	replica, _ := os.ReadFile(replPath)
	if !bytes.Equal(replica, committed) {
		t.Fatal("promoted replica is not the last committed cut")
	}
	pipe2 := eventlog.NewPipe(16 << 20)
	_, uri2 := serve(t, ExportConfig{Path: replPath, Name: "vda", Sink: pipe2, Log: logOpt})
	qemuIO(t, uri2, "write -P 0x77 8192 4096", "flush")
	rec, err := pipe2.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Kind != eventlog.KindWrite || rec.Seq != appliedSeq+1 || rec.Epoch != lastEpoch+1 ||
		rec.Offset != 8192 || !bytes.Equal(rec.Data, bytes.Repeat([]byte{0x77}, 4096)) {
		t.Fatalf("first write of the new primary logged as %s seq %d epoch %d off %d", rec.Kind, rec.Seq, rec.Epoch, rec.Offset)
	}
	replica, _ = os.ReadFile(replPath)
	if !bytes.Equal(replica[8192:12288], rec.Data) {
		t.Fatal("new primary's write did not reach the replica image")
	}
}

func TestOpenExportErrors(t *testing.T) {
	if _, err := OpenExport(ExportConfig{Path: "/nonexistent", Sink: eventlog.NewPipe(1)}); err == nil {
		t.Error("missing image accepted")
	}
	if _, err := OpenExport(ExportConfig{Path: rawImage(t, t.TempDir(), "x", 4096)}); err == nil {
		t.Error("export without a sink accepted")
	}
}
