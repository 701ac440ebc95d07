package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/checker"
	"github.com/ftctl/ftctl/pkg/cluster"
)

func benchCommand() *cli.Command {
	return &cli.Command{
		Name:  "bench",
		Usage: "measure what protection costs: the built-in guest unprotected, then protected, in one run",
		Description: `Runs the built-in guest twice on host A of a two-host namespace bed (as
'ftctl demo' does, as root): first unprotected, then protected on host B,
each with the same workloads for --duration:

  cpu   SHA-256 rounds over a buffer (guest CPU work; rounds per second)
  disk  4 KiB records, each written O_DIRECT and fdatasynced (synced writes per second)
  mem   random pages dirtied at a fixed rate (what checkpoints must carry)
  tcp   one client in the client namespace, one request at a time (latency)

Both runs go through the agent on A (its NBD disk server and NIC path), so
the ratios show what protection itself adds. The protected run ends by
killing host A to measure a failover. The table gives each figure for both
runs and their ratio (protected / unprotected); pause, failover time and
wire bytes per dirty byte exist only for the protected run.`,
		Flags: []cli.Flag{
			&cli.DurationFlag{Name: "duration", Value: 30 * time.Second, Usage: "measurement window of each run"},
			&cli.IntFlag{Name: "memory", Value: 128, Usage: "guest memory in `MiB`"},
			&cli.StringFlag{Name: "dirty-rate", Value: "500", Usage: "mem workload: pages dirtied per second (or N% of its 32 MiB buffer)"},
			&cli.StringFlag{Name: "accel", Value: "auto", Usage: "auto, kvm or tcg"},
			&cli.StringSliceFlag{Name: "agent-arg", Usage: "extra flag for both agents, e.g. --agent-arg=--policy=periodic (repeatable)"},
			&cli.BoolFlag{Name: "json", Usage: "print the results as JSON"},
			&cli.BoolFlag{Name: "keep", Usage: "keep the work directory"},
			&cli.BoolFlag{Name: "verbose", Usage: "log the test bed's steps"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error { return interrupted(ctx, runBench(ctx, cmd)) },
	}
}

// benchRun is what one run measured.
type benchRun struct {
	Window        time.Duration `json:"window_ns"`
	CPURoundsPerS float64       `json:"cpu_rounds_per_s"`
	CPURoundMs    float64       `json:"cpu_round_ms"` // host time per round
	DiskWritesPS  float64       `json:"disk_synced_writes_per_s"`
	DiskMBps      float64       `json:"disk_mb_per_s"`
	Requests      int           `json:"requests"`
	LatencyP50    time.Duration `json:"latency_p50_ns"`
	LatencyP99    time.Duration `json:"latency_p99_ns"`
	DirtyBytes    int64         `json:"dirty_bytes"`
	// Protected run only.
	PauseP50        time.Duration `json:"pause_p50_ns,omitempty"`
	PauseP99        time.Duration `json:"pause_p99_ns,omitempty"`
	Checkpoints     uint64        `json:"checkpoints,omitempty"`
	WireBytes       int64         `json:"wire_bytes,omitempty"`
	WirePerDirty    float64       `json:"wire_bytes_per_dirty_byte,omitempty"`
	FailoverDetect  time.Duration `json:"failover_detection_ns,omitempty"`
	FailoverPromote time.Duration `json:"failover_promotion_ns,omitempty"`
	ClientDowntime  time.Duration `json:"client_downtime_ns,omitempty"`
}

// benchResult is the JSON form of a bench run.
type benchResult struct {
	Accel       string             `json:"accel"`
	MemoryMiB   int                `json:"memory_mib"`
	DirtyRate   string             `json:"dirty_rate"`
	Unprotected benchRun           `json:"unprotected"`
	Protected   benchRun           `json:"protected"`
	Ratios      map[string]float64 `json:"ratios"`
}

const benchDirtyBytes = 256 // bytes the mem workload changes per page

var (
	cpuRoundRE = regexp.MustCompile(`ftguest cpu round=(\d+)`)
	memRE      = regexp.MustCompile(`ftguest mem dirtied=(\d+)`)
)

func lastMatch(re *regexp.Regexp, b []byte) uint64 {
	m := re.FindAllSubmatch(b, -1)
	if len(m) == 0 {
		return 0
	}
	v, _ := strconv.ParseUint(string(m[len(m)-1][1]), 10, 64)
	return v
}

// guestMarks are the guest's progress counters, read from its console.
type guestMarks struct {
	at        time.Time
	cpu, disk uint64
	dirtied   uint64
}

func readMarks(v *cluster.VM) guestMarks {
	b := v.Serial()
	return guestMarks{at: time.Now(), cpu: lastMatch(cpuRoundRE, b), disk: counterlog.LastDiskSeq(b), dirtied: lastMatch(memRE, b)}
}

// latencyLoop makes one request at a time on one connection from the
// client namespace until ctx ends, and returns each round trip.
func latencyLoop(ctx context.Context, v *cluster.VM) ([]time.Duration, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	c, err := v.Dial(dctx, "tcp", v.ServiceAddr())
	cancel()
	if err != nil {
		return nil, fmt.Errorf("connect to the guest's service: %w", err)
	}
	defer c.Close()
	context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	rd := bufio.NewReader(c)
	var rtts []time.Duration
	for i := 1; ctx.Err() == nil; i++ {
		line := fmt.Sprintf("bench-%d", i)
		t0 := time.Now()
		c.SetDeadline(t0.Add(30 * time.Second))
		if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
			return rtts, ignoreDone(ctx, err)
		}
		got, err := rd.ReadString('\n')
		if err != nil {
			return rtts, ignoreDone(ctx, err)
		}
		if !strings.HasSuffix(got, " "+line+"\n") {
			return rtts, fmt.Errorf("reply %q to %q", got, line)
		}
		rtts = append(rtts, time.Since(t0))
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Millisecond):
		}
	}
	return rtts, nil
}

func ignoreDone(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// measure runs the window on a VM whose workloads run: latency from the
// client, the guest's counters at both ends.
func measure(ctx context.Context, v *cluster.VM, window time.Duration) (benchRun, error) {
	wctx, cancel := context.WithTimeout(ctx, window)
	defer cancel()
	m0 := readMarks(v)
	rtts, err := latencyLoop(wctx, v)
	if err != nil {
		return benchRun{}, err
	}
	<-wctx.Done()
	if ctx.Err() != nil {
		return benchRun{}, ctx.Err()
	}
	m1 := readMarks(v)
	secs := m1.at.Sub(m0.at).Seconds()
	r := benchRun{Window: m1.at.Sub(m0.at), Requests: len(rtts), LatencyP50: percentile(rtts, 50), LatencyP99: percentile(rtts, 99),
		CPURoundsPerS: float64(m1.cpu-m0.cpu) / secs, DiskWritesPS: float64(m1.disk-m0.disk) / secs,
		// What the guest changed: bytes in memory pages and whole disk
		// records. Both travel on the link (pages in checkpoints, records
		// as block events), so both belong in the denominator.
		DirtyBytes: int64(m1.dirtied-m0.dirtied)*benchDirtyBytes + int64(m1.disk-m0.disk)*diskrec.RecordSize}
	r.DiskMBps = r.DiskWritesPS * diskrec.RecordSize / 1e6
	if r.CPURoundsPerS > 0 {
		r.CPURoundMs = 1000 / r.CPURoundsPerS
	}
	if m1.cpu == m0.cpu || m1.disk == m0.disk || len(rtts) == 0 {
		return r, fmt.Errorf("a workload made no progress in %v: cpu rounds %d→%d, disk records %d→%d, %d requests",
			r.Window.Round(time.Millisecond), m0.cpu, m1.cpu, m0.disk, m1.disk, len(rtts))
	}
	return r, nil
}

func runBench(ctx context.Context, cmd *cli.Command) error {
	window := cmd.Duration("duration")
	if window < 2*time.Second || window > time.Hour {
		return cli.Exit(fmt.Sprintf("--duration %v: want 2s..1h", window), 2)
	}
	out := cmd.Root().Writer
	p := &demoPrinter{w: cmd.Root().ErrWriter} // progress on stderr: stdout carries the table or JSON
	c, img, err := newDemoCluster(ctx, p, cmd, "ftbench")
	if err != nil {
		return err
	}
	defer closeDemoCluster(p, c, cmd.Bool("keep"))
	opts := cluster.GuestOptions{Image: img, MemoryMiB: cmd.Int("memory"), Accel: cmd.String("accel"),
		Workloads: []string{"counter", "disk", "tcp", "cpu", "mem"},
		Cmdline: fmt.Sprintf("ftguest.diskinterval=2ms ftguest.memmib=32 ftguest.dirtyrate=%s ftguest.dirtybytes=%d",
			cmd.String("dirty-rate"), benchDirtyBytes)}
	res := benchResult{MemoryMiB: opts.MemoryMiB, DirtyRate: cmd.String("dirty-rate")}

	p.stepf("run 1: unprotected, the guest on host A (through A's agent), %v", window)
	v, err := c.StartVM(ctx, c.A, opts)
	if err != nil {
		return err
	}
	if st, err := v.Status(ctx); err == nil {
		res.Accel = st.Accel
	}
	if res.Unprotected, err = measure(ctx, v, window); err != nil {
		return fmt.Errorf("unprotected run: %w", err)
	}
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	err = c.A.Client().Stop(sctx, v.Name)
	scancel()
	if err != nil {
		return fmt.Errorf("stop the unprotected guest: %w", err)
	}

	p.stepf("run 2: protected, the guest on host A with its replica on host B, %v", window)
	if v, err = c.StartVM(ctx, c.A, opts); err != nil {
		return err
	}
	if err := pairWithProgress(ctx, p, v, c.B); err != nil {
		return err
	}
	st0, err := v.Status(ctx)
	if err != nil {
		return err
	}
	pr, err := measure(ctx, v, window)
	if err != nil {
		return fmt.Errorf("protected run: %w", err)
	}
	st1, err := v.Status(ctx)
	if err != nil {
		return err
	}
	if st1.State != agent.StateProtected {
		return fmt.Errorf("the guest was not protected through the run: %s %q", st1.State, st1.Reason)
	}
	pr.PauseP50, pr.PauseP99 = st1.PauseP50, st1.PauseP99
	pr.Checkpoints = st1.Checkpoints - st0.Checkpoints
	pr.WireBytes = st1.WireBytes - st0.WireBytes
	if pr.DirtyBytes > 0 {
		pr.WirePerDirty = float64(pr.WireBytes) / float64(pr.DirtyBytes)
	}

	p.stepf("failover: host A dies (isolated, agent and QEMU SIGKILLed)")
	chk, err := v.NewChecker(checker.Config{Interval: 20 * time.Millisecond, Timeout: 10 * time.Second})
	if err != nil {
		return err
	}
	cctx, ccancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- chk.Run(cctx) }()
	defer func() { ccancel(); <-done }()
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	for chk.Snapshot().LongAcked < 5 && wctx.Err() == nil {
		time.Sleep(20 * time.Millisecond)
	}
	wcancel()
	kd, err := v.KillPrimary(ctx, cluster.KillBoth, true, agent.VMStatus{})
	if err != nil {
		return err
	}
	prom, err := v.AwaitPromotion(ctx, c.B, time.Minute)
	if err != nil {
		return err
	}
	vctx, vcancel := context.WithTimeout(ctx, time.Minute)
	fo, err := chk.Verify(vctx, kd.At)
	vcancel()
	if err != nil {
		return fmt.Errorf("failover: %w", err)
	}
	pr.FailoverPromote = prom.Duration
	pr.FailoverDetect = prom.Status.Since.Add(-prom.Duration).Sub(kd.At)
	pr.ClientDowntime = fo.Downtime
	res.Protected = pr

	u := res.Unprotected
	ratio := func(a, b float64) float64 {
		if b == 0 {
			return 0
		}
		return a / b
	}
	res.Ratios = map[string]float64{
		"cpu_round_time":  ratio(pr.CPURoundMs, u.CPURoundMs),
		"disk_throughput": ratio(pr.DiskWritesPS, u.DiskWritesPS),
		"latency_p50":     ratio(float64(pr.LatencyP50), float64(u.LatencyP50)),
		"latency_p99":     ratio(float64(pr.LatencyP99), float64(u.LatencyP99)),
	}
	if cmd.Bool("json") {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	printBench(out, res)
	return nil
}

func printBench(w io.Writer, r benchResult) {
	u, p := r.Unprotected, r.Protected
	fmt.Fprintf(w, "ftctl bench: accel %s, %d MiB guest, %v per run, mem workload %s pages/s × %d bytes\n",
		r.Accel, r.MemoryMiB, u.Window.Round(time.Second), r.DirtyRate, benchDirtyBytes)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tunprotected\tprotected\tratio")
	fmt.Fprintf(tw, "guest CPU time per round\t%.1f ms\t%.1f ms\t%.2fx\n", u.CPURoundMs, p.CPURoundMs, r.Ratios["cpu_round_time"])
	fmt.Fprintf(tw, "disk synced 4 KiB writes\t%.0f/s (%.2f MB/s)\t%.0f/s (%.2f MB/s)\t%.2fx\n", u.DiskWritesPS, u.DiskMBps, p.DiskWritesPS, p.DiskMBps, r.Ratios["disk_throughput"])
	fmt.Fprintf(tw, "request latency p50\t%v\t%v\t%.2fx\n", ms(u.LatencyP50), ms(p.LatencyP50), r.Ratios["latency_p50"])
	fmt.Fprintf(tw, "request latency p99\t%v\t%v\t%.2fx\n", ms(u.LatencyP99), ms(p.LatencyP99), r.Ratios["latency_p99"])
	fmt.Fprintf(tw, "checkpoint pause p50 / p99\t-\t%v / %v\t\n", ms(p.PauseP50), ms(p.PauseP99))
	fmt.Fprintf(tw, "checkpoints\t-\t%d (%.1f/s)\t\n", p.Checkpoints, float64(p.Checkpoints)/p.Window.Seconds())
	fmt.Fprintf(tw, "wire bytes per dirty byte\t-\t%.2f (%.1f MB for %.1f MB changed in RAM and on disk)\t\n", p.WirePerDirty, float64(p.WireBytes)/1e6, float64(p.DirtyBytes)/1e6)
	fmt.Fprintf(tw, "failover: detection + promotion\t-\t%v + %v\t\n", ms(p.FailoverDetect), ms(p.FailoverPromote))
	fmt.Fprintf(tw, "failover: client downtime\t-\t%v\t\n", ms(p.ClientDowntime))
	tw.Flush()
}
