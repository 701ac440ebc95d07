package diskrec

import (
	"errors"
	"fmt"
	"io"
)

// Report describes the chain Verify found. When Verify returns an error,
// the report still describes the unbroken part of the chain that precedes
// the problem, starting at offset 0.
type Report struct {
	Slots      int64  // records the device can hold
	Records    int64  // records in the verified chain
	FirstSeq   uint64 // oldest seq of the chain, 0 if it is empty
	LastSeq    uint64 // newest seq of the unbroken chain, 0 if it is empty
	LastOffset int64  // byte offset of the LastSeq record, -1 if empty
	LastSum    Hash   // checksum of the LastSeq record, for Writer.Resume
	Wrapped    bool   // the writer has wrapped around the end at least once
}

// readChunk is how many slots Verify reads per ReadAt.
const readChunk = 64

// Verify walks a device image of size bytes written by a Writer and checks
// the chain: starting at offset 0, each record must be the successor of the
// one before it (seq+1 and Prev equal to the predecessor's Sum), and after
// the newest record (the head) the device must hold only unwritten slots or,
// once the writer has wrapped, the complete older lap of the same chain,
// whose last slot links to the record at offset 0. A slot without the magic
// counts as unwritten.
//
// It returns an error wrapping ErrCorrupt for a damaged record and
// ErrBrokenChain for a record that does not fit the chain, naming the
// offset and seqs involved.
func Verify(r io.ReaderAt, size int64) (Report, error) {
	rep := Report{Slots: Slots(size), LastOffset: -1}
	if rep.Slots < 2 {
		return rep, fmt.Errorf("%w: %d bytes hold %d records, need at least 2", ErrBadDevice, size, rep.Slots)
	}
	v := verifier{rep: &rep, n: rep.Slots}
	buf := make([]byte, min(readChunk, rep.Slots)*RecordSize)
	for first := int64(0); first < rep.Slots; first += readChunk {
		count := min(readChunk, rep.Slots-first)
		chunk := buf[:count*RecordSize]
		if n, err := r.ReadAt(chunk, first*RecordSize); n < len(chunk) {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return rep, fmt.Errorf("diskrec: read %d bytes at offset %d: %w", len(chunk), first*RecordSize, err)
		}
		for i := range count {
			if err := v.slot(first+i, chunk[i*RecordSize:(i+1)*RecordSize]); err != nil {
				return rep, err
			}
		}
	}
	return rep, v.finish()
}

type phase int

const (
	phaseHead  phase = iota // in the run of records starting at offset 0
	phaseEmpty              // after the head of a chain that never wrapped
	phaseLap                // after the head of a wrapped chain: the older lap
)

type verifier struct {
	rep      *Report
	n        int64
	phase    phase
	wrapPrev Hash // Prev of the record at offset 0
	lapSum   Hash // Sum of the last older-lap record seen
	lapLen   int64
	lapFirst uint64
}

func (v *verifier) slot(i int64, block []byte) error {
	off := i * RecordSize
	rec, err := Decode(block)
	isRec := err == nil
	if err != nil && !errors.Is(err, ErrNotRecord) {
		return fmt.Errorf("offset %d (after seq %d): %w", off, v.rep.LastSeq, err)
	}
	if isRec && (rec.Seq-1)%uint64(v.n) != uint64(i) {
		return fmt.Errorf("%w: record seq %d at offset %d belongs at offset %d", ErrCorrupt, rec.Seq, off, Offset(rec.Seq, v.n))
	}
	switch v.phase {
	case phaseHead:
		if i == 0 {
			if !isRec {
				v.phase = phaseEmpty
				return nil
			}
			v.wrapPrev = rec.Prev
			v.rep.Wrapped = rec.Seq > 1
			v.rep.FirstSeq = rec.Seq
			v.take(rec, off)
			return nil
		}
		switch {
		case !isRec:
			v.endHead()
		case rec.Seq == v.rep.LastSeq+1:
			if rec.Prev != v.rep.LastSum {
				return fmt.Errorf("%w: record seq %d at offset %d has prev hash %v, but seq %d has hash %v",
					ErrBrokenChain, rec.Seq, off, rec.Prev, v.rep.LastSeq, v.rep.LastSum)
			}
			v.take(rec, off)
			return nil
		case rec.Seq > v.rep.LastSeq+1:
			return fmt.Errorf("%w: record seq %d at offset %d follows seq %d", ErrBrokenChain, rec.Seq, off, v.rep.LastSeq)
		default:
			v.endHead()
		}
		return v.slot(i, block)
	case phaseEmpty:
		if isRec {
			return fmt.Errorf("%w: record seq %d at offset %d lies beyond the chain's head (seq %d)",
				ErrBrokenChain, rec.Seq, off, v.rep.LastSeq)
		}
		return nil
	default: // phaseLap
		want := v.rep.FirstSeq - uint64(v.n) + uint64(i) // v.rep.FirstSeq is the seq at offset 0 here
		if !isRec {
			return fmt.Errorf("%w: unwritten slot at offset %d inside the older lap of a wrapped chain (want seq %d)",
				ErrBrokenChain, off, want)
		}
		if rec.Seq != want {
			return fmt.Errorf("%w: record seq %d at offset %d, want seq %d of the older lap",
				ErrBrokenChain, rec.Seq, off, want)
		}
		if v.lapLen > 0 && rec.Prev != v.lapSum {
			return fmt.Errorf("%w: record seq %d at offset %d does not follow seq %d", ErrBrokenChain, rec.Seq, off, rec.Seq-1)
		}
		if v.lapLen == 0 {
			v.lapFirst = rec.Seq
		}
		v.lapSum = rec.Sum
		v.lapLen++
		return nil
	}
}

func (v *verifier) take(rec Record, off int64) {
	v.rep.LastSeq = rec.Seq
	v.rep.LastSum = rec.Sum
	v.rep.LastOffset = off
	v.rep.Records++
}

func (v *verifier) endHead() {
	if v.rep.Wrapped {
		v.phase = phaseLap
	} else {
		v.phase = phaseEmpty
	}
}

func (v *verifier) finish() error {
	if v.phase != phaseLap {
		// A wrapped head that fills the whole device has no older lap.
		return nil
	}
	if v.lapLen > 0 && v.lapSum != v.wrapPrev {
		return fmt.Errorf("%w: record seq %d at offset 0 does not follow seq %d at offset %d",
			ErrBrokenChain, v.rep.FirstSeq, v.rep.FirstSeq-1, (v.n-1)*RecordSize)
	}
	v.rep.Records += v.lapLen
	v.rep.FirstSeq = v.lapFirst
	return nil
}
