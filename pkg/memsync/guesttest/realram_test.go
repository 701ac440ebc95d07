package guesttest_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/memsync"
)

// guestRAM is the test guest's RAM size: 256 MiB, or 128 MiB under -race.
var guestRAM = map[bool]int64{false: 256 << 20, true: 128 << 20}[raceBuild]

// realGuest is a running default test guest whose RAM is a shared file.
type realGuest struct {
	cmd    *exec.Cmd
	ram    string
	serial string
}

func startRealGuest(ctx context.Context, t *testing.T) *realGuest {
	if testing.Short() {
		t.Skip("boots a guest under TCG; skipped with -short")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("needs qemu-system-x86_64 (hack/deps.sh):", err)
	}
	img, err := guestimage.Default(ctx)
	if err != nil {
		t.Fatal(err)
	}
	shm, err := os.MkdirTemp("/dev/shm", "memsync-guest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	g := &realGuest{ram: filepath.Join(shm, "ram"), serial: filepath.Join(t.TempDir(), "serial.log")}
	g.cmd = exec.CommandContext(ctx, qemu,
		"-accel", "tcg", "-nodefaults", "-vga", "none", "-display", "none", "-no-reboot",
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%d,mem-path=%s,share=on", guestRAM, g.ram),
		"-machine", "pc,memory-backend=mem", "-m", fmt.Sprint(guestRAM>>20),
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", img.Cmdline+" ftguest.run=counter",
		"-device", "virtio-rng-pci",
		"-chardev", "file,id=s0,path="+g.serial, "-serial", "chardev:s0")
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.cmd.Process.Signal(syscall.SIGCONT)
		g.cmd.Process.Kill()
		g.cmd.Wait()
	})
	g.waitSerial(ctx, t, "ftguest counter=2")
	return g
}

func (g *realGuest) waitSerial(ctx context.Context, t *testing.T, s string) {
	t.Helper()
	for ctx.Err() == nil {
		b, _ := os.ReadFile(g.serial)
		if strings.Contains(string(b), s) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := os.ReadFile(g.serial)
	t.Fatalf("guest never printed %q; console:\n%s", s, b)
}

// pause stops every QEMU thread with SIGSTOP and waits until all are
// stopped, so guest RAM no longer changes (under TCG all guest writes come
// from QEMU's own threads). A stand-in for QMP stop, which the agent uses.
func (g *realGuest) pause(ctx context.Context) (func(context.Context) error, error) {
	pid := g.cmd.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return nil, err
	}
	resume := func(context.Context) error { return syscall.Kill(pid, syscall.SIGCONT) }
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if allStopped(pid) {
			return resume, nil
		}
		time.Sleep(time.Millisecond)
	}
	resume(ctx)
	return nil, fmt.Errorf("QEMU threads did not stop")
}

func allStopped(pid int) bool {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			return false
		}
		// pid (comm) S ...: the state follows the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || (b[i+2] != 'T' && b[i+2] != 't') {
			return false
		}
	}
	return true
}

func fileBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestReplicaEqualsRealGuestRAM runs the memory path against a real QEMU
// guest: live pre-copy while it runs, then checkpoints (guest stopped,
// scan, capture, resume; encode and apply after). With the guest stopped
// again, the replica file must equal the guest RAM file byte for byte. The
// tracker is whatever New probes (shadow on this host).
func TestReplicaEqualsRealGuestRAM(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := startRealGuest(ctx, t)
	region, err := memsync.OpenRegion(g.ram, false)
	if err != nil {
		t.Fatal(err)
	}
	defer region.Close()
	pages := region.NumPages()
	tr, err := memsync.New(ctx, memsync.Config{PID: g.cmd.Process.Pid, Region: region})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	t.Logf("tracker: %s", tr.Kind())
	enc, err := memsync.NewEncoder(memsync.DefaultCodec, 0)
	if err != nil {
		t.Fatal(err)
	}
	base := memsync.NewBase(pages)
	replica, err := memsync.OpenReplica(filepath.Join(t.TempDir(), "replica"), guestRAM)
	if err != nil {
		t.Fatal(err)
	}
	defer replica.Close()
	wire := 0
	send := func(ctx context.Context, snap *memsync.Snapshot) error {
		frame, _, err := enc.Encode(nil, snap, base)
		if err != nil {
			return err
		}
		wire += len(frame)
		e, err := replica.StageFrame(frame)
		if err != nil {
			return err
		}
		return replica.Commit(ctx, e)
	}
	var pause func(context.Context) (func(context.Context) error, error)
	if tr.Kind() != memsync.KindShadow {
		pause = g.pause
	}
	res, err := memsync.PreCopy(ctx, region, tr, send, memsync.PreCopyOptions{Pause: pause})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pre-copy of a running %d MiB guest: %+v, %d bytes on the wire", guestRAM>>20, res, wire)

	cp := memsync.NewCapturer(region, 0)
	epoch := res.NextEpoch
	for i := range 4 {
		time.Sleep(100 * time.Millisecond)
		resume, err := g.pause(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		d, err := tr.Dirty(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t1 := time.Now()
		snap, err := cp.Capture(ctx, epoch, d)
		if err != nil {
			t.Fatal(err)
		}
		t2 := time.Now()
		ram := bytes.Clone(region.Bytes()) // reference, still paused
		resume(ctx)
		wire = 0
		if err := send(ctx, snap); err != nil {
			t.Fatal(err)
		}
		snap.Release()
		if !bytes.Equal(fileBytes(t, replica.Path()), ram) {
			t.Fatalf("checkpoint %d: replica differs from the guest RAM it was taken from", i)
		}
		t.Logf("checkpoint %d: %d dirty pages, scan %v, copy %v, frame %d bytes", i, d.Count(),
			t1.Sub(t0).Round(time.Microsecond), t2.Sub(t1).Round(time.Microsecond), wire)
		epoch++
	}
}

// TestEncodeRealGuestRAM round-trips real guest memory through every codec:
// the whole RAM against an empty replica (the pre-copy case), and the
// difference between two snapshots taken 300 ms apart (the checkpoint case).
func TestEncodeRealGuestRAM(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := startRealGuest(ctx, t)
	snapshot := func() []byte {
		resume, err := g.pause(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer resume(ctx)
		return fileBytes(t, g.ram)
	}
	a := snapshot()
	time.Sleep(300 * time.Millisecond)
	b := snapshot()
	pages := len(a) / memsync.PageSize
	var all, changed []int
	for i := range pages {
		all = append(all, i)
		if !bytes.Equal(a[i*memsync.PageSize:(i+1)*memsync.PageSize], b[i*memsync.PageSize:(i+1)*memsync.PageSize]) {
			changed = append(changed, i)
		}
	}
	dec, err := memsync.NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	cases := []struct {
		name     string
		from, to []byte
		pages    []int
	}{
		{"full RAM vs empty", make([]byte, len(a)), a, all},
		{"300ms delta", a, b, changed},
	}
	for _, c := range cases {
		codecs := []memsync.Codec{memsync.CodecRaw, memsync.CodecXORRLE, memsync.CodecXORLZ4, memsync.CodecXORZstd, memsync.CodecXORRLELZ4, memsync.CodecXORRLEZstd}
		if raceBuild {
			codecs = []memsync.Codec{memsync.CodecRaw, memsync.DefaultCodec}
		}
		for _, codec := range codecs {
			enc, err := memsync.NewEncoder(codec, 0)
			if err != nil {
				t.Fatal(err)
			}
			base := memsync.NewBase(pages)
			for i := range pages {
				copy(base.Page(i), c.from[i*memsync.PageSize:])
			}
			snap, err := memsync.NewCapturer(bytesPages(c.to), 0).CapturePages(ctx, 1, c.pages)
			if err != nil {
				t.Fatal(err)
			}
			frame, st, err := enc.Encode(nil, snap, base)
			if err != nil {
				t.Fatal(err)
			}
			replica := bytes.Clone(c.from)
			rp := bytesPages(replica)
			_, err = dec.Decode(frame, pages, func(p int) ([]byte, error) { return rp.Page(p), nil },
				func(p int, d []byte) error { copy(rp.Page(p), d); return nil })
			if err != nil {
				t.Fatalf("%s/%s: decode: %v", c.name, codec, err)
			}
			if !bytes.Equal(replica, c.to) {
				t.Fatalf("%s/%s: round trip differs", c.name, codec)
			}
			t.Logf("%-17s %-12s %6d pages: out/in %.4f; zero %d unchanged %d delta %d raw %d",
				c.name, codec, len(c.pages), st.Ratio(), st.Zero, st.Unchanged, st.Delta, st.Raw)
		}
	}
}

type bytesPages []byte

func (m bytesPages) NumPages() int { return len(m) / memsync.PageSize }
func (m bytesPages) Page(i int) []byte {
	return m[i*memsync.PageSize : (i+1)*memsync.PageSize : (i+1)*memsync.PageSize]
}
