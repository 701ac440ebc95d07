package cluster

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
)

// TestLifecycle runs real agents: both answer, Restart gives a host a
// fresh agent in new directories, and Close leaves no namespace, process
// or file behind.
func TestLifecycle(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("nsenter"); err != nil {
		t.Skip("needs nsenter:", err)
	}
	ctx := testenv.Deadline(t, 2*time.Minute)
	bin := filepath.Join(t.TempDir(), "ftctl")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/ftctl/ftctl/cmd/ftctl").CombinedOutput(); err != nil {
		t.Fatalf("build ftctl: %v\n%s", err, out)
	}
	c, err := New(ctx, Options{Binary: bin, Prefix: "ftct"})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			c.Close()
		}
	})
	for _, p := range c.Agents() {
		if _, err := p.Client().List(ctx); err != nil || !p.Running() {
			t.Fatalf("agent %s: running %v, list: %v", p.Name, p.Running(), err)
		}
		if !strings.HasPrefix(p.Dir, c.Root+"/") {
			t.Fatalf("agent %s lives in %s, outside the root %s", p.Name, p.Dir, c.Root)
		}
	}
	old := c.A
	oldPID := old.PID()
	na, err := c.Restart(ctx, old)
	if err != nil {
		t.Fatal(err)
	}
	if old.Running() || na != c.A || na.Dir == old.Dir || na.PID() == oldPID {
		t.Fatalf("after Restart: old running %v, new %s in %s (old %s), pids %d/%d", old.Running(), na.Name, na.Dir, old.Dir, na.PID(), oldPID)
	}
	if _, err := na.Client().List(ctx); err != nil {
		t.Fatalf("restarted agent: %v", err)
	}
	if c.Peer(na) != c.B || c.Peer(c.B) != na {
		t.Fatal("Peer does not pair A and B")
	}
	root, ns := c.Root, c.Bed.A.NetNS
	pids := []int{na.PID(), c.B.PID()}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if _, err := os.Stat(root); !os.IsNotExist(err) {
		t.Errorf("root %s still there: %v", root, err)
	}
	if _, err := os.Stat(ns); !os.IsNotExist(err) {
		t.Errorf("namespace %s still there: %v", ns, err)
	}
	for _, pid := range pids {
		if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
			t.Errorf("agent process %d still there", pid)
		}
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
