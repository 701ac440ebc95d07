package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/diskrec"
)

// syncBuffer collects console output written from several goroutines and
// counts Write calls, to check that each line is one write.
type syncBuffer struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	writes []string
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.writes = append(b.writes, string(p))
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *syncBuffer) waitFor(t *testing.T, re *regexp.Regexp) []string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(b.String()); m != nil {
			return m
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no %q in output:\n%s", re, b.String())
	return nil
}

func TestParseConfig(t *testing.T) {
	cmdline := "console=ttyS0 ftguest.run=disk,tcp,disk ftguest.interval=50ms ftguest.ip=10.0.2.15/24 ftguest.port=7100 quiet"
	cfg, warnings, err := parseConfig([]string{"-port", "8000"}, cmdline)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cfg.run, ","); got != "disk,tcp" {
		t.Errorf("run = %q, want disk,tcp (deduplicated)", got)
	}
	if cfg.interval != 50*time.Millisecond || cfg.diskInterval != 100*time.Millisecond {
		t.Errorf("intervals %v %v", cfg.interval, cfg.diskInterval)
	}
	if cfg.port != 8000 || cfg.listen != ":8000" {
		t.Errorf("flag must override the kernel command line: port %d listen %q", cfg.port, cfg.listen)
	}
	if len(warnings) != 0 {
		t.Errorf("warnings %v, want none (ftguest.ip belongs to /init)", warnings)
	}

	cfg, _, err = parseConfig(nil, "")
	if err != nil || strings.Join(cfg.run, ",") != "counter" || cfg.disk != "/dev/vda" || cfg.port != 7000 {
		t.Errorf("defaults: %+v %v", cfg, err)
	}

	_, warnings, err = parseConfig(nil, "ftguest.bogus=1")
	if err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], "ftguest.bogus") {
		t.Errorf("unknown key: warnings %v err %v", warnings, err)
	}

	for _, tc := range []struct {
		args          []string
		cmdline, want string
	}{
		{nil, "ftguest.run=counter,dance", `unknown workload "dance"`},
		{nil, "ftguest.interval=fast", "ftguest.interval=fast"},
		{nil, "ftguest.interval=-1s", "interval must be positive"},
		{nil, "ftguest.run", "has no value"},
		{[]string{"-port", "70000"}, "", "port 70000"},
		{[]string{"-run", ","}, "", "no workload"},
		{[]string{"extra"}, "", `unexpected argument "extra"`},
		{[]string{"-nope"}, "", "bad flags"},
	} {
		_, _, err := parseConfig(tc.args, tc.cmdline)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("args %v cmdline %q: err %v, want it to mention %q", tc.args, tc.cmdline, err, tc.want)
		}
	}
}

func TestRunBadConfigExits2(t *testing.T) {
	var out syncBuffer
	if code := run(context.Background(), nil, "ftguest.run=nope", &out); code != 2 {
		t.Fatalf("exit code %d, want 2", code)
	}
	if !strings.Contains(out.String(), `unknown workload "nope"`) {
		t.Fatalf("output %q does not explain the error", out.String())
	}
}

var counterRE = regexp.MustCompile(`^ftguest counter=(\d+)\n$`)

func TestCounterLinesAreConsecutiveSingleWrites(t *testing.T) {
	var out syncBuffer
	code := run(context.Background(), []string{"-interval", "5ms", "-duration", "300ms", "-exit", "3"}, "", &out)
	if code != 3 {
		t.Fatalf("exit code %d, want 3", code)
	}
	var ns []int
	for _, w := range out.writes {
		if m := counterRE.FindStringSubmatch(w); m != nil {
			n, _ := strconv.Atoi(m[1])
			ns = append(ns, n)
		} else if strings.Contains(w, "counter=") {
			t.Fatalf("write %q is not exactly one counter line", w)
		}
	}
	if len(ns) < 3 {
		t.Fatalf("only %d counter lines in %q", len(ns), out.String())
	}
	for i, n := range ns {
		if n != i+1 {
			t.Fatalf("counter line %d says %d: %v", i, n, ns)
		}
	}
	if !strings.HasPrefix(out.String(), "ftguest ready run=counter\n") {
		t.Errorf("output does not start with the ready line: %q", out.String()[:40])
	}
}

func TestTCPServerCountsAcrossConnections(t *testing.T) {
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int)
	go func() { done <- run(ctx, []string{"-run", "tcp", "-listen", "127.0.0.1:0"}, "", &out) }()
	addr := out.waitFor(t, regexp.MustCompile(`ftguest tcp listening addr=(\S+)`))[1]
	out.waitFor(t, regexp.MustCompile(`ftguest ready run=tcp`))

	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		return c, bufio.NewReader(c)
	}
	ask := func(c net.Conn, r *bufio.Reader, line string) string {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
			t.Fatal(err)
		}
		reply, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return reply
	}
	c1, r1 := dial()
	if got := ask(c1, r1, "hello"); got != "seq=1 hello\n" {
		t.Fatalf("reply %q, want seq=1 hello", got)
	}
	c2, r2 := dial()
	if got := ask(c2, r2, "world\r"); got != "seq=2 world\n" {
		t.Fatalf("reply %q, want seq=2 world", got)
	}
	if got := ask(c1, r1, ""); got != "seq=3 \n" {
		t.Fatalf("reply %q, want seq=3 and an empty line", got)
	}

	// Many concurrent clients: every seq handed out exactly once.
	const clients, each = 20, 10
	seqs := make(chan int, clients*each)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			r := bufio.NewReader(c)
			for j := range each {
				fmt.Fprintf(c, "c%d-%d\n", i, j)
				reply, err := r.ReadString('\n')
				var n int
				var tag string
				if _, perr := fmt.Sscanf(reply, "seq=%d %s", &n, &tag); err != nil || perr != nil || tag != fmt.Sprintf("c%d-%d", i, j) {
					t.Errorf("client %d: reply %q err %v", i, reply, err)
					return
				}
				seqs <- n
			}
		})
	}
	wg.Wait()
	close(seqs)
	seen := map[int]bool{}
	for n := range seqs {
		if seen[n] || n < 4 || n > 3+clients*each {
			t.Fatalf("seq %d repeated or out of range", n)
		}
		seen[n] = true
	}
	if len(seen) != clients*each {
		t.Fatalf("%d distinct seqs, want %d", len(seen), clients*each)
	}

	// An over-long line ends that connection, not the server.
	fmt.Fprintf(c2, "%s\n", strings.Repeat("x", maxLine+10))
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := r2.ReadString('\n'); err == nil {
		t.Error("over-long line got a reply, want the connection closed")
	}
	if got := ask(c1, r1, "still"); got != fmt.Sprintf("seq=%d still\n", 4+clients*each) {
		t.Fatalf("after the long line: %q", got)
	}

	cancel() // must also close the idle connection c1
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit code %d after cancel", code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("server did not stop on cancel")
	}
	c1.Close()
}

var diskSeqRE = regexp.MustCompile(`ftguest disk seq=(\d+)\n`)

func lastDiskSeq(t *testing.T, out string) uint64 {
	t.Helper()
	m := diskSeqRE.FindAllStringSubmatch(out, -1)
	if len(m) == 0 {
		t.Fatalf("no disk seq lines in %q", out)
	}
	n, _ := strconv.ParseUint(m[len(m)-1][1], 10, 64)
	return n
}

func TestDiskWorkloadWrapsAndResumes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	const slots = 8
	if err := os.WriteFile(path, make([]byte, slots*diskrec.RecordSize), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"-run", "disk", "-disk", path, "-diskinterval", "2ms", "-duration", "200ms"}
	var last uint64
	// Each run resumes the chain the previous one left; run until the
	// writer has wrapped around the 8 slots at least once.
	for runs := 0; last <= slots; runs++ {
		if runs == 50 {
			t.Fatalf("only %d records after %d runs", last, runs)
		}
		var out syncBuffer
		if code := run(context.Background(), args, "", &out); code != 0 {
			t.Fatalf("exit code %d: %s", code, out.String())
		}
		if last > 0 && !strings.Contains(out.String(), fmt.Sprintf("ftguest disk resume seq=%d\n", last)) {
			t.Fatalf("run did not resume after seq %d: %s", last, out.String())
		}
		if strings.Contains(out.String(), fmt.Sprintf("ftguest disk seq=%d\n", last+1)) {
			last = lastDiskSeq(t, out.String())
		} else if strings.Contains(out.String(), "disk seq=") {
			t.Fatalf("run did not continue at seq %d: %s", last+1, out.String())
		}
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rep, err := diskrec.Verify(f, slots*diskrec.RecordSize)
	if err != nil || rep.LastSeq != last || !rep.Wrapped || rep.Records != slots || rep.FirstSeq != last-slots+1 {
		t.Fatalf("report %+v err %v, want wrapped chain ending at %d", rep, err, last)
	}
}

func TestDiskWorkloadRefusesBrokenChainAndMissingDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	img := make([]byte, 8*diskrec.RecordSize)
	payload := make([]byte, diskrec.PayloadSize)
	if _, err := diskrec.Encode(img[diskrec.RecordSize:2*diskrec.RecordSize], 2, 0, diskrec.Hash{7}, payload); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	if code := run(context.Background(), []string{"-run", "disk", "-disk", path}, "", &out); code != 1 {
		t.Fatalf("exit code %d, want 1: %s", code, out.String())
	}
	if !strings.Contains(out.String(), "do not form one chain") || !strings.Contains(out.String(), "offset 4096") {
		t.Fatalf("output %q does not explain the broken chain", out.String())
	}

	out = syncBuffer{}
	missing := filepath.Join(t.TempDir(), "vdz")
	if code := run(context.Background(), []string{"-run", "disk", "-disk", missing, "-diskwait", "100ms"}, "", &out); code != 1 {
		t.Fatalf("exit code %d, want 1", code)
	}
	if !strings.Contains(out.String(), "did not appear within 100ms") {
		t.Fatalf("output %q does not explain the missing device", out.String())
	}
}
