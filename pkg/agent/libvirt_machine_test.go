package agent

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
)

// startBareQEMU runs a QEMU with nothing but a QMP server socket, the
// way libvirt's QEMU offers the dedicated socket: not the test's child
// as far as the machine is concerned.
func startBareQEMU(t *testing.T) (*exec.Cmd, string) {
	t.Helper()
	testenv.RequireQEMU(t)
	dir, err := os.MkdirTemp("", "ftlm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	cmd := exec.Command("qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
		"-chardev", "socket,id=ftqmp,path="+sock+",server=on,wait=off", "-mon", "chardev=ftqmp,mode=control")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			return cmd, sock
		}
		if i > 500 {
			t.Fatal("QEMU made no QMP socket in 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func dialBare(t *testing.T, sock string) *libvirtMachine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := dialLibvirtMachine(ctx, "bare", sock, "/nonexistent", "", "tcg", nil)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func waitExited(t *testing.T, m *libvirtMachine) {
	t.Helper()
	select {
	case <-m.Exited():
	case <-time.After(15 * time.Second):
		t.Fatal("machine not exited 15s after QEMU ended")
	}
}

// TestLibvirtMachine checks the machine over a dedicated QMP socket
// against a real QEMU: the pid comes from the socket, an orderly quit
// counts as a clean shutdown and a SIGKILL does not, and Close leaves a
// QEMU the agent does not own running.
func TestLibvirtMachine(t *testing.T) {
	t.Run("quit", func(t *testing.T) {
		cmd, sock := startBareQEMU(t)
		m := dialBare(t, sock)
		if m.PID() != cmd.Process.Pid {
			t.Fatalf("pid from SO_PEERCRED %d, QEMU is %d", m.PID(), cmd.Process.Pid)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := m.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		waitExited(t, m)
		if !m.cleanShutdown() {
			t.Error("QMP quit not seen as a clean shutdown")
		}
	})
	t.Run("kill", func(t *testing.T) {
		_, sock := startBareQEMU(t)
		m := dialBare(t, sock)
		if err := m.Kill(); err != nil {
			t.Fatal(err)
		}
		waitExited(t, m)
		if m.cleanShutdown() {
			t.Error("SIGKILL seen as a clean shutdown")
		}
		if processAlive(m.PID()) {
			t.Error("QEMU still alive after Kill")
		}
	})
	t.Run("close", func(t *testing.T) {
		cmd, sock := startBareQEMU(t)
		m := dialBare(t, sock)
		if err := m.Close(); err != nil {
			t.Fatal(err)
		}
		waitExited(t, m)
		if !processAlive(cmd.Process.Pid) {
			t.Fatal("Close killed a QEMU the agent does not own")
		}
		// The socket takes a new client: the domain can be adopted again.
		m2 := dialBare(t, sock)
		defer m2.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := m2.QMP().QueryStatus(ctx); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(cmd.Process.Pid, 0); err != nil {
			t.Fatal(err)
		}
	})
}
