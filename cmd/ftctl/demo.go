package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/checker"
	"github.com/ftctl/ftctl/pkg/checkpoint"
	"github.com/ftctl/ftctl/pkg/cluster"
	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/vm"
)

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "protect the built-in guest on two hosts (namespaces), kill the primary, show that nothing acknowledged is lost",
		Description: `Runs the whole product on this one machine (as root):

  1. makes two KVM hosts and a client as network namespaces, and runs an
     'ftctl agent' (this binary) on each host;
  2. boots the built-in guest on host A: a counter on its serial console, a
     disk writer whose records chain checksums, and a TCP service whose
     replies carry a sequence number and a checksum of everything the
     client sent;
  3. pairs it with host B (initial copy of RAM and disk while it runs) and
     runs a client checker in the client namespace: one long-lived TCP
     connection and short ones, every reply verified;
  4. isolates host A from every network and SIGKILLs its agent and QEMU;
  5. waits for B to promote its standby, then checks that the client's
     long-lived connection survived and no acknowledged request is missing,
     that the counter went on from a value A had reached, and that the disk
     chain is unbroken;
  6. prints a report and removes everything it made (also on Ctrl-C).

It exits non-zero if any check fails. --local runs the older single-host
demonstration instead: checkpoints of a plain QEMU, SIGKILL, restore.`,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "local", Usage: "single-host checkpoint/kill/restore demo instead (no agents, no namespaces)"},
			&cli.DurationFlag{Name: "run", Value: 5 * time.Second, Usage: "how long the VM runs protected before the kill"},
			&cli.IntFlag{Name: "memory", Value: 128, Usage: "guest memory in `MiB`"},
			&cli.StringFlag{Name: "accel", Value: vm.AccelAuto, Usage: "auto, kvm or tcg"},
			&cli.StringSliceFlag{Name: "agent-arg", Usage: "extra flag for both agents, e.g. --agent-arg=--policy=periodic (repeatable)"},
			&cli.BoolFlag{Name: "keep", Usage: "keep the work directory (agent logs, serial logs, disks)"},
			&cli.BoolFlag{Name: "verbose", Usage: "log the test bed's steps"},
			// --local only
			&cli.IntFlag{Name: "checkpoints", Value: 3, Usage: "--local: checkpoints to take before the kill"},
			&cli.StringFlag{Name: "kernel", Usage: "--local: guest kernel (default: the built-in guest, built if needed)"},
			&cli.StringFlag{Name: "initrd", Usage: "--local: guest initramfs (with --kernel)"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if cmd.Bool("local") {
				return runLocalDemo(ctx, cmd)
			}
			return interrupted(ctx, runDemo(ctx, cmd))
		},
	}
}

// interrupted says plainly that a run ended on Ctrl-C (its cleanup has
// run by then) instead of "context canceled".
func interrupted(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return cli.Exit("interrupted; everything the run made was removed", 130)
	}
	return err
}

// demoChecks prints checks and collects the failed ones; the demo goes on to report them all.
type demoChecks struct {
	p      *demoPrinter
	failed []string
}

func (d *demoChecks) pass(name, format string, a ...any) {
	fmt.Fprintf(d.p.w, "    %-34s PASS  %s\n", name+":", fmt.Sprintf(format, a...))
}

func (d *demoChecks) fail(name string, err error) {
	d.failed = append(d.failed, name)
	fmt.Fprintf(d.p.w, "    %-34s FAIL  %v\n", name+":", err)
}

// newDemoCluster sets up what the two-host demo and bench need: the guest image,
// a cluster of two agents re-executing this binary, and a cleanup that
// survives Ctrl-C.
func newDemoCluster(ctx context.Context, p *demoPrinter, cmd *cli.Command, prefix string) (*cluster.Cluster, guestimage.Image, error) {
	if os.Geteuid() != 0 {
		return nil, guestimage.Image{}, cli.Exit("ftctl "+cmd.Name+" makes network namespaces and runs agents: run it as root", 1)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, guestimage.Image{}, fmt.Errorf("find this binary to run the agents: %w", err)
	}
	p.stepf("building the built-in guest (cached after the first run)")
	img, err := guestimage.Default(ctx)
	if err != nil {
		return nil, img, fmt.Errorf("built-in guest: %w", err)
	}
	var log *slog.Logger
	if cmd.Bool("verbose") {
		log = slog.New(slog.NewTextHandler(cmd.Root().ErrWriter, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	p.stepf("creating hosts A and B and a client as network namespaces, starting an agent on each host")
	c, err := cluster.New(ctx, cluster.Options{Binary: exe, Prefix: prefix, Keep: cmd.Bool("keep"),
		AgentArgs: cmd.StringSlice("agent-arg"), Logger: log})
	if err != nil {
		return nil, img, err
	}
	p.infof("LAN %s, replication %s; host A %s, host B %s, client %s; work directory %s",
		c.Bed.LANNet, c.Bed.ReplNet, c.Bed.A.ReplAddr, c.Bed.B.ReplAddr, c.Bed.Client.LANAddr, c.Root)
	return c, img, nil
}

// closeDemoCluster removes everything; it runs on Ctrl-C too, since the
// agents are in their own process group and ctx is not used.
func closeDemoCluster(p *demoPrinter, c *cluster.Cluster, keep bool) {
	p.stepf("removing the hosts, agents and VMs")
	if err := c.Close(); err != nil {
		p.infof("cleanup: %v", err)
	}
	if keep {
		p.infof("kept %s", c.Root)
	}
}

// pairWithProgress pairs the VM with to and prints the initial sync's
// progress.
func pairWithProgress(ctx context.Context, p *demoPrinter, v *cluster.VM, to *cluster.Agent) error {
	t0 := time.Now()
	if err := v.StartPair(ctx, to); err != nil {
		return err
	}
	last := time.Time{}
	for {
		st, err := v.Status(ctx)
		if err != nil {
			return err
		}
		switch st.State {
		case agent.StateProtected:
			p.infof("protected after %v: checkpoint %d committed on %s", time.Since(t0).Round(time.Millisecond), st.Epoch, to.Name)
			_, err := to.WaitState(ctx, v.Name, agent.StateStandby, 30*time.Second)
			return err
		case agent.StateDegraded, agent.StateStopped, agent.StateUnprotected, agent.StateFenced:
			return fmt.Errorf("pairing failed: %s is %s: %s", v.Name, st.State, st.Reason)
		}
		if st.Sync != nil && time.Since(last) > time.Second {
			p.infof("initial sync %s", progressLine(st.Sync))
			last = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func runDemo(ctx context.Context, cmd *cli.Command) (err error) {
	p := &demoPrinter{w: cmd.Root().Writer}
	c, img, err := newDemoCluster(ctx, p, cmd, "ftdemo")
	if err != nil {
		return err
	}
	defer closeDemoCluster(p, c, cmd.Bool("keep"))

	p.stepf("booting the built-in guest on host A (counter, disk and tcp workloads)")
	t0 := time.Now()
	v, err := c.StartVM(ctx, c.A, cluster.GuestOptions{Image: img, MemoryMiB: cmd.Int("memory"), Accel: cmd.String("accel")})
	if err != nil {
		return err
	}
	st, _ := v.Status(ctx)
	p.infof("VM %s at %s runs on host A (QEMU pid %d, accel %s), TCP service up after %v", v.Name, v.Addr, st.PID, st.Accel, time.Since(t0).Round(time.Millisecond))

	p.stepf("starting the client checker in the client namespace (1 long-lived connection, 2 workers of short ones)")
	chk, err := v.NewChecker(checker.Config{Interval: 20 * time.Millisecond, Timeout: 10 * time.Second, ShortConns: 2})
	if err != nil {
		return err
	}
	cctx, ccancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- chk.Run(cctx) }()
	defer func() { ccancel(); <-done }()

	p.stepf("pairing: host A protects the VM on host B")
	if err := pairWithProgress(ctx, p, v, c.B); err != nil {
		return err
	}
	p.stepf("running protected for %v", cmd.Duration("run"))
	end := time.Now().Add(cmd.Duration("run"))
	for time.Now().Before(end) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(min(time.Second, time.Until(end))):
		}
		if st, err = v.Status(ctx); err != nil {
			return err
		}
		r := chk.Snapshot()
		p.infof("%s: checkpoint %d, %.1f/s, pause p50 %v p99 %v, %.2f MB/s; client: %d requests acknowledged",
			st.State, st.Epoch, st.EpochRate, ms(st.PauseP50), ms(st.PauseP99), st.BytesPerSecond/1e6, r.Acked)
	}
	if err := chk.Snapshot().Err(); err != nil {
		return fmt.Errorf("the checker saw a violation before the kill: %w", err)
	}
	if st, err = v.Status(ctx); err != nil {
		return err
	}
	if st.State != agent.StateProtected {
		return fmt.Errorf("before the kill the VM is %s, not protected: %s", st.State, st.Reason)
	}

	p.stepf("host A dies: isolated from every network, its agent and QEMU (pid %d) SIGKILLed", st.PID)
	kd, err := v.KillPrimary(ctx, cluster.KillBoth, true, st)
	if err != nil {
		return err
	}
	p.infof("A had checkpoint %d acknowledged; its counter had reached %d", st.Epoch, counterlog.Last(kd.Serial))

	p.stepf("waiting for host B to notice and promote its standby")
	prom, err := v.AwaitPromotion(ctx, c.B, time.Minute)
	if err != nil {
		return err
	}
	decided := prom.Status.Since.Add(-prom.Duration)
	p.infof("B: %s", prom.Status.Reason)

	p.stepf("checking")
	ck := &demoChecks{p: p}
	vctx, vcancel := context.WithTimeout(ctx, time.Minute)
	fo, verr := chk.Verify(vctx, kd.At)
	vcancel()
	if verr != nil {
		ck.fail("client across the failover", verr)
	} else {
		ck.pass("client across the failover", "long-lived connection %s kept (no reset); request %d (seq %d) acknowledged after the kill; %d requests in flight at the kill answered",
			fo.Conn, fo.FirstAckAfter.Index, fo.FirstAckAfter.Seq, fo.InFlight)
	}
	if prom.Epoch < st.Epoch {
		ck.fail("resumed epoch", fmt.Errorf("B resumed epoch %d, but A had %d acknowledged", prom.Epoch, st.Epoch))
	} else {
		ck.pass("resumed epoch", "B resumed epoch %d (A had %d acknowledged)", prom.Epoch, st.Epoch)
	}
	target := counterlog.Last(kd.Serial) + 5
	after, werr := v.WaitSerial(ctx, time.Minute, "counter lines", func(b []byte) bool { return counterlog.Last(b) >= target })
	if werr == nil {
		var rep uint64
		if rep, werr = cluster.CheckResumedCounter(kd.Serial, after); werr == nil {
			ck.pass("counter continuity", "A printed up to %d; B resumed at %d and counts on by one (%d printed again: after A's last commit)",
				counterlog.Last(kd.Serial), counterlog.Values(after)[0], rep)
		}
	}
	if werr != nil {
		ck.fail("counter continuity", werr)
	}
	if dr, derr := v.VerifyDisk(ctx); derr != nil {
		ck.fail("disk chain", derr)
	} else {
		ck.pass("disk chain", "%d records chained without a break from seq %d to %d, across the failover (guest reported %d)",
			dr.Records, dr.FirstSeq, dr.LastSeq, dr.Reported)
	}
	ccancel()
	runErr := <-done
	done <- runErr // for the deferred wait
	final := chk.Snapshot()
	if runErr != nil {
		ck.fail("client checker", runErr)
	} else {
		ck.pass("client checker", "%d requests acknowledged, every reply verified, %d short connections", final.Acked, final.ShortDone)
	}

	fmt.Fprintf(p.w, "\nftctl demo report (accel %s, %d MiB guest)\n", st.Accel, v.Spec.MemoryMiB)
	row := func(k, format string, a ...any) { fmt.Fprintf(p.w, "  %-36s %s\n", k, fmt.Sprintf(format, a...)) }
	row("downtime seen by the client", "%v (longest stretch without a verified reply)", ms(fo.Downtime))
	row("detection (kill → B decides)", "%v (peer timeout 1s, then a LAN probe)", ms(decided.Sub(kd.At)))
	row("promotion (decision → running)", "%v", ms(prom.Duration))
	row("epochs committed before the kill", "%d", st.Epoch)
	row("checkpoint pause p50 / p99", "%v / %v", ms(st.PauseP50), ms(st.PauseP99))
	row("bytes replicated", "%.1f MB (initial sync and checkpoints)", float64(st.WireBytes)/1e6)
	row("requests acknowledged", "%d", final.Acked)
	row("acknowledged requests lost", "%d", final.AckedLost)
	if len(ck.failed) > 0 {
		fmt.Fprintf(p.w, "  RESULT: FAIL (%s)\n", strings.Join(ck.failed, ", "))
		return cli.Exit("demo: checks failed: "+strings.Join(ck.failed, ", "), 1)
	}
	fmt.Fprintf(p.w, "  RESULT: PASS: the VM survived its host; nothing acknowledged was lost\n")
	return nil
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

func runLocalDemo(ctx context.Context, cmd *cli.Command) error {
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
