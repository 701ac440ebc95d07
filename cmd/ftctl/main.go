// Command ftctl is the fault-tolerance controller for KVM/QEMU virtual
// machines: one binary for the CLI and (later) the per-host agent.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/urfave/cli/v3"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newApp().Run(ctx, os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "ftctl:", err)
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			os.Exit(ec.ExitCode())
		}
		os.Exit(1)
	}
}

func newApp() *cli.Command {
	return &cli.Command{
		Name:  "ftctl",
		Usage: "keep a KVM/QEMU virtual machine running through the death of its host",
		Description: `ftctl replicates a running VM to a standby host, checkpoint by checkpoint
(device state through QEMU migration, memory through a shared RAM file, disk
writes as an event log), and resumes it there when the primary host dies.

Run 'ftctl agent' on every KVM host; then 'ftctl start' a VM under it,
'ftctl pair VM OTHER-HOST' to protect it, and 'ftctl status' to watch.`,
		Version:         versionString(),
		HideHelpCommand: true,
		Commands: append([]*cli.Command{
			versionCommand(),
			agentCommand(), shimCommand(),
			certCommand(),
			vmCommand(),
			demoCommand(),
			benchCommand(),
			libvirtCommand(), hookCommand(),
		}, vmOpsCommands()...),
	}
}

func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " (" + s.Value[:12] + ")"
			}
		}
		v += " " + bi.GoVersion
	}
	return v
}

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print ftctl's version",
		Action: func(ctx context.Context, cmd *cli.Command) error {
			fmt.Fprintln(cmd.Root().Writer, "ftctl", versionString())
			return nil
		},
	}
}
