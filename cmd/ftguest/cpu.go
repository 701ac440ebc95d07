package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"time"
)

// cpuBurner is a fixed CPU-bound load: each round hashes its buffer with
// SHA-256 (chaining the previous digest in, so no round can be skipped)
// and prints "ftguest cpu round=N ms=T sum=S", T being the round's time on
// the guest's clock. After rounds rounds (0: never) it prints
// "ftguest cpu done rounds=N ms=TOTAL" and stops.
//
// The guest's clock stands still while the VM is paused, so ms measures
// only the guest's own execution; time lost to checkpoint pauses shows in
// the host's view of how fast the round lines arrive.
type cpuBurner struct {
	con    *console
	kib    int
	rounds int
}

func (c *cpuBurner) name() string { return "cpu" }

func (c *cpuBurner) start(context.Context) (func(context.Context) error, error) {
	buf := make([]byte, c.kib<<10)
	for i := 0; i+8 <= len(buf); i += 8 {
		binary.LittleEndian.PutUint64(buf[i:], uint64(i)*0x9e3779b97f4a7c15)
	}
	return func(ctx context.Context) error {
		var sum [sha256.Size]byte
		var total time.Duration
		for n := 1; c.rounds == 0 || n <= c.rounds; n++ {
			if ctx.Err() != nil {
				return nil
			}
			t := time.Now()
			sum = hashRound(sum, buf)
			d := time.Since(t)
			total += d
			c.con.printf("ftguest cpu round=%d ms=%.3f sum=%x", n, float64(d.Microseconds())/1000, sum[:4])
		}
		c.con.printf("ftguest cpu done rounds=%d ms=%.3f", c.rounds, float64(total.Microseconds())/1000)
		return nil
	}, nil
}

// hashRound is one round's work: SHA-256 of the previous digest and buf.
func hashRound(prev [sha256.Size]byte, buf []byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(prev[:])
	h.Write(buf)
	var out [sha256.Size]byte
	h.Sum(out[:0])
	return out
}
