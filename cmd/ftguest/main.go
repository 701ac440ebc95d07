// Command ftguest is the workload program of ftctl's built-in test guest.
// It runs as the guest's main process (started by the initramfs /init) and
// makes lost or repeated guest state visible from the outside:
//
//   - counter: prints "ftguest counter=N" (N = 1, 2, ...) on the console
//     every interval, each line in one write, so serial logs spliced at a
//     checkpoint must show consecutive numbers;
//   - disk: appends hash-chained records (internal/diskrec) to a block
//     device, one durable 4 KiB write per interval, printing
//     "ftguest disk seq=N" after each;
//   - tcp: answers each line a client sends with "seq=N <line>", N counting
//     requests across all connections; a connection that opens with
//     "#sum v1" gets "seq=N sum=S <line>" instead, S chaining every line it
//     sent (pkg/checker verifies it across failovers);
//   - mem: dirties memory at a known rate (ftguest.memmib, ftguest.dirtyrate,
//     ftguest.dirtybytes), for checkpoint benchmarks;
//   - cpu: a fixed CPU-bound loop (SHA-256 rounds over ftguest.cpukib KiB)
//     printing "ftguest cpu round=N ms=T" per round, to compare guest
//     speed with and without protection.
//
// Settings come from ftguest.* keys on the kernel command line (for example
// ftguest.run=counter,disk,tcp ftguest.interval=50ms); flags of the same
// names override them, which is how tests run it on the host.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cmdline, _ := os.ReadFile("/proc/cmdline") // absent outside Linux guests: flags only
	os.Exit(run(ctx, os.Args[1:], string(cmdline), os.Stdout))
}

// workload is started once; start returns the loop that runs until ctx ends.
type workload interface {
	name() string
	start(ctx context.Context) (loop func(ctx context.Context) error, err error)
}

// run is the whole program; it returns the process exit code.
func run(ctx context.Context, args []string, cmdline string, stdout io.Writer) int {
	con := &console{w: stdout}
	cfg, warnings, err := parseConfig(args, cmdline)
	for _, w := range warnings {
		con.printf("ftguest: %s", w)
	}
	if err != nil {
		con.printf("ftguest: %v", err)
		return 2
	}
	if cfg.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.duration)
		defer cancel()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var loops []func(context.Context) error
	var names []string
	for _, w := range cfg.workloads(con) {
		loop, err := w.start(ctx)
		if err != nil {
			con.printf("ftguest: start %s: %v", w.name(), err)
			cancel()
			return 1
		}
		loops = append(loops, loop)
		names = append(names, w.name())
	}
	con.printf("ftguest ready run=%s", strings.Join(names, ","))

	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := false
	for i, loop := range loops {
		wg.Go(func() {
			if err := loop(ctx); err != nil && ctx.Err() == nil {
				con.printf("ftguest: %s stopped: %v", names[i], err)
				mu.Lock()
				failed = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if failed {
		return 1
	}
	if cfg.duration > 0 {
		return cfg.exit
	}
	con.printf("ftguest: stopped: %v", context.Cause(ctx))
	return cfg.exit
}

// console writes whole lines, each with a single Write, so that a line is
// never split on the serial port and concurrent workloads do not interleave.
type console struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
}

func (c *console) printf(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf = fmt.Appendf(c.buf[:0], format, args...)
	c.buf = append(c.buf, '\n')
	c.w.Write(c.buf) // nowhere to report a console failure
}

// tick calls f every interval until ctx ends or f fails.
func tick(ctx context.Context, interval time.Duration, f func() error) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := f(); err != nil {
				return err
			}
		}
	}
}
