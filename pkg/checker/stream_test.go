package checker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
)

func TestNextSumIsTheDocumentedChain(t *testing.T) {
	// Computed here from the definition, not with NextSum.
	want := uint64(0)
	for _, line := range []string{"a", "", "hello world", strings.Repeat("x", 5000)} {
		buf := binary.BigEndian.AppendUint64(nil, want)
		want = xxhash.Sum64(append(buf, line...))
	}
	sum := uint64(0)
	for _, line := range []string{"a", "", "hello world", strings.Repeat("x", 5000)} {
		sum = NextSum(sum, []byte(line))
	}
	if sum != want {
		t.Fatalf("chain %016x, want %016x", sum, want)
	}
	// Order matters and line boundaries matter.
	ab := NextSum(NextSum(0, []byte("a")), []byte("b"))
	if ab == NextSum(NextSum(0, []byte("b")), []byte("a")) || ab == NextSum(0, []byte("ab")) ||
		ab == NextSum(NextSum(0, []byte("ab")), nil) {
		t.Fatal("the chain does not tell order or line boundaries apart")
	}
}

func TestReplyRoundTripAndParseErrors(t *testing.T) {
	for _, tc := range []Reply{{1, 0, []byte("")}, {42, 0xdeadbeef00112233, []byte("L1-7 x y z")}, {1<<64 - 1, 1<<64 - 1, []byte("seq=3 sum=x")}} {
		b := AppendReply(nil, tc.Seq, tc.Sum, tc.Line)
		if !strings.HasPrefix(string(b), fmt.Sprintf("seq=%d sum=%016x ", tc.Seq, tc.Sum)) || b[len(b)-1] != '\n' {
			t.Fatalf("reply %q", b)
		}
		r, err := ParseReply(b)
		if err != nil || r.Seq != tc.Seq || r.Sum != tc.Sum || string(r.Line) != string(tc.Line) {
			t.Fatalf("parse %q: %+v %v", b, r, err)
		}
	}
	for _, bad := range []string{
		"", "hello", "seq=1 hello", "seq= sum=0000000000000000 x", "seq=0 sum=0000000000000000 x",
		"seq=01 sum=0000000000000000 x", "seq=1 sum=000000000000000 x", "seq=1 sum=00000000000000000x",
		"seq=1 sum=000000000000000G x", "seq=1 sum=ABCDEF0000000000 x", "seq=99999999999999999999 sum=0000000000000000 x",
		"seq=1", "seq=1 sum=0000000000000000",
	} {
		if r, err := ParseReply([]byte(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%q: %+v, err %v, want ErrCorrupt", bad, r, err)
		}
	}
}

// server plays a correct server for one stream in unit tests.
type server struct {
	seq uint64
	sum uint64
}

func (sv *server) answer(line string) Reply {
	sv.seq++
	sv.sum = NextSum(sv.sum, []byte(line))
	return Reply{Seq: sv.seq, Sum: sv.sum, Line: []byte(line)}
}

func kinds(v verdict) string {
	var ks []string
	for _, f := range v.findings {
		ks = append(ks, string(f.kind))
	}
	return strings.Join(ks, ",")
}

func send(s *stream, n int, floor uint64) []string {
	var lines []string
	for range n {
		line := fmt.Sprintf("r%d", s.sent+1)
		s.add(line, time.Now(), floor)
		lines = append(lines, line)
	}
	return lines
}

func TestStreamAcceptsInOrderReplies(t *testing.T) {
	s := newStream("L1", time.Now())
	var sv server
	for i, line := range send(s, 5, 0) {
		v := s.check(sv.answer(line), time.Now())
		if len(v.findings) != 0 || v.ack == nil || v.ack.Index != uint64(i+1) || v.ack.Seq != uint64(i+1) || v.desync {
			t.Fatalf("reply %d: %+v", i+1, v)
		}
	}
	if s.acks != 5 || s.outstanding() != 0 {
		t.Fatalf("acks %d outstanding %d", s.acks, s.outstanding())
	}
}

func TestStreamClassifiesMisbehaviour(t *testing.T) {
	for _, tc := range []struct {
		name      string
		run       func(s *stream, sv *server, lines []string) verdict
		want      string
		desync    bool
		ackedLost uint64
	}{
		{"skipped reply", func(s *stream, sv *server, l []string) verdict {
			s.check(sv.answer(l[0]), time.Now())
			sv.answer(l[1]) // taken, reply lost
			return s.check(sv.answer(l[2]), time.Now())
		}, "lost", false, 0},
		{"duplicate reply", func(s *stream, sv *server, l []string) verdict {
			r := sv.answer(l[0])
			s.check(r, time.Now())
			return s.check(r, time.Now())
		}, "replayed", false, 0},
		{"state rolled back after two acks", func(s *stream, sv *server, l []string) verdict {
			old := *sv
			s.check(sv.answer(l[0]), time.Now())
			s.check(sv.answer(l[1]), time.Now())
			*sv = old // resumed from before request 1: seq and sum go back
			return s.check(sv.answer(l[2]), time.Now())
		}, "lost,replayed", true, 2},
		{"request lost before it was answered", func(s *stream, sv *server, l []string) verdict {
			s.check(sv.answer(l[0]), time.Now())
			return s.check(sv.answer(l[2]), time.Now()) // request 2 never reached the server
		}, "lost", true, 0},
		{"counter went back", func(s *stream, sv *server, l []string) verdict {
			s.check(sv.answer(l[0]), time.Now())
			sv.seq = 0
			return s.check(sv.answer(l[1]), time.Now())
		}, "replayed", false, 0},
		{"bad sum", func(s *stream, sv *server, l []string) verdict {
			r := sv.answer(l[0])
			r.Sum ^= 1
			return s.check(r, time.Now())
		}, "corrupt", true, 0},
		{"wrong echo", func(s *stream, sv *server, l []string) verdict {
			r := sv.answer(l[0])
			r.Line = []byte("r9")
			return s.check(r, time.Now())
		}, "corrupt", true, 0},
		{"echo of the wrong request", func(s *stream, sv *server, l []string) verdict {
			r := sv.answer(l[0])
			r.Line = []byte(l[1])
			return s.check(r, time.Now())
		}, "corrupt", true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStream("L1", time.Now())
			var sv server
			v := tc.run(s, &sv, send(s, 3, 0))
			if got := kinds(v); got != tc.want || v.desync != tc.desync || v.ackedLost != tc.ackedLost {
				t.Fatalf("findings %q desync %v ackedLost %d, want %q %v %d: %+v", got, v.desync, v.ackedLost, tc.want, tc.desync, tc.ackedLost, v.findings)
			}
			if (v.ack != nil) != (tc.want == "") {
				t.Fatalf("ack %+v with findings %q", v.ack, tc.want)
			}
		})
	}
}

func TestStreamFloorCatchesReplayAcrossConnections(t *testing.T) {
	// Another connection already saw seq 10 when this request was sent.
	s := newStream("S1", time.Now())
	l := send(s, 1, 10)
	v := s.check(Reply{Seq: 7, Sum: NextSum(0, []byte(l[0])), Line: []byte(l[0])}, time.Now())
	if kinds(v) != "replayed" || !strings.Contains(v.findings[0].detail, "counter went back") {
		t.Fatalf("%+v", v.findings)
	}
	v = s.check(Reply{Seq: 11, Sum: NextSum(0, []byte(l[0])), Line: []byte(l[0])}, time.Now())
	if kinds(v) != "replayed" { // the same request answered twice
		t.Fatalf("%+v", v.findings)
	}
}

func TestStreamWindowIsBounded(t *testing.T) {
	s := newStream("L1", time.Now())
	var sv server
	var last Reply
	for range 3 * historyWindow {
		l := send(s, 1, sv.seq)
		last = sv.answer(l[0])
		if v := s.check(last, time.Now()); v.ack == nil {
			t.Fatalf("reply %d: %+v", s.sent, v.findings)
		}
	}
	if len(s.hist) > historyWindow || len(s.bySum) > historyWindow {
		t.Fatalf("kept %d entries and %d sums, window %d", len(s.hist), len(s.bySum), historyWindow)
	}
	if v := s.check(last, time.Now()); kinds(v) != "replayed" {
		t.Fatalf("a repeat of the last reply: %+v", v.findings)
	}
	// A roll-back beyond the window is still lost work, though the
	// exact requests can no longer be named.
	l := send(s, 1, sv.seq)
	sv.sum = 12345
	if v := s.check(sv.answer(l[0]), time.Now()); kinds(v) != "corrupt" || !v.desync {
		t.Fatalf("sum from a forgotten state: %+v", v.findings)
	}
}
