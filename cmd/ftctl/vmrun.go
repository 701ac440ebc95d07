package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/vm"
)

func vmCommand() *cli.Command {
	return &cli.Command{
		Name:  "vm",
		Usage: "run guests directly, without protection",
		Commands: []*cli.Command{{
			Name:  "run",
			Usage: "boot a guest from a spec file or flags and show its serial console",
			Description: `Boots one QEMU guest with its RAM in a shared file (as every protected VM
has), prints its serial console until the guest powers off, and on Ctrl-C
asks QEMU to quit.

A spec file is JSON with the fields of a VM spec, e.g.
  {"name": "web", "memory_mib": 256, "kernel": "/boot/vmlinuz", "initrd": "...",
   "cmdline": "console=ttyS0", "disks": [{"path": "disk.raw"}],
   "nics": [{"user": true, "fwd": ["8080:80"]}], "accel": "auto"}
Flags override the file. --builtin runs ftctl's built-in test guest.`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "spec", Usage: "JSON spec `FILE`"},
				&cli.BoolFlag{Name: "builtin", Usage: "boot ftctl's built-in test guest (builds it if needed)"},
				&cli.StringFlag{Name: "workload", Value: "counter", Usage: "built-in guest workloads: counter,disk,tcp"},
				&cli.StringFlag{Name: "name", Usage: "guest name"},
				&cli.IntFlag{Name: "memory", Usage: "guest memory in `MiB`"},
				&cli.IntFlag{Name: "vcpus", Usage: "virtual CPUs"},
				&cli.StringFlag{Name: "kernel", Usage: "kernel image for direct boot"},
				&cli.StringFlag{Name: "initrd", Usage: "initramfs for direct boot"},
				&cli.StringFlag{Name: "append", Usage: "kernel command line"},
				&cli.StringFlag{Name: "image", Usage: "boot disk image (instead of --kernel)"},
				&cli.StringSliceFlag{Name: "disk", Usage: "extra raw disk image `FILE` (repeatable)"},
				&cli.StringSliceFlag{Name: "fwd", Usage: "user-network port forward `HOSTPORT:GUESTPORT` on 127.0.0.1 (repeatable)"},
				&cli.StringFlag{Name: "accel", Usage: "auto, kvm or tcg (auto probes whether KVM really runs a guest)"},
				&cli.BoolFlag{Name: "print-argv", Usage: "print QEMU's command line before starting"},
				&cli.DurationFlag{Name: "timeout", Usage: "stop the guest after this long (0: run until it powers off or Ctrl-C)"},
			},
			Action: runVM,
		}},
	}
}

func specFromFlags(ctx context.Context, cmd *cli.Command) (vm.Spec, error) {
	var s vm.Spec
	if p := cmd.String("spec"); p != "" {
		var err error
		if s, err = vm.LoadSpec(p); err != nil {
			return s, err
		}
	}
	if cmd.Bool("builtin") {
		img, err := guestimage.Default(ctx)
		if err != nil {
			return s, fmt.Errorf("built-in guest: %w", err)
		}
		s.Kernel, s.Initrd = img.Kernel, img.Initrd
		s.Cmdline = img.Cmdline + " ftguest.run=" + cmd.String("workload")
		if s.Name == "" {
			s.Name = "ftguest"
		}
		if s.MemoryMiB == 0 {
			s.MemoryMiB = 256
		}
	}
	if v := cmd.String("name"); v != "" {
		s.Name = v
	}
	if v := cmd.Int("memory"); v != 0 {
		s.MemoryMiB = v
	}
	if v := cmd.Int("vcpus"); v != 0 {
		s.VCPUs = v
	}
	for flag, dst := range map[string]*string{"kernel": &s.Kernel, "initrd": &s.Initrd, "append": &s.Cmdline, "image": &s.Image, "accel": &s.Accel} {
		if v := cmd.String(flag); v != "" {
			*dst = v
		}
	}
	for _, d := range cmd.StringSlice("disk") {
		s.Disks = append(s.Disks, vm.Disk{Path: d})
	}
	if f := cmd.StringSlice("fwd"); len(f) > 0 {
		s.NICs = append(s.NICs, vm.NIC{User: true, Fwd: f})
	}
	if cmd.String("spec") == "" && !cmd.Bool("builtin") && s.Kernel == "" && s.Image == "" {
		return s, cli.Exit("ftctl vm run: give --spec FILE, --builtin, or --kernel/--image (see --help)", 2)
	}
	return s, s.WithDefaults().Validate()
}

func runVM(ctx context.Context, cmd *cli.Command) error {
	spec, err := specFromFlags(ctx, cmd)
	if err != nil {
		return err
	}
	if d := cmd.Duration("timeout"); d > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	m, err := vm.Start(context.WithoutCancel(ctx), spec, vm.Options{})
	if err != nil {
		return err
	}
	defer m.Close()
	out := cmd.Root().Writer
	if cmd.Bool("print-argv") {
		fmt.Fprintf(out, "%s %s\n", spec.WithDefaults().QEMU, strings.Join(m.Argv(), " "))
	}
	fmt.Fprintf(cmd.Root().ErrWriter, "ftctl: %s running (pid %d, accel %s); Ctrl-C stops it\n", spec.Name, m.PID(), m.Accel())
	follow(ctx, m, out)
	select {
	case <-m.Exited():
		fmt.Fprintf(cmd.Root().ErrWriter, "ftctl: %s powered off\n", spec.Name)
		return nil
	default:
	}
	qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fmt.Fprintf(cmd.Root().ErrWriter, "ftctl: stopping %s\n", spec.Name)
	return m.Stop(qctx)
}

// follow copies the serial log to w as it grows, until ctx ends or QEMU
// exits (then it drains what is left).
func follow(ctx context.Context, m *vm.Machine, w io.Writer) {
	f, err := os.Open(m.SerialPath())
	for err != nil {
		select {
		case <-ctx.Done():
			return
		case <-m.Exited():
			return
		case <-time.After(20 * time.Millisecond):
		}
		f, err = os.Open(m.SerialPath())
	}
	defer f.Close()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		io.Copy(w, f)
		select {
		case <-ctx.Done():
			return
		case <-m.Exited():
			io.Copy(w, f)
			return
		case <-t.C:
		}
	}
}
