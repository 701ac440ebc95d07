package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"
)

type config struct {
	run          []string
	interval     time.Duration
	disk         string
	diskInterval time.Duration
	diskWait     time.Duration
	port         int
	listen       string
	duration     time.Duration
	exit         int

	memMiB     int
	dirtyRate  dirtyRate
	dirtyBytes int
	memReport  time.Duration
	cpuKiB     int
	cpuRounds  int
}

// initKeys are ftguest.* keys consumed by the initramfs /init, not by us.
var initKeys = map[string]bool{"ip": true, "gw": true}

var knownWorkloads = []string{"counter", "disk", "tcp", "mem", "cpu"}

// parseConfig reads ftguest.KEY=VALUE words from the kernel command line,
// then args as flags named KEY, which take precedence.
func parseConfig(args []string, cmdline string) (config, []string, error) {
	var cfg config
	var runList, rate string
	fs := flag.NewFlagSet("ftguest", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&runList, "run", "counter", "comma-separated workloads: "+strings.Join(knownWorkloads, ","))
	fs.DurationVar(&cfg.interval, "interval", 100*time.Millisecond, "counter period")
	fs.StringVar(&cfg.disk, "disk", "/dev/vda", "block device (or file) the disk workload writes records to")
	fs.DurationVar(&cfg.diskInterval, "diskinterval", 100*time.Millisecond, "disk record period")
	fs.DurationVar(&cfg.diskWait, "diskwait", 10*time.Second, "how long to wait for the disk device to appear")
	fs.IntVar(&cfg.port, "port", 7000, "TCP port of the tcp workload")
	fs.StringVar(&cfg.listen, "listen", "", "listen address of the tcp workload (default :PORT)")
	fs.DurationVar(&cfg.duration, "duration", 0, "stop after this long (0: run until killed)")
	fs.IntVar(&cfg.exit, "exit", 0, "exit code after a clean stop")
	fs.IntVar(&cfg.memMiB, "memmib", 64, "size of the mem workload's buffer in MiB")
	fs.StringVar(&rate, "dirtyrate", "1000", "pages the mem workload dirties per second, or a percentage of its buffer per second (5%)")
	fs.IntVar(&cfg.dirtyBytes, "dirtybytes", pageSize, "random bytes the mem workload writes into each page it dirties (8..4096)")
	fs.DurationVar(&cfg.memReport, "memreport", time.Second, "how often the mem workload reports its progress")
	fs.IntVar(&cfg.cpuKiB, "cpukib", 1024, "KiB the cpu workload hashes per round")
	fs.IntVar(&cfg.cpuRounds, "cpurounds", 0, "rounds of the cpu workload (0: until stopped)")
	if err := fs.Parse(args); err != nil {
		return cfg, nil, fmt.Errorf("bad flags: %w", err)
	}
	if fs.NArg() > 0 {
		return cfg, nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })

	var warnings []string
	for _, word := range strings.Fields(cmdline) {
		key, value, ok := strings.Cut(word, "=")
		name, isOurs := strings.CutPrefix(key, "ftguest.")
		if !isOurs || initKeys[name] {
			continue
		}
		if !ok {
			return cfg, warnings, fmt.Errorf("kernel command line: %q has no value", word)
		}
		if fs.Lookup(name) == nil {
			warnings = append(warnings, fmt.Sprintf("ignoring unknown kernel command line key %q", key))
			continue
		}
		if explicit[name] {
			continue
		}
		if err := fs.Set(name, value); err != nil {
			return cfg, warnings, fmt.Errorf("kernel command line %s: %w", word, err)
		}
	}

	seen := map[string]bool{}
	for _, w := range strings.Split(runList, ",") {
		w = strings.TrimSpace(w)
		switch {
		case w == "":
			continue
		case !contains(knownWorkloads, w):
			return cfg, warnings, fmt.Errorf("unknown workload %q in run=%q (known: %s)", w, runList, strings.Join(knownWorkloads, ","))
		case !seen[w]:
			seen[w] = true
			cfg.run = append(cfg.run, w)
		}
	}
	if len(cfg.run) == 0 {
		return cfg, warnings, errors.New("run= names no workload")
	}
	for name, d := range map[string]time.Duration{"interval": cfg.interval, "diskinterval": cfg.diskInterval, "memreport": cfg.memReport} {
		if d <= 0 {
			return cfg, warnings, fmt.Errorf("%s must be positive, got %v", name, d)
		}
	}
	if cfg.duration < 0 {
		return cfg, warnings, fmt.Errorf("duration must not be negative, got %v", cfg.duration)
	}
	if cfg.port < 0 || cfg.port > 65535 {
		return cfg, warnings, fmt.Errorf("port %d out of range", cfg.port)
	}
	var err error
	if cfg.dirtyRate, err = parseDirtyRate(rate); err != nil {
		return cfg, warnings, err
	}
	// The buffer is allocated in one piece inside a guest of a few hundred
	// MiB; a bound keeps a typo from becoming an out-of-memory kill.
	if cfg.memMiB < 1 || cfg.memMiB > 4096 {
		return cfg, warnings, fmt.Errorf("memmib must be between 1 and 4096, got %d", cfg.memMiB)
	}
	if cfg.dirtyBytes < 8 || cfg.dirtyBytes > pageSize {
		return cfg, warnings, fmt.Errorf("dirtybytes must be between 8 and %d, got %d", pageSize, cfg.dirtyBytes)
	}
	if cfg.cpuKiB < 1 || cfg.cpuKiB > 1<<20 {
		return cfg, warnings, fmt.Errorf("cpukib must be between 1 and %d, got %d", 1<<20, cfg.cpuKiB)
	}
	if cfg.cpuRounds < 0 {
		return cfg, warnings, fmt.Errorf("cpurounds must not be negative, got %d", cfg.cpuRounds)
	}
	if cfg.listen == "" {
		cfg.listen = fmt.Sprintf(":%d", cfg.port)
	}
	return cfg, warnings, nil
}

func (cfg config) workloads(con *console) []workload {
	var ws []workload
	for _, name := range cfg.run {
		switch name {
		case "counter":
			ws = append(ws, &counter{con: con, interval: cfg.interval})
		case "disk":
			ws = append(ws, &diskWriter{con: con, path: cfg.disk, interval: cfg.diskInterval, wait: cfg.diskWait})
		case "tcp":
			ws = append(ws, &tcpServer{con: con, addr: cfg.listen})
		case "mem":
			ws = append(ws, &memDirtier{con: con, mib: cfg.memMiB, rate: cfg.dirtyRate, bytesPerPage: cfg.dirtyBytes, report: cfg.memReport})
		case "cpu":
			ws = append(ws, &cpuBurner{con: con, kib: cfg.cpuKiB, rounds: cfg.cpuRounds})
		}
	}
	return ws
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
