package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestParseDirtyRate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want float64 // pages/s for a 1000-page buffer
	}{
		{"2000", 2000}, {"0", 0}, {"5%", 50}, {"0.5%", 5}, {" 12.5 ", 12.5}, {"100%", 1000},
	} {
		r, err := parseDirtyRate(tc.in)
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if got := r.perSecond(1000); got != tc.want {
			t.Errorf("%q: %v pages/s for 1000 pages, want %v", tc.in, got, tc.want)
		}
	}
	for _, bad := range []string{"fast", "", "-1", "-3%", "NaN", "1e12", "5%%", "%"} {
		if _, err := parseDirtyRate(bad); err == nil || !strings.Contains(err.Error(), "dirtyrate") {
			t.Errorf("%q: err %v, want a dirtyrate error", bad, err)
		}
	}
}

func TestParseConfigMemAndCPU(t *testing.T) {
	cfg, _, err := parseConfig(nil, "ftguest.run=mem,cpu ftguest.memmib=8 ftguest.dirtyrate=3% ftguest.dirtybytes=64 ftguest.cpukib=32 ftguest.cpurounds=7")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.memMiB != 8 || cfg.dirtyBytes != 64 || cfg.cpuKiB != 32 || cfg.cpuRounds != 7 || cfg.dirtyRate.perSecond(2048) != 3*2048/100.0 {
		t.Fatalf("config %+v", cfg)
	}
	ws := cfg.workloads(&console{w: &bytes.Buffer{}})
	if len(ws) != 2 || ws[0].name() != "mem" || ws[1].name() != "cpu" {
		t.Fatalf("workloads %v", ws)
	}
	for _, tc := range []struct{ cmdline, want string }{
		{"ftguest.memmib=0", "memmib must be between"},
		{"ftguest.memmib=5000", "memmib must be between"},
		{"ftguest.dirtyrate=lots", `dirtyrate "lots"`},
		{"ftguest.dirtybytes=4", "dirtybytes must be between"},
		{"ftguest.dirtybytes=8192", "dirtybytes must be between"},
		{"ftguest.cpukib=0", "cpukib must be between"},
		{"ftguest.cpurounds=-1", "cpurounds must not be negative"},
		{"ftguest.memreport=0s", "memreport must be positive"},
	} {
		if _, _, err := parseConfig(nil, "ftguest.run=mem "+tc.cmdline); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want it to mention %q", tc.cmdline, err, tc.want)
		}
	}
}

// changedPages compares two buffers page by page and returns, for each
// page that differs, the first and last differing byte offsets in it.
func changedPages(a, b []byte) map[int][2]int {
	out := map[int][2]int{}
	for p := 0; p < len(a)/pageSize; p++ {
		x, y := a[p*pageSize:(p+1)*pageSize], b[p*pageSize:(p+1)*pageSize]
		first, last := -1, -1
		for i := range x {
			if x[i] != y[i] {
				if first < 0 {
					first = i
				}
				last = i
			}
		}
		if first >= 0 {
			out[p] = [2]int{first, last}
		}
	}
	return out
}

func TestMemDirtierTouchesOnlyItsWindow(t *testing.T) {
	for _, span := range []int{8, 64, 4096} {
		t.Run(strconv.Itoa(span), func(t *testing.T) {
			m := &memDirtier{con: &console{w: &bytes.Buffer{}}, mib: 1, bytesPerPage: span, report: time.Second}
			if _, err := m.start(context.Background()); err != nil {
				t.Fatal(err)
			}
			if zeros := bytes.Count(m.buf, make([]byte, 64)); zeros > 0 {
				t.Fatalf("initial buffer has %d all-zero 64-byte runs; want random contents", zeros)
			}
			start := bytes.Clone(m.buf)
			const n = 50
			for range n {
				before := bytes.Clone(m.buf)
				m.dirty(1)
				changed := changedPages(before, m.buf)
				if len(changed) != 1 {
					t.Fatalf("one dirtied page changed %d pages", len(changed))
				}
				for p, r := range changed {
					if r[1]-r[0] >= span {
						t.Fatalf("page %d changed over bytes %d..%d, more than the %d-byte window", p, r[0], r[1], span)
					}
				}
			}
			if m.dirtied != n {
				t.Fatalf("dirtied counter %d, want %d", m.dirtied, n)
			}
			// 50 picks among 256 pages: about 45 distinct.
			changed := changedPages(start, m.buf)
			if len(changed) < 35 || len(changed) > n {
				t.Fatalf("%d pages changed after dirtying %d", len(changed), n)
			}
			before := start
			if span == pageSize {
				// Whole pages rewritten: nearly every byte differs.
				for p := range changed {
					same := 0
					for i := p * pageSize; i < (p+1)*pageSize; i++ {
						if before[i] == m.buf[i] {
							same++
						}
					}
					if same > 100 {
						t.Fatalf("page %d: %d of 4096 bytes unchanged by a whole-page rewrite", p, same)
					}
				}
			}
		})
	}
}

var memReportRE = regexp.MustCompile(`ftguest mem dirtied=(\d+) behind=(\d+) s=([0-9.]+)\n`)

func TestMemWorkloadKeepsItsRate(t *testing.T) {
	var out syncBuffer
	const rate = 3000
	code := run(context.Background(), []string{"-run", "mem", "-memmib", "2", "-dirtyrate", strconv.Itoa(rate),
		"-dirtybytes", "64", "-memreport", "40ms", "-duration", "400ms"}, "", &out)
	if code != 0 {
		t.Fatalf("exit code %d: %s", code, out.String())
	}
	if !strings.HasPrefix(out.String(), "ftguest mem ready pages=512 rate=3000 bytes=64\n") {
		t.Fatalf("output does not start with the mem ready line: %q", out.String())
	}
	ms := memReportRE.FindAllStringSubmatch(out.String(), -1)
	if len(ms) < 3 {
		t.Fatalf("only %d progress lines in %q", len(ms), out.String())
	}
	prev := -1.0
	for _, m := range ms {
		dirtied, _ := strconv.ParseFloat(m[1], 64)
		behind, _ := strconv.ParseFloat(m[2], 64)
		s, _ := strconv.ParseFloat(m[3], 64)
		// Every page due by then is either dirtied or counted as
		// behind; s is printed to the millisecond.
		if want := rate * s; math.Abs(dirtied+behind-want) > rate*0.001+2 {
			t.Errorf("at s=%v: dirtied %v + behind %v, want %v", s, dirtied, behind, want)
		}
		if s <= prev {
			t.Errorf("progress time went from %v to %v", prev, s)
		}
		prev = s
	}
}

var cpuRoundRE = regexp.MustCompile(`ftguest cpu round=(\d+) ms=([0-9.]+) sum=([0-9a-f]{8})\n`)

func TestCPUWorkloadChainsRounds(t *testing.T) {
	var out syncBuffer
	const kib, rounds = 16, 5
	code := run(context.Background(), []string{"-run", "cpu", "-cpukib", strconv.Itoa(kib), "-cpurounds", strconv.Itoa(rounds)}, "", &out)
	if code != 0 {
		t.Fatalf("exit code %d: %s", code, out.String())
	}
	// The same chain, computed independently of the workload.
	buf := make([]byte, kib<<10)
	for i := 0; i+8 <= len(buf); i += 8 {
		binary.LittleEndian.PutUint64(buf[i:], uint64(i)*0x9e3779b97f4a7c15)
	}
	var sum [32]byte
	ms := cpuRoundRE.FindAllStringSubmatch(out.String(), -1)
	if len(ms) != rounds {
		t.Fatalf("%d round lines, want %d: %q", len(ms), rounds, out.String())
	}
	total := 0.0
	for i, m := range ms {
		sum = sha256.Sum256(append(sum[:], buf...))
		if m[1] != strconv.Itoa(i+1) || m[3] != fmt.Sprintf("%x", sum[:4]) {
			t.Fatalf("line %q, want round=%d sum=%x", m[0], i+1, sum[:4])
		}
		v, _ := strconv.ParseFloat(m[2], 64)
		total += v
	}
	var doneRounds int
	var doneMS float64
	if _, err := fmt.Sscanf(out.String()[strings.Index(out.String(), "ftguest cpu done"):], "ftguest cpu done rounds=%d ms=%f", &doneRounds, &doneMS); err != nil {
		t.Fatalf("no done line in %q: %v", out.String(), err)
	}
	if doneRounds != rounds || math.Abs(doneMS-total) > 0.001*rounds+0.001 {
		t.Fatalf("done rounds=%d ms=%v; the rounds add up to %v", doneRounds, doneMS, total)
	}
}
