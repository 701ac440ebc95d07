package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/failover"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/vm"
)

const defaultSocket = "/run/ftctl/agent.sock"

func socketFlag() cli.Flag {
	return &cli.StringFlag{Name: "socket", Value: defaultSocket, Sources: cli.EnvVars("FTCTL_SOCKET"), Usage: "control socket of the local agent"}
}

func client(cmd *cli.Command) *agent.Client { return agent.NewClient(cmd.String("socket")) }

// explain turns an agent error into one that says what to do.
func explain(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, agent.ErrNotFound):
		return fmt.Errorf("%w (ftctl status lists the VMs this agent knows)", err)
	case errors.Is(err, agent.ErrPeer):
		return fmt.Errorf("%w (is `ftctl agent --listen` running there, reachable, and using credentials from the same `ftctl cert init`?)", err)
	}
	return err
}

func agentCommand() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run the ftctl agent of this host (foreground; see contrib/ftctl-agent.service)",
		Description: `The agent runs the VMs this host protects and the replicas it keeps for
peers. Start one on every KVM host. Peers authenticate each other with
certificates from one 'ftctl cert init' (or with a pre-shared key file).

Failure handling: a replication link silent for --peer-timeout is dead. The
primary then runs on alone (degraded). With --mgmt-listen on both agents,
they also exchange authenticated UDP heartbeats over a second network (key:
--mgmt-key-file, or derived from --psk-file); if the peer's agent still
answers there after the replication link ended, only the link failed and the
secondary does not promote, without probing the LAN. A primary that notices
the end of the link only after the secondary's LAN probe may have given up
(the secondary's timeout plus its probe window) releases nothing: it pauses
the VM and shows it fenced (ftctl resume VM, or ftctl stop VM if the peer
took over). A degraded primary
pairs with its last peer again by itself (--auto-repair), 1 s after the
loss and then backing off to --repair-max; ftctl status shows the next try.

The primary polls each VM's QEMU over QMP; one silent for --qmp-timeout is
hung: shown in status, and, while the VM is protected, killed, and the
secondary is told to take over at once (as when QEMU exits by itself). The secondary asks its arbiter: with
--arbiter probe it checks whether the VM still answers on the LAN (ARP on
--probe-interface, ICMP, TCP to the VM's --probe-port services); an answer
means only the link broke, so it does not promote. With --arbiter none it
never promotes on its own (planned failovers still work).

Shims (on by default): each VM this host runs, started with ftctl vm run or
adopted from libvirt, lives in a process of its own (ftctl shim, log in
RUN-DIR/vms/VM.shim.log) that owns its disk export, output buffer and
replication link (and its QEMU, unless libvirt runs it); so does each replica
kept for a peer (its standby QEMU or standby libvirt domain, replica RAM and
disk, and its own replication listener on the --listen host with a port the
system picks, or one of --shim-ports: the agent redirects the primary there).
Why: the disk and NIC of a running VM are served by the process that owns
them, so with everything inside the agent, an agent restart or crash would
cut a running guest's disk and end its protection. With shims, restarting
the agent, even with kill -9, neither stops a VM nor interrupts its
protection, on either host, and the restarted agent finds its shims again
from the VM records in --state-dir. Keep KillMode=process in a systemd unit,
so that stopping the agent leaves the shims alone.

--shims=false (or FTCTL_SHIMS=false) runs every VM and replica inside the
agent process, as before: fewer processes, but an agent restart stops the
VMs' protection and cuts their devices; a restarted agent then lists the
libvirt domains it served as lost, to be restarted through libvirt.`,
		Flags:  agentFlags(),
		Action: runAgent,
	}
}

// shimCommand is the hidden `ftctl shim`: the process that owns one VM,
// or one replica, for the agent (pkg/agent, shim.go). The agent starts it
// with its own flags, --vm and --role.
func shimCommand() *cli.Command {
	return &cli.Command{
		Name:   "shim",
		Usage:  "run one VM for the agent (started by ftctl agent)",
		Hidden: true,
		Flags: append(agentFlags(),
			&cli.StringFlag{Name: "vm", Required: true, Usage: "the VM this shim runs"},
			&cli.StringFlag{Name: "role", Value: string(agent.RolePrimary), Usage: "primary (run the VM) or secondary (keep its replica for a peer)"}),
		Action: func(ctx context.Context, cmd *cli.Command) error {
			cfg, err := agentConfig(cmd)
			if err != nil {
				return err
			}
			return agent.RunShim(ctx, cfg, cmd.String("vm"), agent.Role(cmd.String("role")))
		},
	}
}

func agentFlags() []cli.Flag {
	return []cli.Flag{
		socketFlag(),
		&cli.StringFlag{Name: "name", Usage: "this host's name (default: hostname)"},
		&cli.StringFlag{Name: "state-dir", Value: "/var/lib/ftctl", Usage: "state that survives restarts"},
		&cli.StringFlag{Name: "run-dir", Value: "/run/ftctl", Usage: "sockets and per-run files"},
		&cli.StringFlag{Name: "ram-dir", Usage: "guest and replica RAM files (default /dev/shm)"},
		&cli.StringFlag{Name: "listen", Usage: "accept replication links on `HOST:PORT` (port " + agent.DefaultPeerPort + " by convention)"},
		&cli.StringFlag{Name: "ca", Usage: "pair CA certificate (from ftctl cert init)"},
		&cli.StringFlag{Name: "cert", Usage: "this host's certificate (from ftctl cert issue)"},
		&cli.StringFlag{Name: "key", Usage: "this host's private key"},
		&cli.StringFlag{Name: "psk-file", Usage: "pre-shared key file instead of certificates (ftctl cert psk)"},
		&cli.StringFlag{Name: "bridge", Usage: "bridge the VMs' taps join"},
		&cli.DurationFlag{Name: "peer-timeout", Value: time.Second, Usage: "a replication link silent this long is dead; also the management path's timeout"},
		&cli.DurationFlag{Name: "qmp-timeout", Value: agent.DefaultQMPTimeout, Usage: "a primary QEMU not answering QMP this long is hung (killed while protected, so the secondary takes over)"},
		&cli.StringFlag{Name: "mgmt-listen", Usage: "answer management heartbeats (UDP) on `HOST:PORT`, this host's address on a network other than the replication link's"},
		&cli.StringFlag{Name: "mgmt-key-file", Usage: "key `FILE` for management heartbeats (ftctl cert psk); default: derived from --psk-file"},
		&cli.StringFlag{Name: "policy", Value: "io", Usage: "checkpoint trigger: io (on guest output) or periodic"},
		&cli.DurationFlag{Name: "min-interval", Value: lockstep.DefaultMinInterval, Usage: "io policy: least time between checkpoints"},
		&cli.DurationFlag{Name: "max-interval", Value: lockstep.DefaultMaxInterval, Usage: "io policy: most time between checkpoints"},
		&cli.DurationFlag{Name: "period", Value: lockstep.DefaultPeriod, Usage: "periodic policy: time between checkpoints"},
		&cli.StringFlag{Name: "tracker", Value: "auto", Usage: "dirty-page tracker: auto, soft-dirty or shadow"},
		&cli.StringFlag{Name: "arbiter", Value: "probe", Usage: "who decides a failover: probe or none"},
		&cli.StringFlag{Name: "probe-interface", Usage: "LAN interface for ARP probes (default: --bridge)"},
		&cli.BoolFlag{Name: "promote-on-silence", Value: true, Usage: "probe arbiter: promote when the VM does not answer on the LAN (default false with --witness: the witness decides then)"},
		&cli.BoolFlag{Name: "auto-repair", Value: true, Usage: "a degraded VM pairs with its last peer again by itself (after 1 s, backing off to --repair-max)"},
		&cli.DurationFlag{Name: "repair-max", Value: 30 * time.Second, Usage: "longest wait between two automatic re-pairing attempts"},
		&cli.StringFlag{Name: "witness", Usage: "`HOST:PORT` of an ftctl witness: primaries hold each paired VM's lease there (and fence the VM when they cannot), secondaries ask it when the LAN probe cannot decide"},
		&cli.StringFlag{Name: "witness-key-file", Usage: "key `FILE` shared with the witness (ftctl cert psk)"},
		&cli.DurationFlag{Name: "witness-wait", Value: agent.DefaultWitnessWait, Usage: "how long a secondary keeps asking the witness while the primary holds the lease"},
		&cli.StringFlag{Name: "libvirt", Usage: "this host's libvirtd (`URI` or socket path, as for ftctl libvirt --connect): standbys of peers' libvirt domains become libvirt domains here"},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
		&cli.StringFlag{Name: "shim-ports", Usage: "with --shims, the `LOW-HIGH` ports replica shims listen on (on the --listen host; default: any free port), for a firewall that must name them"},
		&cli.BoolFlag{Name: "shims", Value: true, Sources: cli.EnvVars("FTCTL_SHIMS"), Usage: "run each VM, libvirt domain and replica kept for a peer in a process of its own (ftctl shim, log in RUN-DIR/vms/VM.shim.log) that outlives an agent restart, so restarting the agent neither stops a guest nor its protection; --shims=false keeps them all inside the agent"},
	}
}

func agentConfig(cmd *cli.Command) (agent.Config, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(cmd.String("log-level"))); err != nil {
		return agent.Config{}, cli.Exit(fmt.Sprintf("--log-level: %v", err), 2)
	}
	cfg := agent.Config{
		Name: cmd.String("name"), StateDir: cmd.String("state-dir"), RunDir: cmd.String("run-dir"),
		RAMDir: cmd.String("ram-dir"), ControlSocket: cmd.String("socket"), PeerAddr: cmd.String("listen"), Libvirt: cmd.String("libvirt"),
		Bridge: cmd.String("bridge"), PeerTimeout: cmd.Duration("peer-timeout"), QMPTimeout: cmd.Duration("qmp-timeout"),
		NoRepair: !cmd.Bool("auto-repair"), RepairMax: cmd.Duration("repair-max"),
		Policy: lockstep.Policy{Mode: lockstep.Mode(cmd.String("policy")), MinInterval: cmd.Duration("min-interval"),
			MaxInterval: cmd.Duration("max-interval"), Period: cmd.Duration("period")},
		Logger: slog.New(slog.NewTextHandler(cmd.Root().ErrWriter, &slog.HandlerOptions{Level: lvl})),
	}
	if err := cfg.Policy.WithDefaults().Validate(); err != nil {
		return cfg, cli.Exit(err.Error(), 2)
	}
	if v := cmd.String("shim-ports"); v != "" {
		r, err := agent.ParsePortRange(v)
		if err != nil {
			return cfg, cli.Exit("--shim-ports: "+err.Error(), 2)
		}
		cfg.ShimPorts = r
	}
	kind, err := memsync.ParseKind(cmd.String("tracker"))
	if err != nil {
		return cfg, cli.Exit("--tracker: "+err.Error(), 2)
	}
	cfg.Tracker = kind
	switch {
	case cmd.String("psk-file") != "":
		key, err := wire.ReadPSKFile(cmd.String("psk-file"))
		if err != nil {
			return cfg, err
		}
		name := cfg.Name
		if name == "" {
			name, _ = os.Hostname()
		}
		if cfg.Credentials, err = wire.CredentialsFromPSK(name, key); err != nil {
			return cfg, err
		}
	case cmd.String("ca") != "" || cmd.String("cert") != "" || cmd.String("key") != "":
		if cfg.Credentials, err = wire.CredentialsFromFiles(cmd.String("ca"), cmd.String("cert"), cmd.String("key")); err != nil {
			return cfg, fmt.Errorf("credentials: %w (all of --ca, --cert and --key are needed)", err)
		}
	}
	if addr := cmd.String("mgmt-listen"); addr != "" {
		cfg.MgmtAddr = addr
		switch {
		case cmd.String("mgmt-key-file") != "":
			if cfg.MgmtKey, err = wire.ReadPSKFile(cmd.String("mgmt-key-file")); err != nil {
				return cfg, fmt.Errorf("--mgmt-key-file: %w", err)
			}
		case cmd.String("psk-file") != "":
			key, err := wire.ReadPSKFile(cmd.String("psk-file"))
			if err != nil {
				return cfg, err
			}
			cfg.MgmtKey = agent.MgmtKeyFromPSK(key)
		default:
			return cfg, cli.Exit("--mgmt-listen needs --mgmt-key-file (ftctl cert psk FILE, the same file on both hosts) or --psk-file", 2)
		}
	}
	var witness failover.Arbiter
	if addr := cmd.String("witness"); addr != "" {
		if cmd.String("witness-key-file") == "" {
			return cfg, cli.Exit("--witness needs --witness-key-file (the key file the witness was started with)", 2)
		}
		key, err := wire.ReadPSKFile(cmd.String("witness-key-file"))
		if err != nil {
			return cfg, fmt.Errorf("--witness-key-file: %w", err)
		}
		name := cfg.Name
		if name == "" {
			name, _ = os.Hostname()
		}
		wc, err := failover.NewWitnessClient(failover.WitnessClientConfig{Addr: addr, Key: key, Node: name})
		if err != nil {
			return cfg, cli.Exit(fmt.Sprintf("--witness: %v", err), 2)
		}
		cfg.Witness, witness = wc, failover.WitnessArbiter{Lease: wc}
	}
	switch cmd.String("arbiter") {
	case "none":
	case "probe":
		iface := cmd.String("probe-interface")
		if iface == "" {
			iface = cfg.Bridge
		}
		silence := cmd.Bool("promote-on-silence")
		if witness != nil && !cmd.IsSet("promote-on-silence") {
			// Silence may be this host's own LAN port failing: with a
			// witness there is someone better placed to decide.
			silence = false
		}
		cfg.Arbiter = agent.ProbeArbiter{Interface: iface, SilenceMeansDead: silence, Witness: witness, WitnessWait: cmd.Duration("witness-wait")}
	default:
		return cfg, cli.Exit(fmt.Sprintf("--arbiter %q: want probe or none", cmd.String("arbiter")), 2)
	}
	return cfg, nil
}

func runAgent(ctx context.Context, cmd *cli.Command) error {
	if os.Geteuid() != 0 {
		return cli.Exit("ftctl agent must run as root (it creates taps and maps guest memory)", 1)
	}
	cfg, err := agentConfig(cmd)
	if err != nil {
		return err
	}
	if cmd.Bool("shims") {
		if cfg.ShimCommand, err = shimArgs(cmd); err != nil {
			return err
		}
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

func witnessCommand() *cli.Command {
	return &cli.Command{
		Name:  "witness",
		Usage: "run a witness: the third party that grants each protected VM's lease to one host",
		Description: `Run it on a third host that both agents reach over a network other than
the replication link (the management network). The primary of each paired
VM renews the VM's lease every 200 ms and fences the VM (kills its QEMU)
when it cannot; a secondary that lost its primary and cannot tell from the
LAN whether the VM runs promotes only once the witness grants it the lease.
Agents use it with --witness HOST:PORT --witness-key-file FILE, the same
key file (ftctl cert psk FILE) as the witness. Leases live in memory: a
restarted witness grants only renewals for one lease TTL.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Required: true, Usage: "`HOST:PORT` to serve on (TCP)"},
			&cli.StringFlag{Name: "key-file", Required: true, Usage: "key `FILE` shared with the agents (ftctl cert psk)"},
			&cli.DurationFlag{Name: "lease-ttl", Value: failover.DefaultLeaseTTL, Usage: "how long a lease lasts without renewal"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			key, err := wire.ReadPSKFile(cmd.String("key-file"))
			if err != nil {
				return fmt.Errorf("--key-file: %w", err)
			}
			w, err := failover.ListenWitness(ctx, cmd.String("listen"), failover.WitnessConfig{Key: key, LeaseTTL: cmd.Duration("lease-ttl")})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.Root().ErrWriter, "ftctl witness serving on %s (lease TTL %v)\n", w.Addr(), cmd.Duration("lease-ttl"))
			return w.Serve(ctx)
		},
	}
}

func vmOpsCommands() []*cli.Command {
	return []*cli.Command{
		witnessCommand(),
		{
			Name:      "start",
			Usage:     "ask the local agent to run a VM from a spec file",
			ArgsUsage: " ",
			Description: `The agent serves the VM's raw disk images over NBD (so it sees every
write) and connects its NICs through its output buffer. Leave the NICs'
backends empty in the spec; give the VM's LAN address with --probe-addr
so a secondary can check, before taking over, whether the VM still answers.`,
			Flags: []cli.Flag{socketFlag(),
				&cli.StringFlag{Name: "spec", Required: true, Usage: "JSON VM spec `FILE`"},
				&cli.StringSliceFlag{Name: "probe-addr", Usage: "the VM's LAN address (repeatable)"},
				&cli.IntSliceFlag{Name: "probe-port", Usage: "a TCP service of the VM (repeatable)"},
			},
			Action: func(ctx context.Context, cmd *cli.Command) error {
				spec, err := vm.LoadSpec(cmd.String("spec"))
				if err != nil {
					return err
				}
				st, err := client(cmd).Start(ctx, agent.StartRequest{Spec: spec,
					Probe: agent.ProbeSpec{Addrs: cmd.StringSlice("probe-addr"), TCPPorts: cmd.IntSlice("probe-port")}})
				if err != nil {
					return explain(err)
				}
				fmt.Fprintf(cmd.Root().Writer, "%s started (pid %d, %s), %s\n", st.Name, st.PID, st.Accel, st.State)
				return nil
			},
		},
		{
			Name:      "pair",
			Usage:     "protect a VM with the agent on another host",
			ArgsUsage: "VM HOST[:PORT]",
			Description: `Copies the VM's memory and disk to HOST while it runs (progress in
ftctl status), then checkpoints it continuously; its network output waits
for each checkpoint to be safe on HOST. The port defaults to ` + agent.DefaultPeerPort + `.`,
			Flags: []cli.Flag{socketFlag(), &cli.BoolFlag{Name: "wait", Usage: "wait until the VM is protected, showing progress"}},
			Action: func(ctx context.Context, cmd *cli.Command) error {
				if cmd.Args().Len() != 2 {
					return cli.Exit("usage: ftctl pair VM HOST[:PORT]", 2)
				}
				name, peer := cmd.Args().Get(0), cmd.Args().Get(1)
				st, err := client(cmd).Pair(ctx, name, peer)
				if err != nil {
					return explain(err)
				}
				fmt.Fprintf(cmd.Root().Writer, "%s: %s with %s\n", st.Name, st.State, peer)
				if !cmd.Bool("wait") {
					return nil
				}
				return waitProtected(ctx, cmd, name)
			},
		},
		{
			Name:      "status",
			Usage:     "show the VMs of the local agent and their protection",
			ArgsUsage: "[VM]",
			Flags:     []cli.Flag{socketFlag(), &cli.BoolFlag{Name: "json", Usage: "machine-readable output"}},
			Action: func(ctx context.Context, cmd *cli.Command) error {
				c := client(cmd)
				var list []agent.VMStatus
				if name := cmd.Args().First(); name != "" {
					s, err := c.Get(ctx, name)
					if err != nil {
						return explain(err)
					}
					list = []agent.VMStatus{s}
				} else {
					var err error
					if list, err = c.List(ctx); err != nil {
						return explain(err)
					}
				}
				if cmd.Bool("json") {
					enc := json.NewEncoder(cmd.Root().Writer)
					enc.SetIndent("", "  ")
					return enc.Encode(list)
				}
				printStatus(cmd.Root().Writer, list)
				return nil
			},
		},
		{
			Name:      "failover",
			Usage:     "move a protected VM to its secondary now, with zero loss (planned switchover)",
			ArgsUsage: "VM",
			Flags:     []cli.Flag{socketFlag()},
			Action: func(ctx context.Context, cmd *cli.Command) error {
				if cmd.Args().Len() != 1 {
					return cli.Exit("usage: ftctl failover VM", 2)
				}
				r, err := client(cmd).Failover(ctx, cmd.Args().First())
				if err != nil {
					return explain(err)
				}
				fmt.Fprintf(cmd.Root().Writer, "%s now runs on its former secondary (from checkpoint %d)\n", cmd.Args().First(), r.Epoch)
				return nil
			},
		},
		{
			Name:      "unpair",
			Usage:     "stop protecting a VM (it keeps running here)",
			ArgsUsage: "VM",
			Flags:     []cli.Flag{socketFlag()},
			Action: func(ctx context.Context, cmd *cli.Command) error {
				if cmd.Args().Len() != 1 {
					return cli.Exit("usage: ftctl unpair VM", 2)
				}
				return explain(client(cmd).Unpair(ctx, cmd.Args().First()))
			},
		},
		{
			Name:      "resume",
			Usage:     "let a fenced VM run on here, alone",
			ArgsUsage: "VM",
			Description: `A primary that noticed its secondary's loss too late to be sure the
secondary had not taken over (its LAN probe may have found the VM silent
while this host still held the VM's output) pauses the VM and shows it as
fenced. Check the peer: if it runs the VM, 'ftctl stop VM' here; if it did
not take over, 'ftctl resume VM' lets the VM go on here (degraded, pairing
again with the peer when it can).`,
			Flags: []cli.Flag{socketFlag()},
			Action: func(ctx context.Context, cmd *cli.Command) error {
				if cmd.Args().Len() != 1 {
					return cli.Exit("usage: ftctl resume VM", 2)
				}
				return explain(client(cmd).Resume(ctx, cmd.Args().First()))
			},
		},
		{
			Name:      "stop",
			Usage:     "shut down a VM run by the local agent",
			ArgsUsage: "VM",
			Flags:     []cli.Flag{socketFlag()},
			Action: func(ctx context.Context, cmd *cli.Command) error {
				if cmd.Args().Len() != 1 {
					return cli.Exit("usage: ftctl stop VM", 2)
				}
				return explain(client(cmd).Stop(ctx, cmd.Args().First()))
			},
		},
	}
}

func waitProtected(ctx context.Context, cmd *cli.Command, name string) error {
	c := client(cmd)
	w := cmd.Root().ErrWriter
	for {
		s, err := c.Get(ctx, name)
		if err != nil {
			return explain(err)
		}
		switch s.State {
		case agent.StateProtected:
			fmt.Fprintf(w, "\r%s: protected (checkpoint %d)%s\n", name, s.Epoch, strings.Repeat(" ", 30))
			return nil
		case agent.StateDegraded, agent.StateStopped, agent.StateUnprotected, agent.StateFenced:
			return fmt.Errorf("%s is %s: %s", name, s.State, s.Reason)
		}
		if s.Sync != nil {
			fmt.Fprintf(w, "\r%s: syncing %s", name, progressLine(s.Sync))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func progressLine(p *agent.SyncProgress) string {
	total := p.MemoryTotal + p.DiskTotal
	done := min(p.MemoryBytes, p.MemoryTotal) + p.DiskDone
	pct := 0.0
	if total > 0 {
		pct = 100 * float64(done) / float64(total)
	}
	bar := int(pct / 5)
	return fmt.Sprintf("[%s%s] %5.1f%% %.1f MiB/s", strings.Repeat("#", bar), strings.Repeat(".", 20-bar), pct, p.Rate/(1<<20))
}

func printStatus(w io.Writer, list []agent.VMStatus) {
	if len(list) == 0 {
		fmt.Fprintln(w, "no VMs")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tROLE\tSTATE\tPEER\tEPOCH\tEPOCHS/S\tPAUSE p50/p99\tLAG\tMB/S\tNOTE")
	for _, s := range list {
		note := s.Reason
		if s.Sync != nil {
			note = "sync " + progressLine(s.Sync)
		}
		if s.Error != "" {
			note = s.Error
		}
		if r := s.Repair; r != nil {
			next := "now"
			if d := time.Until(r.Next); d > 0 {
				next = "in " + d.Round(100*time.Millisecond).String()
			}
			note += fmt.Sprintf("; re-pairing with %s %s (attempt %d", r.Peer, next, r.Attempts+1)
			if r.LastError != "" {
				note += "; last: " + r.LastError
			}
			note += ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%.1f\t%v/%v\t%v\t%.2f\t%s\n", s.Name, s.Role, s.State, s.Peer, s.Epoch, s.EpochRate,
			s.PauseP50.Round(100*time.Microsecond), s.PauseP99.Round(100*time.Microsecond), s.Lag.Round(100*time.Microsecond),
			s.BytesPerSecond/1e6, note)
	}
	tw.Flush()
}

func certCommand() *cli.Command {
	return &cli.Command{
		Name:  "cert",
		Usage: "make credentials for replication links",
		Description: `Both agents of a pair must trust each other. Either:
  ftctl cert init --dir DIR                 # once: a CA for your hosts
  ftctl cert issue --dir DIR host-a --host 10.0.0.1
  ftctl cert issue --dir DIR host-b --host 10.0.0.2
then copy DIR/ca.pem and each host's NAME.pem / NAME-key.pem to it and start
  ftctl agent --ca ca.pem --cert NAME.pem --key NAME-key.pem --listen :7480
or, simpler: ftctl cert psk FILE, copy FILE (mode 0600) to both hosts and use
--psk-file FILE.`,
		Commands: []*cli.Command{
			{
				Name:  "init",
				Usage: "create a CA for a set of hosts",
				Flags: []cli.Flag{&cli.StringFlag{Name: "dir", Required: true}, &cli.StringFlag{Name: "name", Value: "ftctl"}},
				Action: func(ctx context.Context, cmd *cli.Command) error {
					dir := cmd.String("dir")
					if _, err := os.Stat(filepath.Join(dir, "ca.pem")); err == nil {
						return cli.Exit(fmt.Sprintf("%s already holds a CA; refusing to overwrite it", dir), 1)
					}
					if err := os.MkdirAll(dir, 0o700); err != nil {
						return err
					}
					ca, err := wire.NewCA(cmd.String("name"))
					if err != nil {
						return err
					}
					if err := ca.Save(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")); err != nil {
						return err
					}
					fmt.Fprintf(cmd.Root().Writer, "CA written to %s (keep ca-key.pem private)\n", dir)
					return nil
				},
			},
			{
				Name:      "issue",
				Usage:     "issue a host certificate",
				ArgsUsage: "NAME",
				Flags:     []cli.Flag{&cli.StringFlag{Name: "dir", Required: true}, &cli.StringSliceFlag{Name: "host", Usage: "address or DNS name of the host (repeatable)"}},
				Action: func(ctx context.Context, cmd *cli.Command) error {
					name := cmd.Args().First()
					if name == "" || cmd.Args().Len() != 1 {
						return cli.Exit("usage: ftctl cert issue --dir DIR NAME [--host ADDR]", 2)
					}
					dir := cmd.String("dir")
					ca, err := wire.LoadCAFiles(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem"))
					if err != nil {
						return fmt.Errorf("%w (run ftctl cert init --dir %s first)", err, dir)
					}
					cert, key, err := ca.Issue(name, cmd.StringSlice("host"))
					if err != nil {
						return err
					}
					if err := wire.SaveKeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem"), cert, key); err != nil {
						return err
					}
					fmt.Fprintf(cmd.Root().Writer, "%s.pem and %s-key.pem written to %s\n", name, name, dir)
					return nil
				},
			},
			{
				Name:      "psk",
				Usage:     "write a new pre-shared key file (mode 0600)",
				ArgsUsage: "FILE",
				Action: func(ctx context.Context, cmd *cli.Command) error {
					if cmd.Args().Len() != 1 {
						return cli.Exit("usage: ftctl cert psk FILE", 2)
					}
					key, err := wire.NewPSK()
					if err != nil {
						return err
					}
					return wire.WritePSKFile(cmd.Args().First(), key)
				},
			},
		},
	}
}

// shimArgs is the command line that starts a shim: this binary, `shim`,
// and every flag the agent was given, so the shim has the agent's
// configuration (credentials, directories, witness, timeouts).
func shimArgs(cmd *cli.Command) ([]string, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("shims: find this binary: %w", err)
	}
	args := []string{exe, "shim"}
	for _, name := range cmd.FlagNames() {
		if name == "shims" || !cmd.IsSet(name) {
			continue
		}
		args = append(args, fmt.Sprintf("--%s=%v", name, cmd.Value(name)))
	}
	return args, nil
}
