package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"
)

// pageSize is the unit the host tracks dirty memory in; the mem workload
// dirties whole distinct guest pages so its rate is the host's dirty rate.
const pageSize = 4096

// dirtyRate is how many pages per second the mem workload dirties: an
// absolute number, or a percentage of its buffer's pages.
type dirtyRate struct {
	pages   float64 // pages/s when !percent
	pct     float64 // percent of the buffer per second when percent
	percent bool
}

// parseDirtyRate accepts "N" (pages per second) or "P%" (percent of the
// buffer's pages per second).
func parseDirtyRate(s string) (dirtyRate, error) {
	num, isPct := strings.CutSuffix(strings.TrimSpace(s), "%")
	v, err := strconv.ParseFloat(num, 64)
	switch {
	case err != nil:
		return dirtyRate{}, fmt.Errorf("dirtyrate %q: want pages per second (e.g. 2000) or a percentage of memmib per second (e.g. 5%%)", s)
	case v < 0 || math.IsNaN(v) || v > 1e9:
		return dirtyRate{}, fmt.Errorf("dirtyrate %q out of range", s)
	case isPct:
		return dirtyRate{pct: v, percent: true}, nil
	}
	return dirtyRate{pages: v}, nil
}

// perSecond is the rate in pages per second for a buffer of n pages.
func (r dirtyRate) perSecond(n int) float64 {
	if r.percent {
		return r.pct / 100 * float64(n)
	}
	return r.pages
}

func (r dirtyRate) String() string {
	if r.percent {
		return strconv.FormatFloat(r.pct, 'g', -1, 64) + "%"
	}
	return strconv.FormatFloat(r.pages, 'g', -1, 64)
}

// memDirtier keeps a buffer of random bytes resident and overwrites a
// random window of bytesPerPage bytes in rate random pages per second, so
// the host sees a known dirty rate. It prints
// "ftguest mem ready pages=N rate=R bytes=B" once and
// "ftguest mem dirtied=TOTAL behind=LOST s=SECONDS" every report interval;
// LOST counts pages it could not dirty in time (a guest too slow for the
// rate), SECONDS is the time since the dirtying began, so
// TOTAL+LOST = rate*SECONDS.
type memDirtier struct {
	con          *console
	mib          int
	rate         dirtyRate
	bytesPerPage int
	report       time.Duration

	buf     []byte
	rng     *rand.Rand
	dirtied uint64
	behind  uint64
}

// memTick is how often the dirtier wakes up; short enough that the dirtying
// is spread over each checkpoint interval rather than bursty.
const memTick = 5 * time.Millisecond

func (m *memDirtier) name() string { return "mem" }

func (m *memDirtier) start(context.Context) (func(context.Context) error, error) {
	m.buf = make([]byte, m.mib<<20)
	m.rng = rand.New(rand.NewPCG(0x6674, 0x6d656d))
	// Random initial contents: a page the dirtier rewrites must not
	// compress away against a zero background, or the wire figures would
	// flatter the codec. This also makes every page resident.
	for i := 0; i+8 <= len(m.buf); i += 8 {
		binary.LittleEndian.PutUint64(m.buf[i:], m.rng.Uint64())
	}
	m.con.printf("ftguest mem ready pages=%d rate=%s bytes=%d", m.pages(), m.rate, m.bytesPerPage)
	return m.loop, nil
}

func (m *memDirtier) pages() int { return len(m.buf) / pageSize }

func (m *memDirtier) loop(ctx context.Context) error {
	perSec := m.rate.perSecond(m.pages())
	begin := time.Now()
	lastReport := begin
	var owed float64 // pages due but not yet dirtied
	last := begin
	return tick(ctx, memTick, func() error {
		now := time.Now()
		owed += perSec * now.Sub(last).Seconds()
		last = now
		// Falling behind by more than a tenth of a second's worth means
		// the guest cannot keep up: drop the backlog rather than burst.
		if limit := perSec / 10; owed > limit && limit >= 1 {
			m.behind += uint64(owed - limit)
			owed = limit
		}
		n := int(owed)
		owed -= float64(n)
		m.dirty(n)
		if now.Sub(lastReport) >= m.report {
			lastReport = now
			m.con.printf("ftguest mem dirtied=%d behind=%d s=%.3f", m.dirtied, m.behind, now.Sub(begin).Seconds())
		}
		return nil
	})
}

// dirty overwrites a random, 8-byte aligned window of bytesPerPage bytes
// in each of n random pages with random bytes.
func (m *memDirtier) dirty(n int) {
	pages := m.pages()
	if pages == 0 {
		return
	}
	span := m.bytesPerPage &^ 7
	if span < 8 {
		span = 8
	}
	for range n {
		p := m.rng.IntN(pages) * pageSize
		off := p + m.rng.IntN((pageSize-span)/8+1)*8
		for i := off; i < off+span; i += 8 {
			binary.LittleEndian.PutUint64(m.buf[i:], m.rng.Uint64())
		}
	}
	m.dirtied += uint64(n)
}
