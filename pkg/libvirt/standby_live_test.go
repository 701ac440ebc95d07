package libvirt_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
	"github.com/ftctl/ftctl/pkg/qmp"
)

// ramPath asks QEMU where the guest RAM file of its memory backend id is
// (for libvirt's own backend, pc.ram, libvirt picks the path:
// memory_backing_dir/<id>-<name>/pc.ram).
func ramPath(ctx context.Context, t *testing.T, c *qmp.Client, id string) string {
	t.Helper()
	var p string
	if err := c.Execute(ctx, "qom-get", map[string]any{"path": "/objects/" + id, "property": "mem-path"}, &p); err != nil {
		t.Fatal(err)
	}
	return p
}

// copyInto overwrites dst's content with src's without truncating dst:
// dst is mapped shared by a QEMU, and shrinking it, even for a moment,
// would fault that mapping.
func copyInto(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func waitSerial(ctx context.Context, t *testing.T, path string, cond func([]byte) bool) []byte {
	t.Helper()
	for {
		b, _ := os.ReadFile(path)
		if cond(b) {
			return b
		}
		select {
		case <-ctx.Done():
			t.Fatalf("serial %s: condition not met: %v; last lines:\n%s", path, ctx.Err(), tail(b, 5))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func dialQMP(ctx context.Context, t *testing.T, path string) *qmp.Client {
	t.Helper()
	c, err := qmp.Dial(ctx, "unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestLiveStandbyDomain checkpoints a running libvirt domain on host A
// through its dedicated QMP socket (stop, copy the RAM file, save the
// device state, cont), kills its QEMU, and resumes it on host B as a
// libvirt domain: defined with the same devices plus `-incoming defer`,
// started paused, the checkpoint's RAM written into the RAM file libvirt
// gave it, the device state restored and cont issued on B's dedicated
// socket. libvirt on B must show the domain running, its counter must go
// on from the checkpoint, and libvirt must still drive it (suspend,
// resume).
//
// Two ways to back the guest RAM: "libvirt-file" keeps libvirt's own
// backend (pc.ram, in a file whose path libvirt picks when the domain
// starts, so the replica is written into it after the standby starts);
// "given-file" adds a memory-backend-file with a path of ftctl's choosing
// through <qemu:commandline> and points -machine memory-backend at it, on
// both hosts (the backend id names the RAM block in the migration stream,
// so both sides need the same id, and libvirt's pc.ram is taken), so the
// standby maps the replica file itself and nothing is copied at failover.
func TestLiveStandbyDomain(t *testing.T) {
	for _, given := range []bool{false, true} {
		name := "libvirt-file"
		if given {
			name = "given-file"
		}
		t.Run(name, func(t *testing.T) { testStandbyDomain(t, given) })
	}
}

func testStandbyDomain(t *testing.T, givenRAM bool) {
	img := testenv.Guest(t)
	hostA := libvirttest.Start(t, libvirttest.Options{})
	hostB := libvirttest.Start(t, libvirttest.Options{})
	ca, cb := hostA.Conn(t), hostB.Conn(t)
	ctx := testenv.Deadline(t, 150*time.Second)
	dir, err := os.MkdirTemp("", "ftsb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, h := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(dir, h), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	replica := filepath.Join(dir, "b", "replica.ram")
	memID := "pc.ram"
	if givenRAM {
		memID = "ftmem"
	}
	dom := func(host string, standby bool) libvirttest.GuestDomain {
		qmpSock := filepath.Join(dir, host, "qmp.sock")
		g := libvirttest.GuestDomain{
			Name: "web", Kernel: img.Kernel, Initrd: img.Initrd,
			Cmdline: img.Cmdline + " ftguest.run=counter ftguest.interval=100ms",
			Serial:  filepath.Join(dir, host, "serial.log"),
			QEMUArgs: []string{"-chardev", "socket,id=ftqmp,path=" + qmpSock + ",server=on,wait=off",
				"-mon", "chardev=ftqmp,mode=control"},
		}
		if givenRAM {
			ram := filepath.Join(dir, "a", "guest.ram")
			if standby {
				ram = replica
			}
			g.QEMUArgs = append(g.QEMUArgs,
				"-object", "memory-backend-file,id=ftmem,size=128M,mem-path="+ram+",share=on",
				"-machine", "memory-backend=ftmem")
		}
		if standby {
			g.QEMUArgs = append(g.QEMUArgs, "-incoming", "defer")
		}
		return g
	}

	// Host A: the primary, a plain libvirt domain with a dedicated QMP socket.
	if err := ca.Define(ctx, dom("a", false).XML()); err != nil {
		t.Fatal(err)
	}
	if err := ca.Start(ctx, "web", false); err != nil {
		t.Fatalf("start on A: %v\n%s", err, hostA.QEMULog("web"))
	}
	serialA := filepath.Join(dir, "a", "serial.log")
	waitSerial(ctx, t, serialA, func(b []byte) bool { return counterlog.Last(b) >= 3 })
	qa := dialQMP(ctx, t, filepath.Join(dir, "a", "qmp.sock"))
	if err := checkpoint.Prepare(ctx, qa); err != nil {
		t.Fatal(err)
	}

	// The checkpoint.
	if err := qa.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	atCheckpoint, _ := os.ReadFile(serialA)
	ckpt := counterlog.Last(atCheckpoint)
	if _, err := checkpoint.CopySparse(replica, hostA.RAMFile(ramPath(ctx, t, qa, memID))); err != nil {
		t.Fatal(err)
	}
	state, err := checkpoint.SaveDeviceState(ctx, qa)
	if err != nil {
		t.Fatal(err)
	}
	if err := qa.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	// The primary runs on past the checkpoint; the standby must not show
	// any of that.
	waitSerial(ctx, t, serialA, func(b []byte) bool { return counterlog.Last(b) >= ckpt+3 })
	if st, err := ca.State(ctx, "web"); err != nil || st.Code != libvirt.StateRunning {
		t.Fatalf("A after the checkpoint: %v %v", st, err)
	}

	// Host A dies: kill its QEMU.
	pidb, err := os.ReadFile(filepath.Join(hostA.Dir, "run", "qemu", "web.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(pidb)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "A's domain to stop", func() bool {
		st, err := ca.State(ctx, "web")
		return err == nil && !st.Active()
	})

	// Host B: the standby, started paused with -incoming defer.
	standbyXML := dom("b", true).XML()
	t.Logf("standby domain XML:\n%s", standbyXML)
	if err := cb.Define(ctx, standbyXML); err != nil {
		t.Fatal(err)
	}
	if err := cb.Start(ctx, "web", true); err != nil {
		t.Fatalf("start standby paused: %v\n%s", err, hostB.QEMULog("web"))
	}
	st, err := cb.State(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("standby after start --paused: %s", st)
	if st.Code != libvirt.StatePaused {
		t.Errorf("standby is %s, want paused", st)
	}
	qb := dialQMP(ctx, t, filepath.Join(dir, "b", "qmp.sock"))
	if s, err := qb.QueryStatus(ctx); err != nil || s.Status != "inmigrate" {
		t.Fatalf("standby QEMU status %+v %v, want inmigrate", s, err)
	}
	ramB := ramPath(ctx, t, qb, memID)
	t.Logf("standby RAM file: %s", ramB)
	if givenRAM {
		if ramB != replica {
			t.Fatalf("standby maps %s, not the replica %s", ramB, replica)
		}
	} else if err := copyInto(hostB.RAMFile(ramB), replica); err != nil {
		t.Fatal(err)
	}
	if err := checkpoint.RestoreDeviceState(ctx, qb, state, false); err != nil {
		t.Fatalf("restore: %v\n%s", err, hostB.QEMULog("web"))
	}
	st, _ = cb.State(ctx, "web")
	t.Logf("standby after restore: %s", st)
	if err := qb.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "libvirt on B to see the domain running", func() bool {
		st, err = cb.State(ctx, "web")
		return err == nil && st.Code == libvirt.StateRunning
	})
	t.Logf("standby after cont on the dedicated socket: %s", st)

	// The guest goes on from the checkpoint.
	serialB := filepath.Join(dir, "b", "serial.log")
	after := waitSerial(ctx, t, serialB, func(b []byte) bool { return counterlog.Last(b) >= ckpt+5 })
	vals := counterlog.Values(after)
	if len(vals) == 0 || vals[0] != ckpt+1 {
		t.Fatalf("B's counter starts at %v, want %d (checkpoint at %d)", vals[:min(5, len(vals))], ckpt+1, ckpt)
	}
	if _, err := counterlog.Check(vals); err != nil {
		t.Fatalf("B's counter: %v", err)
	}
	if bytes.Contains(after, []byte("Linux version")) {
		t.Error("B's guest booted afresh instead of resuming")
	}

	// virsh list on B shows it, A's is gone; libvirt still drives it.
	if names, err := cb.Running(ctx); err != nil || !slices.Contains(names, "web") {
		t.Errorf("running on B: %v %v", names, err)
	}
	if names, err := ca.Running(ctx); err != nil || slices.Contains(names, "web") {
		t.Errorf("running on A: %v %v", names, err)
	}
	d, err := cb.Libvirt().DomainLookupByName("web")
	if err != nil {
		t.Fatal(err)
	}
	if err := cb.Libvirt().DomainSuspend(d); err != nil {
		t.Fatalf("virsh suspend after failover: %v", err)
	}
	if st, _ := cb.State(ctx, "web"); st.Code != libvirt.StatePaused {
		t.Errorf("after suspend: %s", st)
	}
	if err := cb.Libvirt().DomainResume(d); err != nil {
		t.Fatalf("virsh resume after failover: %v", err)
	}
	n := counterlog.Last(after)
	waitSerial(ctx, t, serialB, func(b []byte) bool { return counterlog.Last(b) >= n+2 })
	if st, _ := cb.State(ctx, "web"); st.Code != libvirt.StateRunning {
		t.Errorf("after resume: %s", st)
	}
	var ms json.RawMessage
	if ms, err = cb.QMP(ctx, "web", []byte(`{"execute":"query-status"}`)); err != nil {
		t.Errorf("libvirt's own monitor after failover: %v", err)
	}
	t.Logf("checkpoint at counter %d; B resumed at %d; query-status via libvirt: %s", ckpt, vals[0], ms)
}
