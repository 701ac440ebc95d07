package vm_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/vm"
)

func TestMachineLifecycle(t *testing.T) {
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, 2*time.Minute)
	spec := vm.Spec{Name: "life", MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline: img.Cmdline + " ftguest.run=counter ftguest.interval=50ms", Accel: vm.AccelTCG}
	m, err := vm.Start(ctx, spec, vm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	fi, err := os.Stat(m.RAMFile())
	if err != nil || fi.Size() != 128<<20 {
		t.Fatalf("RAM file %s: %v, size %d; want 128 MiB", m.RAMFile(), err, fi.Size())
	}
	if err := m.WaitSerial(ctx, func(b []byte) bool { return bytes.Contains(b, []byte("ftguest counter=3")) }); err != nil {
		t.Fatal(err)
	}
	st, err := m.QMP().QueryStatus(ctx)
	if err != nil || !st.Running {
		t.Fatalf("status %+v, %v", st, err)
	}
	qctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := m.Stop(qctx); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
	select {
	case <-m.Exited():
	default:
		t.Fatal("Stop returned but QEMU still runs")
	}
	ram := m.RAMFile()
	m.Close()
	if _, err := os.Stat(ram); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("RAM file %s left behind after Close: %v", ram, err)
	}
}

func TestStartReportsQEMUFailure(t *testing.T) {
	testenv.RequireQEMU(t)
	ctx := testenv.Deadline(t, time.Minute)
	kernel := filepath.Join(t.TempDir(), "not-a-kernel")
	os.WriteFile(kernel, []byte("garbage"), 0o644)
	_, err := vm.Start(ctx, vm.Spec{Name: "bad", MemoryMiB: 64, Kernel: kernel, Accel: vm.AccelTCG}, vm.Options{})
	if !errors.Is(err, vm.ErrExited) {
		t.Fatalf("Start with a garbage kernel = %v, want ErrExited", err)
	}
	if !strings.Contains(err.Error(), "qemu") {
		t.Fatalf("error does not carry QEMU's message: %v", err)
	}
	t.Logf("refused as expected: %v", err)
}

func TestKillIsImmediate(t *testing.T) {
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, time.Minute)
	m, err := vm.Start(ctx, vm.Spec{Name: "kill", MemoryMiB: 64, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline, Accel: vm.AccelTCG}, vm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Exited():
	default:
		t.Fatal("Kill returned but QEMU still runs")
	}
	if _, err := m.QMP().QueryStatus(ctx); err == nil {
		t.Fatal("QMP still answers after SIGKILL")
	}
}

func TestAccelResolution(t *testing.T) {
	testenv.RequireQEMU(t)
	ctx := testenv.Deadline(t, time.Minute)
	if a, err := vm.ResolveAccel(ctx, vm.AccelTCG, "qemu-system-x86_64"); err != nil || a != vm.AccelTCG {
		t.Fatalf("tcg resolved to %q, %v", a, err)
	}
	ok, why := vm.ProbeKVM(ctx, "qemu-system-x86_64")
	t.Logf("KVM probe: %v (%s)", ok, why)
	a, err := vm.ResolveAccel(ctx, vm.AccelAuto, "qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	if (a == vm.AccelKVM) != ok {
		t.Fatalf("auto resolved to %s but probe said %v", a, ok)
	}
	_, err = vm.ResolveAccel(ctx, vm.AccelKVM, "qemu-system-x86_64")
	if ok != (err == nil) {
		t.Fatalf("explicit kvm: err %v with probe %v", err, ok)
	}
	if err != nil && !errors.Is(err, vm.ErrInvalidSpec) {
		t.Fatalf("explicit kvm on a host without working KVM: %v, want ErrInvalidSpec", err)
	}
}
