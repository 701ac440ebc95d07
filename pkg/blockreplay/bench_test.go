package blockreplay

import (
	"context"
	"math/rand/v2"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/nbd"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
	"golang.org/x/sys/unix"
)

var benchDone = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

// qemuImgBench runs `qemu-img bench -w` and returns MiB/s.
func qemuImgBench(b *testing.B, target, cache string, size, step, count int) float64 {
	b.Helper()
	args := []string{"bench", "-f", "raw", "-w", "-t", cache, "-d", "16",
		"-s", strconv.Itoa(size), "-c", strconv.Itoa(count)}
	if step > 0 {
		args = append(args, "-S", strconv.Itoa(step))
	}
	out, err := exec.Command("qemu-img", append(args, target)...).CombinedOutput()
	if err != nil {
		b.Fatalf("qemu-img bench: %v\n%s", err, out)
	}
	m := benchDone.FindSubmatch(out)
	if m == nil {
		b.Fatalf("qemu-img bench output not understood:\n%s", out)
	}
	secs, _ := strconv.ParseFloat(string(m[1]), 64)
	return float64(size) * float64(count) / secs / (1 << 20)
}

// nbdTarget serves img; consume decides what happens to the event stream
// (nil: no event log at all).
func nbdTarget(b *testing.B, img string, direct bool, consume func(*eventlog.Pipe)) string {
	b.Helper()
	f, err := backend.OpenFile(img, backend.FileOptions{Direct: direct})
	if err != nil {
		b.Fatal(err)
	}
	var be backend.Backend = f
	var l *eventlog.Log
	if consume != nil {
		p := eventlog.NewPipe(64 << 20)
		l = eventlog.New(f, p, eventlog.Options{})
		be = l
		go consume(p)
		b.Cleanup(func() { p.Close() })
	}
	srv, err := nbd.NewServer(nbd.Options{Logger: quiet}, nbd.Export{Name: "b", Backend: be, MultiConn: true})
	if err != nil {
		b.Fatal(err)
	}
	sock := filepath.Join(b.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln); close(done) }()
	b.Cleanup(func() {
		cancel()
		<-done
		if l != nil && l.Err() != nil {
			b.Errorf("event log broke: %v", l.Err())
		}
		f.Close()
	})
	return "nbd+unix:///b?socket=" + sock
}

func drain(p *eventlog.Pipe) {
	for {
		r, err := p.Recv(context.Background())
		if err != nil {
			return
		}
		eventlog.Recycle(r)
	}
}

// BenchmarkNBDThroughput measures qemu-img bench write throughput on the
// raw file directly and through our NBD server, with and without the event
// log, and reports ratios measured in the same run:
//
//	go test -run XXX -bench NBDThroughput -benchtime 1x ./pkg/blockreplay/
//
// seq64k is 64 KiB sequential writes; stride4k is 4 KiB writes 1 MiB + 4 KiB
// apart (qemu-img bench has no random mode; the stride defeats merging).
func BenchmarkNBDThroughput(b *testing.B) {
	needBin(b, "qemu-img")
	loads := []struct {
		name              string
		size, step, count int
	}{
		{"seq64k", 64 << 10, 0, 2048},
		{"stride4k", 4 << 10, 1<<20 + 4<<10, 8192},
	}
	for _, ld := range loads {
		b.Run(ld.name, func(b *testing.B) {
			for range b.N {
				dir := b.TempDir()
				img := func(n string) string { return rawImage(b, dir, n, 256<<20) }
				stage := func(p *eventlog.Pipe) {
					f, err := backend.OpenFile(img("r"+strconv.Itoa(rand.IntN(1e9))), backend.FileOptions{})
					if err != nil {
						b.Error(err)
						return
					}
					defer f.Close()
					r, err := replay.Open(context.Background(), f, b.TempDir(), quiet)
					if err != nil {
						b.Error(err)
						return
					}
					defer r.Close()
					replay.Pump(context.Background(), p, r, false)
				}
				targets := map[string]func() (string, string){
					"local-none":      func() (string, string) { return img("l1"), "none" },
					"local-writeback": func() (string, string) { return img("l2"), "writeback" },
					"nbd":             func() (string, string) { return nbdTarget(b, img("n1"), false, nil), "none" },
					"nbd+log":         func() (string, string) { return nbdTarget(b, img("n2"), false, drain), "none" },
					"nbd-direct":      func() (string, string) { return nbdTarget(b, img("n3"), true, nil), "none" },
					"nbd-direct+log":  func() (string, string) { return nbdTarget(b, img("n4"), true, drain), "none" },
					// The secondary's staging cost on the same box: events
					// go through a replayer into its staging file.
					"nbd+log+stage": func() (string, string) { return nbdTarget(b, img("n5"), false, stage), "none" },
				}
				order := []string{"local-none", "local-writeback", "nbd", "nbd+log", "nbd-direct", "nbd-direct+log", "nbd+log+stage"}
				res := map[string]float64{}
				// Two rounds in opposite order, best of each: dirty pages
				// left by one run slow down the next, so each run starts
				// after a sync and no target always goes last.
				for round := range 2 {
					for i := range order {
						k := order[i]
						if round == 1 {
							k = order[len(order)-1-i]
						}
						unix.Sync()
						target, cache := targets[k]()
						res[k] = max(res[k], qemuImgBench(b, target, cache, ld.size, ld.step, ld.count))
					}
				}
				for _, k := range order {
					b.Logf("%-16s %8.1f MiB/s  vs local-none %.2f  vs local-writeback %.2f", k, res[k],
						res[k]/res["local-none"], res[k]/res["local-writeback"])
				}
				b.ReportMetric(res["nbd"]/res["local-none"], "nbd/local-none")
				b.ReportMetric(res["nbd+log"]/res["nbd"], "log/nolog")
				b.ReportMetric(res["nbd-direct+log"]/res["local-none"], "direct+log/local-none")
			}
		})
	}
}
