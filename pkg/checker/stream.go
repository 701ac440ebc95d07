package checker

import (
	"fmt"
	"time"
)

// historyWindow is how many answered requests a connection remembers, for
// recognising a repeated reply, naming the requests a rolled-back server
// lost, and finding the last acknowledgement before a failover.
const historyWindow = 4096

// entry is one request sent on a connection.
type entry struct {
	line  string
	sum   uint64    // the running checksum after this request
	sent  time.Time //
	floor uint64    // the highest verified seq when the request was sent

	answered bool      // a reply for it, or for a later request, came
	acked    bool      // its own reply came and was verified
	seq      uint64    // from its verified reply
	ackedAt  time.Time //
}

// finding is one thing wrong with a reply.
type finding struct {
	kind   Kind
	detail string
}

// verdict is what one reply means for its connection.
type verdict struct {
	findings []finding
	ack      *Ack // the request this reply acknowledged, if verified
	// desync: the server's state for this connection no longer matches
	// the client's chain, so nothing later on it can be checked.
	desync    bool
	ackedLost uint64 // acknowledged requests the server proved to lack
}

// stream is the client's side of one connection's checksum chain: the
// requests it sent, which of them are answered, and the sums they imply.
// Request i (1-based) has sum S(i) = NextSum(S(i-1), line(i)), S(0) = 0.
type stream struct {
	id     string
	opened time.Time

	base    uint64  // index of hist[0]
	baseSum uint64  // S(base-1)
	hist    []entry // requests base, base+1, ...
	bySum   map[uint64]uint64

	next    uint64 // first request with no reply yet
	sent    uint64 // requests sent so far (the last index)
	lastSeq uint64 // highest seq seen on this connection

	stalled bool // a timeout was counted and no reply came since
	closed  bool
	stopped bool   // closed because the checker stopped
	endKind Kind   // why it closed: empty if the checker closed it
	endMsg  string //
	acks    uint64 // requests verified
}

func newStream(id string, opened time.Time) *stream {
	return &stream{id: id, opened: opened, base: 1, next: 1, bySum: map[uint64]uint64{}}
}

// at returns request i, which must be in the window.
func (s *stream) at(i uint64) *entry { return &s.hist[i-s.base] }

// sumAt returns S(i) for i from base-1 on.
func (s *stream) sumAt(i uint64) uint64 {
	if i == s.base-1 {
		return s.baseSum
	}
	return s.at(i).sum
}

func (s *stream) outstanding() uint64 { return s.sent + 1 - s.next }

// add records request line as sent now, when the highest verified seq is
// floor, and returns its index.
func (s *stream) add(line string, now time.Time, floor uint64) uint64 {
	sum := NextSum(s.sumAt(s.sent), []byte(line))
	s.sent++
	s.hist = append(s.hist, entry{line: line, sum: sum, sent: now, floor: floor})
	if _, dup := s.bySum[sum]; !dup { // a 64-bit collision: keep the first
		s.bySum[sum] = s.sent
	}
	s.trim()
	return s.sent
}

// trim forgets answered requests beyond the window.
func (s *stream) trim() {
	for len(s.hist) > historyWindow && s.base < s.next {
		e := s.hist[0]
		if s.bySum[e.sum] == s.base {
			delete(s.bySum, e.sum)
		}
		s.baseSum = e.sum
		s.hist = s.hist[1:]
		s.base++
	}
}

// index returns the request whose sum is sum, with base-1 standing for
// the oldest remembered state (S(0) = 0 on a fresh connection).
func (s *stream) index(sum uint64) (uint64, bool) {
	if i, ok := s.bySum[sum]; ok {
		return i, true
	}
	if sum == s.baseSum {
		return s.base - 1, true
	}
	return 0, false
}

// check judges reply r, received at now. The server answers a connection's
// requests in order, so r should carry S(next) and echo line(next):
//
//   - sum S(i) with i > next: replies to next..i-1 never came although the
//     server took those requests (lost output);
//   - sum S(i) with i < next: a reply to an answered request came again
//     (replayed output, or a server gone back to an older state);
//   - a sum that is S(x) chained with an outstanding line(m), x < m-1: the
//     server's state lacks requests x+1..m-1 (lost input; lost
//     acknowledged work if any of them was acknowledged);
//   - any other sum, or an echo that is not the request's line: corrupt.
//
// A seq not above the connection's previous one, or not above the highest
// seq the client had verified before sending the request, means the
// server's request counter went back: replayed.
func (s *stream) check(r Reply, now time.Time) verdict {
	var v verdict
	i, known := s.index(r.Sum)
	switch {
	case known && i >= s.next:
		e := s.at(i)
		if e.line != string(r.Line) {
			v.findings = append(v.findings, finding{KindCorrupt, fmt.Sprintf(
				"reply seq=%d carries the sum of request %d but echoes %.60q, not %.60q", r.Seq, i, r.Line, e.line)})
			v.desync = true
			return v
		}
		if i > s.next {
			v.findings = append(v.findings, finding{KindLost, fmt.Sprintf(
				"no reply came to requests %d..%d, though the server's sum at request %d shows it took them", s.next, i-1, i)})
			for j := s.next; j < i; j++ {
				s.at(j).answered = true
			}
		}
		v.findings = append(v.findings, s.checkSeq(r, i)...)
		e.answered = true
		s.next = i + 1
		s.lastSeq = max(s.lastSeq, r.Seq)
		s.stalled = false
		if len(v.findings) == 0 {
			e.acked, e.seq, e.ackedAt = true, r.Seq, now
			s.acks++
			v.ack = &Ack{Conn: s.id, Index: i, Seq: r.Seq, Sum: r.Sum, Sent: e.sent, Received: now}
		}
		return v
	case known:
		what := "the state after request %d"
		if i < s.base {
			what = "a state from before request %d"
			i = s.base
		}
		v.findings = append(v.findings, finding{KindReplayed, fmt.Sprintf(
			"reply seq=%d repeats "+what+", answered already (next expected %d): replayed output or a server gone back", r.Seq, i, s.next)})
		return v
	}
	for m := s.next; m <= s.sent; m++ {
		if s.at(m).line != string(r.Line) {
			continue
		}
		for x := m - 1; x+1 >= s.base; x-- {
			if NextSum(s.sumAt(x), r.Line) != r.Sum {
				continue
			}
			var acked uint64
			for j := max(x+1, s.base); j < m; j++ {
				if s.at(j).acked {
					acked++
				}
			}
			v.ackedLost = acked
			v.findings = append(v.findings, finding{KindLost, fmt.Sprintf(
				"reply seq=%d to request %d shows the server lacks requests %d..%d (%d of them acknowledged): it went back to an older state",
				r.Seq, m, x+1, m-1, acked)})
			v.findings = append(v.findings, s.checkSeq(r, m)...)
			v.desync = true
			return v
		}
		v.findings = append(v.findings, finding{KindCorrupt, fmt.Sprintf(
			"reply seq=%d to request %d has sum %016x, which no sequence of this connection's requests gives", r.Seq, m, r.Sum)})
		v.desync = true
		return v
	}
	v.findings = append(v.findings, finding{KindCorrupt, fmt.Sprintf(
		"reply seq=%d sum=%016x echoes %.60q, which is none of the %d requests awaiting a reply", r.Seq, r.Sum, r.Line, s.outstanding())})
	v.desync = true
	return v
}

func (s *stream) checkSeq(r Reply, i uint64) []finding {
	switch floor := s.at(i).floor; {
	case r.Seq <= s.lastSeq:
		return []finding{{KindReplayed, fmt.Sprintf(
			"reply to request %d has seq=%d, not above seq=%d of an earlier reply on this connection", i, r.Seq, s.lastSeq)}}
	case r.Seq <= floor:
		return []finding{{KindReplayed, fmt.Sprintf(
			"reply to request %d has seq=%d, not above seq=%d seen before the request was sent: the server's counter went back", i, r.Seq, floor)}}
	}
	return nil
}
