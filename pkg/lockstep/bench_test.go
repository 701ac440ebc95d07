package lockstep_test

// Benchmarks of a protected TCG guest, each against a baseline measured in
// the same run: checkpoint pause and its parts (idle guest as baseline),
// guest CPU-bound speed (unprotected guest as baseline), the latency of a
// guest's reply (unprotected guest as baseline) and bytes on the wire per
// dirty byte (raw dirty pages as baseline). Each boots real guests, so one
// iteration is a few seconds of guest time and `-benchtime 1x` gives the
// figures; they skip without QEMU (and, for the network one, root).

import (
	"bufio"
	"context"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/vm"
)

// epochLog collects the primary's per-checkpoint figures (OnEpoch).
type epochLog struct {
	mu  sync.Mutex
	all []lockstep.EpochStats
}

func (l *epochLog) add(s lockstep.EpochStats) {
	l.mu.Lock()
	l.all = append(l.all, s)
	l.mu.Unlock()
}

func (l *epochLog) snapshot() []lockstep.EpochStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.all)
}

// epochWindow is what a run of checkpoints cost.
type epochWindow struct {
	epochs    []lockstep.EpochStats // checkpoints whose epochs were sent inside the window
	wireBytes int64                 // Stats().WireBytes over the window
	elapsed   time.Duration
}

// measureEpochs waits for skip checkpoints (the first completes the
// initial sync and is not typical), then measures the next n: the epochs
// sent between two Stats snapshots, and the wire bytes between them.
func measureEpochs(ctx context.Context, tb testing.TB, p *pair, log *epochLog, skip, n int) epochWindow {
	tb.Helper()
	waitSent := func(k int) lockstep.Stats {
		for {
			st := p.prim.Stats()
			if es := log.snapshot(); len(es) >= k && st.Sent >= es[k-1].Epoch {
				return st
			}
			select {
			case err := <-p.primErr:
				tb.Fatalf("primary stopped: %v", err)
			case <-ctx.Done():
				tb.Fatalf("waiting for %d checkpoints: %v (stats %+v)", k, ctx.Err(), p.prim.Stats())
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	s0 := waitSent(skip)
	t0 := time.Now()
	s1 := waitSent(len(log.snapshot()) + n)
	w := epochWindow{wireBytes: s1.WireBytes - s0.WireBytes, elapsed: time.Since(t0)}
	for _, e := range log.snapshot() {
		if e.Epoch > s0.Sent && e.Epoch <= s1.Sent {
			w.epochs = append(w.epochs, e)
		}
	}
	return w
}

func pctl(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// pauseFigures summarises a window of checkpoints.
type pauseFigures struct {
	name       string
	n          int
	p50, p99   time.Duration
	parts      map[string]time.Duration  // p50 of each part
	dirtyPages float64                   // mean per checkpoint
	wirePerB   float64                   // wire bytes per dirty byte
	memPerB    float64                   // encoded memory bytes per dirty byte
	devBytes   float64                   // mean device state bytes on the wire per checkpoint
	devRaw     float64                   // mean device state bytes QEMU produced per checkpoint
	devCodecs  map[lockstep.DevCodec]int // checkpoints per device-state codec
	guestRate  float64                   // pages/s the mem workload reported (0: none)
}

var partNames = []string{"stop", "dirty", "capture", "devstate", "mark", "hold", "cont", "encode", "devenc"}

func summarise(name string, w epochWindow) pauseFigures {
	f := pauseFigures{name: name, n: len(w.epochs), parts: map[string]time.Duration{}, devCodecs: map[lockstep.DevCodec]int{}}
	cols := map[string][]time.Duration{}
	var pauses []time.Duration
	var dirty, mem, dev, devRaw int64
	for _, e := range w.epochs {
		pauses = append(pauses, e.Pause)
		for i, d := range []time.Duration{e.Stop, e.Dirty, e.Capture, e.DevState, e.Mark, e.Hold, e.Cont, e.Encode, e.DevEncode} {
			cols[partNames[i]] = append(cols[partNames[i]], d)
		}
		dirty += int64(e.DirtyPages) * memsync.PageSize
		mem += int64(e.MemBytes)
		dev += int64(e.DevStateBytes)
		devRaw += int64(e.DevStateRawBytes)
		f.devCodecs[e.DevCodec]++
	}
	f.p50, f.p99 = pctl(pauses, 0.5), pctl(pauses, 0.99)
	for k, v := range cols {
		f.parts[k] = pctl(v, 0.5)
	}
	if f.n > 0 {
		f.dirtyPages = float64(dirty) / memsync.PageSize / float64(f.n)
		f.devBytes = float64(dev) / float64(f.n)
		f.devRaw = float64(devRaw) / float64(f.n)
	}
	if dirty > 0 {
		f.wirePerB = float64(w.wireBytes) / float64(dirty)
		f.memPerB = float64(mem) / float64(dirty)
	}
	return f
}

func (f pauseFigures) report(b *testing.B) {
	b.ReportMetric(ms(f.p50), "pause-p50-ms")
	b.ReportMetric(ms(f.p99), "pause-p99-ms")
	for _, k := range partNames {
		b.ReportMetric(ms(f.parts[k]), k+"-ms")
	}
	b.ReportMetric(f.dirtyPages, "dirty-pages/ckpt")
	if f.wirePerB > 0 {
		b.ReportMetric(f.wirePerB, "wire-B/dirty-B")
	}
}

var memReportRE = regexp.MustCompile(`ftguest mem dirtied=(\d+) behind=(\d+) s=([0-9.]+)`)

// memRate is the dirty rate the mem workload achieved between its first
// and last progress reports on the serial console, in pages per second of
// guest time, and the pages it could not keep up with.
func memRate(m *vm.Machine) (rate float64, behind uint64) {
	out, _ := m.Serial()
	all := memReportRE.FindAllSubmatch(out, -1)
	if len(all) < 2 {
		return 0, 0
	}
	parse := func(s []byte) float64 { v, _ := strconv.ParseFloat(string(s), 64); return v }
	a, z := all[0], all[len(all)-1]
	if dt := parse(z[3]) - parse(a[3]); dt > 0 {
		rate = (parse(z[1]) - parse(a[1])) / dt
	}
	return rate, uint64(parse(z[2]))
}

// BenchmarkCheckpointPause: stop→cont of a 256 MiB TCG guest and its parts
// (EpochStats), with the shadow tracker, at idle and under the mem
// workload at two dirty rates (full 4 KiB random pages). Checkpoints are
// periodic (100 ms) so every load gets the same number. The baseline is
// the idle guest (measured first, and again last as a noise check); the
// table gives each load's pause against the first.
// Soft-dirty is not measured here: this host kernel lacks
// CONFIG_MEM_SOFT_DIRTY (DESIGN.md), and the sub-benchmark says so.
func BenchmarkCheckpointPause(b *testing.B) {
	loads := []struct{ name, workload string }{
		{"idle", "ftguest.run=counter ftguest.interval=1s"},
		{"mem-1000pps", "ftguest.run=mem ftguest.memmib=64 ftguest.dirtyrate=1000 ftguest.memreport=500ms"},
		{"mem-5000pps", "ftguest.run=mem ftguest.memmib=64 ftguest.dirtyrate=5000 ftguest.memreport=500ms"},
		// The baseline again: on a shared machine the drift between the
		// two idle runs is the noise floor of the ratios.
		{"idle-again", "ftguest.run=counter ftguest.interval=1s"},
	}
	var figs []pauseFigures
	for _, tracker := range []memsync.Kind{memsync.KindShadow, memsync.KindSoftDirty} {
		for _, ld := range loads {
			b.Run(fmt.Sprintf("tracker=%s/load=%s", tracker, ld.name), func(b *testing.B) {
				if tracker == memsync.KindSoftDirty {
					if err := memsync.ProbeSoftDirty(); err != nil {
						b.Skip("soft-dirty tracking is unavailable on this host kernel:", err)
					}
				}
				ctx := testenv.Deadline(b, 4*time.Minute)
				log := &epochLog{}
				p := newPair(b, ctx, pairOptions{
					workload: ld.workload,
					memMiB:   256,
					tracker:  tracker,
					linkTB:   tlsLinkTB,
					primary: func(c *lockstep.PrimaryConfig) {
						c.Policy = lockstep.Policy{Mode: lockstep.ModePeriodic, Period: 100 * time.Millisecond}
						c.OnEpoch = log.add
					},
				})
				b.Cleanup(p.shutdown)
				p.waitResumable(ctx)
				b.ResetTimer()
				w := measureEpochs(ctx, b, p, log, 3, 30*b.N)
				b.StopTimer()
				f := summarise(string(tracker)+"/"+ld.name, w)
				f.guestRate, _ = memRate(p.primary)
				f.report(b)
				if len(w.epochs) > 0 {
					worst := slices.MaxFunc(w.epochs, func(x, y lockstep.EpochStats) int { return int(x.Pause - y.Pause) })
					b.Logf("longest pause: %+v", worst)
				}
				if f.guestRate > 0 {
					b.ReportMetric(f.guestRate, "guest-dirty-pages/s")
				}
				figs = append(figs, f)
			})
		}
	}
	printPauseTable(figs)
}

func printPauseTable(figs []pauseFigures) {
	if len(figs) == 0 {
		return
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\ncheckpoint pause, 256 MiB TCG guest, periodic 100 ms (ms; ratio = p50 / idle p50 of the same tracker)\n")
	fmt.Fprintf(&sb, "%-24s %4s %7s %7s %6s", "tracker/load", "n", "p50", "p99", "ratio")
	for _, k := range partNames {
		fmt.Fprintf(&sb, " %8s", k)
	}
	fmt.Fprintf(&sb, " %9s %10s %9s\n", "dirty/ck", "guest pp/s", "wire/dirty")
	base := map[string]time.Duration{}
	for _, f := range figs {
		tr, ld, _ := strings.Cut(f.name, "/")
		if _, ok := base[tr]; !ok && ld == "idle" {
			base[tr] = f.p50
		}
	}
	for _, f := range figs {
		tr, _, _ := strings.Cut(f.name, "/")
		ratio := "-"
		if bp := base[tr]; bp > 0 {
			ratio = fmt.Sprintf("%.2f", float64(f.p50)/float64(bp))
		}
		fmt.Fprintf(&sb, "%-24s %4d %7.1f %7.1f %6s", f.name, f.n, ms(f.p50), ms(f.p99), ratio)
		for _, k := range partNames {
			fmt.Fprintf(&sb, " %8.2f", ms(f.parts[k]))
		}
		fmt.Fprintf(&sb, " %9.1f %10.0f %9.2f\n", f.dirtyPages, f.guestRate, f.wirePerB)
	}
	fmt.Print(sb.String())
}

var cpuRoundRE = regexp.MustCompile(`ftguest cpu round=(\d+) ms=([0-9.]+)`)

// cpuRounds parses the cpu workload's round lines: round number → guest ms.
func cpuRounds(m *vm.Machine) (last int, guestMS map[int]float64) {
	out, _ := m.Serial()
	guestMS = map[int]float64{}
	for _, r := range cpuRoundRE.FindAllSubmatch(out, -1) {
		n, _ := strconv.Atoi(string(r[1]))
		v, _ := strconv.ParseFloat(string(r[2]), 64)
		guestMS[n] = v
		last = max(last, n)
	}
	return last, guestMS
}

// cpuSpeed times rounds rounds of the cpu workload from the host (wall
// time between round lines appearing, polled every 5 ms) after warm
// rounds, and averages the guest's own time for the same rounds.
func cpuSpeed(ctx context.Context, tb testing.TB, m *vm.Machine, warm, rounds int) (wall time.Duration, guest float64) {
	tb.Helper()
	waitRound := func(k int) (int, time.Time) {
		for {
			if last, _ := cpuRounds(m); last >= k {
				return last, time.Now()
			}
			select {
			case <-ctx.Done():
				tb.Fatalf("waiting for cpu round %d: %v", k, ctx.Err())
			case <-m.Exited():
				tb.Fatalf("guest exited: %s", m.Stderr())
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	first, _ := waitRound(1)
	r0, t0 := waitRound(first + warm)
	r1, t1 := waitRound(r0 + rounds)
	_, g := cpuRounds(m)
	sum := 0.0
	for r := r0 + 1; r <= r1; r++ {
		sum += g[r]
	}
	return t1.Sub(t0) / time.Duration(r1-r0), sum / float64(r1-r0)
}

// BenchmarkGuestCPU: a CPU-bound guest loop (SHA-256 rounds over 6 MiB,
// about 150 ms each under TCG here) in a 128 MiB TCG guest, unprotected (the baseline), protected with the
// I/O-triggered policy (defaults: this guest has no network output, so it
// checkpoints every max interval, 200 ms) and protected with the periodic
// policy at 50 ms. Wall time per round is seen from the host; the guest's
// own clock stops while it is paused, so guest-ms shows only how much
// slower the guest runs between pauses.
func BenchmarkGuestCPU(b *testing.B) {
	const workload = "ftguest.run=cpu ftguest.cpukib=6144"
	type result struct {
		name        string
		wall        time.Duration
		guest       float64
		checkpoints uint64
		pauseP50    time.Duration
	}
	var results []result
	for _, c := range []struct {
		name   string
		policy *lockstep.Policy
	}{
		{"unprotected", nil},
		{"io", &lockstep.Policy{Mode: lockstep.ModeIO}},
		{"periodic-50ms", &lockstep.Policy{Mode: lockstep.ModePeriodic, Period: 50 * time.Millisecond}},
	} {
		b.Run(c.name, func(b *testing.B) {
			ctx := testenv.Deadline(b, 4*time.Minute)
			o := pairOptions{workload: workload, unprotected: c.policy == nil, linkTB: tlsLinkTB}
			if c.policy != nil {
				o.primary = func(pc *lockstep.PrimaryConfig) { pc.Policy = *c.policy }
			}
			p := newPair(b, ctx, o)
			if c.policy != nil {
				b.Cleanup(p.shutdown)
				p.waitResumable(ctx)
			}
			b.ResetTimer()
			var s0 lockstep.Stats
			if p.prim != nil {
				s0 = p.prim.Stats()
			}
			wall, guest := cpuSpeed(ctx, b, p.primary, 2, 16*b.N)
			b.StopTimer()
			r := result{name: c.name, wall: wall, guest: guest}
			if p.prim != nil {
				s1 := p.prim.Stats()
				r.checkpoints, r.pauseP50 = s1.Checkpoints-s0.Checkpoints, s1.PauseP50
			}
			b.ReportMetric(ms(wall), "wall-ms/round")
			b.ReportMetric(guest, "guest-ms/round")
			results = append(results, r)
		})
	}
	if len(results) == 0 {
		return
	}
	var base result
	for _, r := range results {
		if r.name == "unprotected" {
			base = r
		}
	}
	fmt.Printf("\nguest CPU-bound loop, 128 MiB TCG guest (per round; ratio = protected / unprotected of the same run)\n")
	fmt.Printf("%-14s %10s %7s %10s %7s %12s %9s\n", "policy", "wall ms", "ratio", "guest ms", "ratio", "checkpoints", "pause p50")
	for _, r := range results {
		wr, gr := "-", "-"
		if base.wall > 0 {
			wr, gr = fmt.Sprintf("%.2f", float64(r.wall)/float64(base.wall)), fmt.Sprintf("%.2f", r.guest/base.guest)
		}
		fmt.Printf("%-14s %10.1f %7s %10.1f %7s %12d %9.1f\n", r.name, ms(r.wall), wr, r.guest, gr, r.checkpoints, ms(r.pauseP50))
	}
}

// BenchmarkReplyLatency: a client in a testbed's client namespace sends a
// line to the guest's TCP service and waits for the reply, one at a time,
// across the bed's LAN, through a tap on host A's br-vm and the
// output-commit buffer. Unprotected (the buffer in passthrough,
// no coordinator; the baseline) against protected with the I/O-triggered
// policy (the reply triggers a checkpoint and waits for it to commit on
// the secondary, over TCP with mutual TLS) and with the periodic policy at
// 50 ms (the reply waits for the next period's checkpoint). 128 MiB TCG
// guest.
func BenchmarkReplyLatency(b *testing.B) {
	requireNet(b)
	type result struct {
		name     string
		p50, p99 time.Duration
		n        int
	}
	var results []result
	for _, mode := range []struct {
		name   string
		policy *lockstep.Policy
	}{
		{"unprotected", nil},
		{"protected-io", &lockstep.Policy{Mode: lockstep.ModeIO}},
		{"protected-periodic-50ms", &lockstep.Policy{Mode: lockstep.ModePeriodic, Period: 50 * time.Millisecond}},
	} {
		name, protected := mode.name, mode.policy != nil
		b.Run(name, func(b *testing.B) {
			ctx := testenv.Deadline(b, 4*time.Minute)
			gn := newGuestNet(b, ctx, !protected)
			o := pairOptions{workload: gn.workload(""), nics: []vm.NIC{gn.nic}, unprotected: !protected, linkTB: tlsLinkTB}
			if protected {
				o.primary = func(c *lockstep.PrimaryConfig) {
					c.Output = gn.buf
					c.Policy = *mode.policy
				}
			}
			p := newPair(b, ctx, o)
			if protected {
				b.Cleanup(p.shutdown)
				p.waitResumable(ctx)
			}
			conn, err := gn.dial(ctx, time.Minute)
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			cl := &client{c: conn, r: bufio.NewReader(conn)}
			for i := range 3 {
				if _, err := cl.exchange(fmt.Sprintf("warm-%d", i)); err != nil {
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			var rtts []time.Duration
			for i := range 40 * b.N {
				d, err := cl.exchange(fmt.Sprintf("req-%d", i))
				if err != nil {
					b.Fatal(err)
				}
				rtts = append(rtts, d)
			}
			b.StopTimer()
			r := result{name: name, p50: pctl(rtts, 0.5), p99: pctl(rtts, 0.99), n: len(rtts)}
			b.ReportMetric(ms(r.p50), "rtt-p50-ms")
			b.ReportMetric(ms(r.p99), "rtt-p99-ms")
			results = append(results, r)
		})
	}
	if len(results) == 0 {
		return
	}
	base := results[0]
	fmt.Printf("\nguest reply latency, request in to reply out at the client, 128 MiB TCG guest (ratio = / unprotected)\n")
	fmt.Printf("%-24s %4s %9s %7s %9s %7s %14s\n", "mode", "n", "p50 ms", "ratio", "p99 ms", "ratio", "added p50 ms")
	for _, r := range results {
		fmt.Printf("%-24s %4d %9.2f %7.2f %9.2f %7.2f %14.2f\n", r.name, r.n, ms(r.p50), float64(r.p50)/float64(base.p50),
			ms(r.p99), float64(r.p99)/float64(base.p99), ms(r.p50-base.p50))
	}
}

// BenchmarkWireBytesPerDirtyByte: Stats().WireBytes over a window of
// checkpoints against the dirty pages (x 4096) the same checkpoints
// captured, the baseline being the raw pages (ratio 1). The mem workload
// dirties 2000 pages/s in a 128 MiB guest, rewriting whole pages with
// random bytes (incompressible: the codec can only lose) or 64 random
// bytes per page (the XOR delta against the previous epoch is mostly
// zero). Wire bytes include each checkpoint's device state (delta-encoded
// against the previous checkpoint's: the table gives it beside the raw size)
// and manifest.
func BenchmarkWireBytesPerDirtyByte(b *testing.B) {
	var figs []pauseFigures
	for _, bytesPerPage := range []int{4096, 64} {
		name := fmt.Sprintf("dirtybytes=%d", bytesPerPage)
		b.Run(name, func(b *testing.B) {
			ctx := testenv.Deadline(b, 4*time.Minute)
			log := &epochLog{}
			p := newPair(b, ctx, pairOptions{
				workload: fmt.Sprintf("ftguest.run=mem ftguest.memmib=32 ftguest.dirtyrate=2000 ftguest.dirtybytes=%d ftguest.memreport=500ms", bytesPerPage),
				linkTB:   tlsLinkTB,
				primary: func(c *lockstep.PrimaryConfig) {
					c.Policy = lockstep.Policy{Mode: lockstep.ModePeriodic, Period: 100 * time.Millisecond}
					c.OnEpoch = log.add
				},
			})
			b.Cleanup(p.shutdown)
			p.waitResumable(ctx)
			b.ResetTimer()
			w := measureEpochs(ctx, b, p, log, 3, 30*b.N)
			b.StopTimer()
			f := summarise(name, w)
			f.guestRate, _ = memRate(p.primary)
			b.ReportMetric(f.wirePerB, "wire-B/dirty-B")
			b.ReportMetric(f.memPerB, "mem-B/dirty-B")
			b.ReportMetric(f.dirtyPages, "dirty-pages/ckpt")
			b.ReportMetric(f.devBytes, "devstate-B/ckpt")
			b.Logf("device state codecs: %v", f.devCodecs)
			figs = append(figs, f)
		})
	}
	if len(figs) == 0 {
		return
	}
	fmt.Printf("\nbytes on the wire per dirty byte, 128 MiB TCG guest, mem workload 2000 pages/s, periodic 100 ms (baseline: raw dirty pages = 1.00)\n")
	fmt.Printf("%-16s %4s %10s %12s %12s %14s %10s %12s %10s\n", "load", "n", "dirty/ck", "wire/dirty", "mem/dirty", "devstate B/ck", "raw B/ck", "guest pp/s", "devenc ms")
	for _, f := range figs {
		fmt.Printf("%-16s %4d %10.1f %12.3f %12.3f %14.0f %10.0f %12.0f %10.3f\n", f.name, f.n, f.dirtyPages, f.wirePerB, f.memPerB, f.devBytes, f.devRaw, f.guestRate, ms(f.parts["devenc"]))
	}
}
