package goqemu

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qemu"

	"github.com/ftctl/ftctl/pkg/qmp"
)

// startQEMU starts a paused tiny TCG VM and returns its QMP socket path.
func startQEMU(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skipf("qemu-system-x86_64 not installed: %v", err)
	}
	dir, err := os.MkdirTemp("", "goqemu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	cmd := exec.Command(bin, "-accel", "tcg", "-machine", "pc", "-nodefaults", "-vga", "none",
		"-m", "64", "-display", "none", "-S", "-qmp", "unix:"+sock+",server=on,wait=off")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if i > 300 {
			t.Fatal("QMP socket never appeared")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMonitorWithGoQEMUDomain(t *testing.T) {
	sock := startQEMU(t)
	mon := NewMonitor("unix", sock, 30*time.Second)
	if _, err := mon.Run([]byte(`{"execute":"query-status"}`)); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Run before Connect: %v", err)
	}
	if err := mon.Connect(); err != nil {
		t.Fatal(err)
	}
	defer mon.Disconnect()

	// go-qemu's own Domain drives our monitor.
	d, err := qemu.NewDomain(mon, "ftctl-test")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	st, err := d.Status()
	if err != nil || st != qemu.StatusPreLaunch {
		t.Fatalf("Domain.Status = %v, %v; want prelaunch", st, err)
	}
	g := mon.Client().Greeting()
	v, err := d.Version()
	if err != nil || !strings.HasPrefix(v, "7.") || v != strings.Join([]string{itoa(g.Major), itoa(g.Minor), itoa(g.Micro)}, ".") {
		t.Fatalf("Domain.Version = %q, %v; greeting %+v", v, err, g)
	}
	events, done, err := d.Events()
	if err != nil {
		t.Fatal(err)
	}
	defer close(done)
	if _, err := mon.Run([]byte(`{"execute":"cont","id":"abc"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-events:
		if ev.Event != "RESUME" || ev.Timestamp.Seconds == 0 {
			t.Fatalf("event %+v, want RESUME with timestamp", ev)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no RESUME event through go-qemu's Domain")
	}
	if st, err := d.Status(); err != nil || st != qemu.StatusRunning {
		t.Fatalf("status after cont: %v, %v", st, err)
	}
}

func TestMonitorRun(t *testing.T) {
	sock := startQEMU(t)
	mon := NewMonitor("unix", sock, 30*time.Second, qmp.WithEventBuffer(8))
	if err := mon.Connect(); err != nil {
		t.Fatal(err)
	}
	defer mon.Disconnect()

	out, err := mon.Run([]byte(`{"execute":"query-status","id":"q1"}`))
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Return struct{ Status string }
		ID     string
	}
	if err := json.Unmarshal(out, &r); err != nil || r.Return.Status != "prelaunch" || r.ID != "q1" {
		t.Fatalf("Run reply %s: %+v, %v", out, r, err)
	}

	// go-qemu's SocketMonitor cannot read a reply over 64 KB; this one can.
	out, err = mon.Run([]byte(`{"execute":"human-monitor-command","arguments":{"command-line":"xp /131072x 0"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if len(out) < 1<<20 || !json.Valid(out) {
		t.Fatalf("big reply: %d bytes, valid %v", len(out), json.Valid(out))
	}

	var qe *qmp.Error
	if _, err := mon.Run([]byte(`{"execute":"no-such"}`)); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("unknown command: %v", err)
	}
	for _, bad := range []string{`not json`, `{"arguments":{}}`, `[]`} {
		if _, err := mon.Run([]byte(bad)); err == nil || errors.As(err, &qe) {
			t.Errorf("Run(%s) = %v, want a local input error", bad, err)
		}
	}
	if err := mon.Disconnect(); err != nil {
		t.Fatal(err)
	}
	if _, err := mon.Run([]byte(`{"execute":"query-status"}`)); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Run after Disconnect: %v", err)
	}
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }
