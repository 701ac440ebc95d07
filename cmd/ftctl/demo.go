package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/vm"
)

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "boot the built-in guest, checkpoint it, SIGKILL it, and resume it from the checkpoint",
		Description: `Shows the primitive ftctl's replication is built on, on this one host:

  1. boots the built-in guest (a counter on its serial console, a disk writer
     whose records chain checksums) with its RAM in a shared file;
  2. takes full checkpoints while it runs: pause, copy RAM and disk, save the
     device state through QEMU migration (x-ignore-shared), resume;
  3. kills the primary QEMU with SIGKILL;
  4. starts a standby QEMU over the last checkpoint's RAM and disk, restores
     the device state, and checks that the counter goes on from exactly the
     checkpointed value and that the disk chain is unbroken.

It prints the measured pause, device-state size and restore time.`,
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "checkpoints", Value: 3, Usage: "checkpoints to take before the kill"},
			&cli.IntFlag{Name: "memory", Value: 256, Usage: "guest memory in `MiB`"},
			&cli.StringFlag{Name: "accel", Value: vm.AccelAuto, Usage: "auto, kvm or tcg"},
			&cli.StringFlag{Name: "kernel", Usage: "guest kernel (default: the built-in guest, built if needed)"},
			&cli.StringFlag{Name: "initrd", Usage: "guest initramfs (with --kernel)"},
			&cli.BoolFlag{Name: "keep", Usage: "keep the work directory (checkpoint files, serial logs)"},
		},
		Action: runDemo,
	}
}

type demoPrinter struct {
	w    io.Writer
	step int
}

func (p *demoPrinter) stepf(format string, a ...any) {
	p.step++
	fmt.Fprintf(p.w, "[%d] %s\n", p.step, fmt.Sprintf(format, a...))
}

func (p *demoPrinter) infof(format string, a ...any) {
	fmt.Fprintf(p.w, "    %s\n", fmt.Sprintf(format, a...))
}

func runDemo(ctx context.Context, cmd *cli.Command) error {
	p := &demoPrinter{w: cmd.Root().Writer}
	kernel, initrd, base := cmd.String("kernel"), cmd.String("initrd"), "console=ttyS0 panic=-1"
	if kernel == "" {
		p.stepf("building the built-in guest (cached after the first run)")
		img, err := guestimage.Default(ctx)
		if err != nil {
			return fmt.Errorf("built-in guest: %w", err)
		}
		kernel, initrd, base = img.Kernel, img.Initrd, img.Cmdline
		p.infof("kernel %s, initrd %s", kernel, initrd)
	}
	parent := os.TempDir()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		parent = "/dev/shm" // checkpoint RAM copies belong in memory, not on disk
	}
	work, err := os.MkdirTemp(parent, "ftctl-demo-")
	if err != nil {
		return err
	}
	if cmd.Bool("keep") {
		p.infof("work directory: %s (kept)", work)
	} else {
		defer os.RemoveAll(work)
	}
	disk := filepath.Join(work, "disk.raw")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		return err
	}
	spec := vm.Spec{
		Name:      "demo",
		MemoryMiB: cmd.Int("memory"),
		Kernel:    kernel,
		Initrd:    initrd,
		Cmdline:   base + " ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=50ms",
		Disks:     []vm.Disk{{Path: disk}},
		Accel:     cmd.String("accel"),
	}

	t0 := time.Now()
	primary, err := vm.Start(ctx, spec, vm.Options{RunDir: filepath.Join(work, "primary")})
	if err != nil {
		return fmt.Errorf("start primary: %w", err)
	}
	defer primary.Close()
	p.stepf("primary QEMU started (pid %d, accel %s, %d MiB RAM in %s)", primary.PID(), primary.Accel(), spec.MemoryMiB, primary.RAMFile())
	bootCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	err = primary.WaitSerial(bootCtx, func(b []byte) bool { return counterlog.Last(b) >= 5 && counterlog.LastDiskSeq(b) >= 2 })
	cancel()
	if err != nil {
		return fmt.Errorf("guest did not start counting: %w", err)
	}
	p.infof("guest booted and counting after %v", time.Since(t0).Round(time.Millisecond))
	if err := checkpoint.Prepare(ctx, primary.QMP()); err != nil {
		return err
	}

	var (
		last       *checkpoint.Full
		serialAtCk []byte
	)
	n := max(cmd.Int("checkpoints"), 1)
	for i := 1; i <= n; i++ {
		time.Sleep(400 * time.Millisecond)
		var atPause []byte
		ck, err := checkpoint.TakeFull(ctx, primary.QMP(), checkpoint.FullOptions{
			RAMFile: primary.RAMFile(),
			Disks:   []string{disk},
			Dir:     filepath.Join(work, "checkpoint"),
			Paused:  func() { atPause, _ = primary.Serial() },
		})
		if err != nil {
			return fmt.Errorf("checkpoint %d: %w", i, err)
		}
		s := ck.Stats
		p.stepf("checkpoint %d/%d at counter=%d: pause %v (stop %v, RAM copy %v for %.1f MiB, disk copy %v, device state %.0f KB in %v, cont %v)",
			i, n, counterlog.Last(atPause), ms(s.Pause), ms(s.Stop), ms(s.CopyRAM), float64(s.RAMBytes)/(1<<20),
			ms(s.CopyDisks), float64(len(ck.DeviceState))/1000, ms(s.DeviceState), ms(s.Cont))
		last, serialAtCk = ck, atPause
	}
	ckCounter := counterlog.Last(serialAtCk)
	ckDisk := counterlog.LastDiskSeq(serialAtCk)

	time.Sleep(700 * time.Millisecond)
	before, _ := primary.Serial()
	if err := primary.Kill(); err != nil {
		return err
	}
	p.stepf("primary killed with SIGKILL at counter=%d (it ran %d steps past the checkpoint; in the full system the output-commit buffer holds such output back)",
		counterlog.Last(before), counterlog.Last(before)-ckCounter)

	standbySpec := spec
	standbySpec.Disks = []vm.Disk{{Path: last.Disks[0]}}
	t1 := time.Now()
	standby, err := vm.Start(ctx, standbySpec, vm.Options{RunDir: filepath.Join(work, "standby"), Standby: true, ReplicaRAM: last.RAM})
	if err != nil {
		return fmt.Errorf("start standby: %w", err)
	}
	defer standby.Close()
	started := time.Since(t1)
	t2 := time.Now()
	if err := checkpoint.RestoreDeviceState(ctx, standby.QMP(), last.DeviceState, true); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	restore := time.Since(t2)
	p.stepf("standby QEMU restored the last checkpoint: restore %v (process start %v, start + restore %v)",
		ms(restore), ms(started), ms(time.Since(t1)))

	target := ckCounter + 20
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	err = standby.WaitSerial(wctx, func(b []byte) bool { return counterlog.Last(b) >= target })
	cancel()
	if err != nil {
		return fmt.Errorf("restored guest did not keep counting: %w", err)
	}
	after, _ := standby.Serial()
	standby.Kill()
	vals := counterlog.Values(after)
	lastVal, cerr := counterlog.Check(counterlog.Values(counterlog.Stitch(serialAtCk, after)))
	first := uint64(0)
	if len(vals) > 0 {
		first = vals[0]
	}
	p.stepf("restored guest counted on: first value %d, now %d", first, lastVal)
	fail := false
	if cerr != nil {
		fmt.Fprintf(p.w, "continuity: FAIL: %v\n", cerr)
		fail = true
	} else {
		fmt.Fprintf(p.w, "continuity: PASS: checkpoint held counter=%d, the restored guest went on at %d, no gap or repeat through %d\n", ckCounter, ckCounter+1, lastVal)
	}
	f, err := os.Open(last.Disks[0])
	if err != nil {
		return err
	}
	defer f.Close()
	fi, _ := f.Stat()
	rep, verr := diskrec.Verify(f, fi.Size())
	switch {
	case verr != nil:
		fmt.Fprintf(p.w, "disk: FAIL: %v\n", verr)
		fail = true
	case rep.LastSeq < counterlog.LastDiskSeq(after) || rep.LastSeq <= ckDisk:
		fmt.Fprintf(p.w, "disk: FAIL: chain ends at seq %d, guest reported seq %d\n", rep.LastSeq, counterlog.LastDiskSeq(after))
		fail = true
	default:
		fmt.Fprintf(p.w, "disk: PASS: record chain unbroken from seq %d through %d (checkpoint held seq %d; the restored guest's writes chain onto it)\n", rep.FirstSeq, rep.LastSeq, ckDisk)
	}
	fmt.Fprintf(p.w, "figures: pause %v, device state %.0f KB, restore %v, accel %s\n", ms(last.Stats.Pause), float64(len(last.DeviceState))/1000, ms(restore), primary.Accel())
	if fail {
		return cli.Exit("demo: the restored guest did not continue from the checkpoint", 1)
	}
	return nil
}

// ms rounds a duration for display.
func ms(d time.Duration) time.Duration {
	if d > 10*time.Millisecond {
		return d.Round(time.Millisecond)
	}
	return d.Round(10 * time.Microsecond)
}
