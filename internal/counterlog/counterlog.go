// Package counterlog reads the progress lines of ftctl's test guest out of
// its console log — the serial counter ("ftguest counter=N" once per
// interval) and the disk writer's durable records ("ftguest disk seq=N") —
// and checks
// that a log stitched together from a primary and the copy restored from its
// checkpoint counts on without a gap or a repeat: the visible proof that the
// restored guest continued from exactly the checkpointed state.
package counterlog

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// Prefix starts every counter line the guest prints.
const Prefix = "ftguest counter="

// ErrDiscontinuity is wrapped by Check when the counter skips or repeats.
var ErrDiscontinuity = errors.New("counter discontinuity")

// Values returns the counter values found in log, in order. Lines that are
// not counter lines (kernel messages, other workloads) are ignored.
func Values(log []byte) []uint64 {
	var out []uint64
	sc := bufio.NewScanner(bytes.NewReader(log))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := bytes.TrimRight(sc.Bytes(), "\r")
		i := bytes.Index(line, []byte(Prefix))
		if i < 0 {
			continue
		}
		v, err := strconv.ParseUint(string(line[i+len(Prefix):]), 10, 64)
		if err != nil {
			continue
		}
		out = append(out, v)
	}
	return out
}

// Last returns the last counter value in log, or 0 if there is none.
func Last(log []byte) uint64 {
	v := Values(log)
	if len(v) == 0 {
		return 0
	}
	return v[len(v)-1]
}

// DiskPrefix starts the line the disk writer prints after each durable
// record.
const DiskPrefix = "ftguest disk seq="

// LastDiskSeq returns the last durable disk record the guest reported, or
// 0 if there is none.
func LastDiskSeq(log []byte) uint64 {
	var last uint64
	for _, line := range bytes.Split(log, []byte("\n")) {
		line = bytes.TrimRight(line, "\r")
		i := bytes.Index(line, []byte(DiskPrefix))
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseUint(string(line[i+len(DiskPrefix):]), 10, 64); err == nil {
			last = v
		}
	}
	return last
}

// Check verifies that the values count up by exactly one from the first to
// the last and returns the last value.
func Check(values []uint64) (uint64, error) {
	if len(values) == 0 {
		return 0, fmt.Errorf("%w: no counter lines", ErrDiscontinuity)
	}
	for i := 1; i < len(values); i++ {
		if values[i] != values[i-1]+1 {
			return 0, fmt.Errorf("%w: %d followed by %d (line %d)", ErrDiscontinuity, values[i-1], values[i], i+1)
		}
	}
	return values[len(values)-1], nil
}

// Stitch joins the primary's console up to a checkpoint with the console of
// the copy restored from it. A line the primary was half-way through when it
// paused is completed by the restored copy, so the bytes are joined, not the
// lines.
func Stitch(primaryAtCheckpoint, restored []byte) []byte {
	out := make([]byte, 0, len(primaryAtCheckpoint)+len(restored))
	out = append(out, primaryAtCheckpoint...)
	return append(out, restored...)
}
