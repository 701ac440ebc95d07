package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
	"github.com/ftctl/ftctl/pkg/libvirt/hook"
)

// libvirtCommand is `ftctl libvirt`: check, prepare and hook up
// libvirt-managed domains.
func libvirtCommand() *cli.Command {
	connect := &cli.StringFlag{Name: "connect", Aliases: []string{"c"}, Sources: cli.EnvVars("LIBVIRT_DEFAULT_URI"),
		Usage: "libvirt URI (qemu:///system, qemu+ssh://HOST/system, ...) or a libvirtd socket path; default the local system daemon"}
	prepFlags := []cli.Flag{
		&cli.StringFlag{Name: "nic", Value: string(domxml.NICStream), Usage: "how NIC traffic reaches the agent: stream (a unix socket, via qemu:commandline) or client (libvirt's own type='client', a loopback TCP port)"},
		&cli.IntFlag{Name: "nic-port", Usage: "first loopback TCP port for --nic client"},
		&cli.StringFlag{Name: "qmp", Value: string(domxml.QMPSocket), Usage: "how the agent drives QEMU: socket (a dedicated QMP socket, about 5x faster per command) or passthrough (libvirt's monitor pass-through)"},
		&cli.StringFlag{Name: "socket-dir", Usage: "directory of the agent's sockets for this domain (default /run/ftctl/vms/DOMAIN)"},
		&cli.StringFlag{Name: "peer", Usage: "peer agent HOST:PORT to record in the domain's ftctl metadata; the hook pairs the domain with it when it starts"},
		&cli.StringFlag{Name: "policy", Usage: "hook policy to record: auto (pair on start, unpair on stop; the default with a peer) or manual"},
		&cli.StringSliceFlag{Name: "probe-addr", Usage: "the VM's LAN `IP` address for the failure probe (repeatable); replaces the recorded probe"},
		&cli.StringSliceFlag{Name: "probe-tcp", Usage: "a TCP `PORT` of a service the VM runs, for the failure probe (repeatable; needs --probe-addr)"},
		&cli.BoolFlag{Name: "no-probe", Usage: "remove the recorded failure probe"},
	}
	return &cli.Command{
		Name:  "libvirt",
		Usage: "protect libvirt-managed domains: check, prepare, install the hook",
		Commands: []*cli.Command{
			{
				Name:        "check",
				Usage:       "list what a domain needs before ftctl can protect it, and why",
				ArgsUsage:   "DOMAIN",
				Description: "check reads the domain's persistent definition; the options say what prepare would be run with.\n\n" + probeHelp,
				Flags:       append([]cli.Flag{connect}, prepFlags...),
				Action: func(ctx context.Context, cmd *cli.Command) error {
					name, opts, c, err := domainRequest(ctx, cmd)
					if err != nil {
						return err
					}
					defer c.Close()
					x, err := c.XML(ctx, name, true)
					if err != nil {
						return err
					}
					fs, err := domxml.CheckWith(x, opts)
					if err != nil {
						return cli.Exit(err.Error(), 1)
					}
					w := cmd.Root().Writer
					if st, err := c.State(ctx, name); err == nil {
						fmt.Fprintf(w, "domain %s: %s (checked: its persistent definition, which its next start uses)\n", name, st)
					}
					var changes int
					for _, f := range fs {
						fmt.Fprintln(w, f)
						if f.Severity == domxml.Change {
							changes++
						}
					}
					if b := domxml.Blockers(fs); len(b) > 0 {
						return cli.Exit(fmt.Sprintf("domain %s cannot be protected: %d blocker(s)", name, len(b)), 3)
					}
					if changes > 0 {
						fmt.Fprintf(w, "%d change(s) needed: run `ftctl libvirt prepare %s --dry-run` to see them\n", changes, name)
					} else {
						fmt.Fprintf(w, "domain %s is ready for protection\n", name)
					}
					return nil
				},
			},
			{
				Name:      "prepare",
				Usage:     "rewrite a domain's definition for protection (backs up the old one)",
				ArgsUsage: "DOMAIN",
				Description: `prepare shows the change as a diff and, without --dry-run, writes the old
definition to a backup file it names and redefines the domain. A running
domain keeps running as it is: libvirt applies a new definition only when
the domain next starts (shut down and start; a guest reboot is not enough),
so prepare refuses a running domain unless --next-start says that is fine.

` + probeHelp,
				Flags: append([]cli.Flag{connect,
					&cli.BoolFlag{Name: "dry-run", Usage: "show the diff only"},
					&cli.BoolFlag{Name: "next-start", Usage: "redefine a running domain; the change takes effect at its next start"},
					&cli.StringFlag{Name: "backup-dir", Value: libvirt.DefaultBackupDir, Usage: "where the old definition is saved"},
				}, prepFlags...),
				Action: func(ctx context.Context, cmd *cli.Command) error {
					name, opts, c, err := domainRequest(ctx, cmd)
					if err != nil {
						return err
					}
					defer c.Close()
					res, err := libvirt.PrepareDomain(ctx, c, libvirt.PrepareRequest{
						Domain: name, Options: opts, DryRun: cmd.Bool("dry-run"),
						BackupDir: cmd.String("backup-dir"), NextStart: cmd.Bool("next-start"),
					})
					w := cmd.Root().Writer
					if res.Diff != "" {
						fmt.Fprint(w, res.Diff)
					}
					switch {
					case errors.Is(err, libvirt.ErrRunning):
						return cli.Exit(err.Error()+": pass --next-start, or shut the domain down and run prepare again", 4)
					case errors.Is(err, domxml.ErrUnsupported):
						return cli.Exit(fmt.Sprintf("%v (see ftctl libvirt check %s)", err, name), 3)
					case err != nil:
						return err
					case res.Diff == "":
						fmt.Fprintf(w, "domain %s is already prepared; nothing to do\n", name)
					case cmd.Bool("dry-run"):
						fmt.Fprintf(w, "dry run: domain %s not changed\n", name)
					default:
						fmt.Fprintf(w, "domain %s redefined; old definition saved in %s\n", name, res.Backup)
						if res.State.Active() {
							fmt.Fprintf(w, "domain %s is %s: the new definition takes effect when it next starts (shut it down, then start it)\n", name, res.State)
						}
					}
					return nil
				},
			},
			{
				Name:  "install-hook",
				Usage: "install `ftctl hook` as libvirt's qemu hook (DIR/qemu)",
				Description: `The hook tells the local agent about each prepared domain's start and
stop: before QEMU starts, the agent opens the domain's sockets (the start
fails with the hook's message when the agent does not answer); once it
runs, the agent takes it over and, with policy auto, pairs it with the
peer its ftctl metadata names; when it stops, the agent unpairs it (a
clean stop) or lets the peer take over (a crash). An existing hook that
ftctl did not install is never replaced. libvirtd finds hook scripts when
it starts: restart it after the first install.`,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "dir", Value: hook.DefaultDir, Usage: "libvirt's hooks directory"},
					socketFlag(),
					&cli.StringFlag{Name: "log", Value: hook.DefaultLog, Usage: "the hook's log file"},
					&cli.DurationFlag{Name: "timeout", Value: hook.DefaultTimeout, Usage: "bound on the hook worker's agent calls (adopt, stopped)"},
					&cli.DurationFlag{Name: "prepare-timeout", Value: hook.DefaultPrepareTimeout, Usage: "bound on the prepare call a domain's start waits for"},
				},
				Action: func(ctx context.Context, cmd *cli.Command) error {
					exe, err := os.Executable()
					if err != nil {
						return err
					}
					h := hook.Hook{Exe: exe, AgentSocket: cmd.String("socket"), Log: cmd.String("log"),
						Timeout: cmd.Duration("timeout"), PrepareTimeout: cmd.Duration("prepare-timeout")}
					script, err := h.Script()
					if err != nil {
						return err
					}
					path, changed, err := hook.Install(cmd.String("dir"), script)
					if errors.Is(err, hook.ErrForeignHook) {
						return cli.Exit(err.Error(), 5)
					}
					if err != nil {
						return err
					}
					w := cmd.Root().Writer
					if !changed {
						fmt.Fprintf(w, "%s is already ftctl's hook; unchanged\n", path)
						return nil
					}
					fmt.Fprintf(w, "installed %s (runs %s hook; log %s)\nrestart libvirtd if this is the first hook it will see\n", path, exe, h.Log)
					return nil
				},
			},
		},
	}
}

// probeHelp explains the failure probe options of check and prepare.
const probeHelp = `The failure probe (--probe-addr, --probe-tcp): when the secondary loses the
replication link it must tell a dead primary from a broken link before it
takes over. It pings the VM's LAN addresses recorded here and tries the
given TCP ports, as a client of the VM would: if the VM still answers, its
primary lives and the secondary does not promote. Without a probe address
only a management network heartbeat or a witness can decide; on its own the
secondary will not promote. Give the addresses the VM's clients use (not
loopback); the probe is stored in the domain's ftctl metadata, replaced as a
whole by new --probe-addr values, kept when none are given, and removed by
--no-probe.`

// hookCommand is `ftctl hook`, run by libvirt as /etc/libvirt/hooks/qemu.
// It exits non-zero only when the agent did not prepare an ftctl domain
// about to start (QEMU could not connect to its sockets anyway), with a
// one-line message libvirt shows as the reason; everything else exits 0,
// because a failing qemu hook makes libvirt abort the domain's start.
func hookCommand() *cli.Command {
	return &cli.Command{
		Name:      "hook",
		Usage:     "libvirt's qemu hook (installed by ftctl libvirt install-hook); not for interactive use",
		ArgsUsage: "-- DOMAIN OPERATION SUB-OPERATION EXTRA   (domain XML on stdin)",
		Hidden:    true,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "agent", Value: defaultSocket, Usage: "control socket of the local agent"},
			&cli.StringFlag{Name: "log", Value: hook.DefaultLog, Usage: "log file"},
			&cli.DurationFlag{Name: "timeout", Value: hook.DefaultTimeout, Usage: "bound on the worker's agent call (adopt, stopped)"},
			&cli.DurationFlag{Name: "prepare-timeout", Value: hook.DefaultPrepareTimeout, Usage: "bound on the prepare call libvirt's start waits for"},
			&cli.StringFlag{Name: "worker", Usage: "internal: run the detached agent call"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			h := hook.Hook{AgentSocket: cmd.String("agent"), Log: cmd.String("log"),
				Timeout: cmd.Duration("timeout"), PrepareTimeout: cmd.Duration("prepare-timeout")}
			ag := hook.AgentClient(h.AgentSocket)
			if w := cmd.String("worker"); w != "" {
				xml, err := io.ReadAll(io.LimitReader(os.Stdin, 16<<20))
				if err == nil {
					err = h.Work(ctx, w, xml, ag)
				}
				if err != nil {
					return cli.Exit(err.Error(), 1)
				}
				return nil
			}
			// Other errors are in the log; see the command's doc.
			if _, err := h.Handle(ctx, cmd.Args().Slice(), os.Stdin, ag); errors.Is(err, hook.ErrPrepare) {
				return cli.Exit(err.Error(), 1)
			}
			return nil
		},
	}
}

// domainRequest reads what check and prepare share: the one DOMAIN
// argument, the preparation options, and a connection to libvirt (checked
// in that order, so a usage error never waits for libvirt).
func domainRequest(ctx context.Context, cmd *cli.Command) (string, domxml.Options, *libvirt.Conn, error) {
	name, err := oneDomain(cmd)
	if err != nil {
		return "", domxml.Options{}, nil, err
	}
	opts, err := prepareOptions(cmd)
	if err != nil {
		return "", domxml.Options{}, nil, err
	}
	c, err := dialLibvirt(ctx, cmd)
	if err != nil {
		return "", domxml.Options{}, nil, err
	}
	return name, opts, c, nil
}

func oneDomain(cmd *cli.Command) (string, error) {
	if cmd.Args().Len() != 1 {
		return "", cli.Exit(fmt.Sprintf("usage: ftctl libvirt %s DOMAIN", cmd.Name), 2)
	}
	return cmd.Args().First(), nil
}

func prepareOptions(cmd *cli.Command) (domxml.Options, error) {
	opts := domxml.Options{
		SocketDir: cmd.String("socket-dir"),
		NIC:       domxml.NICMode(cmd.String("nic")),
		NICPort:   int(cmd.Int("nic-port")),
		QMP:       domxml.QMPMode(cmd.String("qmp")),
		Peer:      cmd.String("peer"),
		Policy:    domxml.Policy(cmd.String("policy")),
	}
	if opts.Policy != "" && opts.Policy != domxml.PolicyAuto && opts.Policy != domxml.PolicyManual {
		return opts, cli.Exit(fmt.Sprintf("--policy %q: want auto or manual", opts.Policy), 2)
	}
	if opts.Peer != "" {
		if err := domxml.ValidPeer(opts.Peer); err != nil {
			return opts, cli.Exit("--peer: "+err.Error(), 2)
		}
	}
	addrs, tcp := cmd.StringSlice("probe-addr"), cmd.StringSlice("probe-tcp")
	var ports []int
	for _, s := range tcp {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 65535 {
			return opts, cli.Exit(fmt.Sprintf("--probe-tcp %q: want a TCP port number in 1..65535", s), 2)
		}
		ports = append(ports, n)
	}
	switch {
	case cmd.Bool("no-probe") && (len(addrs) > 0 || len(ports) > 0):
		return opts, cli.Exit("--no-probe removes the probe: it cannot be given with --probe-addr or --probe-tcp", 2)
	case cmd.Bool("no-probe"):
		opts.ProbeAddrs = []string{}
	case len(addrs) == 0 && len(ports) > 0:
		return opts, cli.Exit("--probe-tcp needs --probe-addr: the probe is recorded as a whole (give the VM's addresses again)", 2)
	case len(addrs) > 0:
		if _, err := domxml.NewProbe(addrs, ports); err != nil {
			return opts, cli.Exit("--probe-addr/--probe-tcp: "+err.Error(), 2)
		}
		opts.ProbeAddrs, opts.ProbeTCPPorts = addrs, ports
	}
	return opts, nil
}

func dialLibvirt(ctx context.Context, cmd *cli.Command) (*libvirt.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := libvirt.Dial(ctx, cmd.String("connect"))
	if err != nil {
		return nil, cli.Exit(err.Error(), 1)
	}
	return c, nil
}
