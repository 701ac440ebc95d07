package diskrec

import (
	"crypto/rand"
	"fmt"
	"io"
	"time"
	"unsafe"
)

// Device is where a Writer puts records: a block device or a file. Sync
// must make completed writes durable (fdatasync for a block device).
type Device interface {
	io.WriterAt
	Sync() error
}

// Writer appends chained records to a Device, one RecordSize write per
// record followed by Sync. Record seq s goes to Offset(s, slots): after the
// last slot the writer wraps to offset 0 and overwrites the oldest record,
// so the device always holds the newest Slots(size) records as one chain.
// A Writer is not safe for concurrent use.
type Writer struct {
	dev   Device
	slots int64
	next  uint64 // seq of the next record
	prev  Hash   // Sum of record next-1
	buf   []byte // RecordSize bytes, aligned for O_DIRECT
	pay   []byte
	rand  io.Reader
	now   func() time.Time
}

// NewWriter returns a Writer that starts a new chain at seq 1 on a device of
// size bytes. The device must hold at least two records, so that a wrapped
// chain still links its newest record to an older one.
func NewWriter(dev Device, size int64) (*Writer, error) {
	if dev == nil {
		return nil, fmt.Errorf("%w: nil device", ErrBadDevice)
	}
	slots := Slots(size)
	if slots < 2 {
		return nil, fmt.Errorf("%w: %d bytes hold %d records, need at least 2 (%d bytes)", ErrBadDevice, size, slots, 2*RecordSize)
	}
	return &Writer{
		dev:   dev,
		slots: slots,
		next:  1,
		buf:   alignedBlock(),
		pay:   make([]byte, PayloadSize),
		rand:  rand.Reader,
		now:   time.Now,
	}, nil
}

// Resume makes the writer continue an existing chain whose newest record has
// seq last and checksum sum, as reported by Verify (Report.LastSeq,
// Report.LastSum). last 0 starts a new chain.
func (w *Writer) Resume(last uint64, sum Hash) {
	w.next = last + 1
	w.prev = sum
	if last == 0 {
		w.prev = Hash{}
	}
}

// Next is the seq the next Write will write.
func (w *Writer) Next() uint64 { return w.next }

// Write writes the next record with a fresh random payload, syncs the
// device, and returns the record's seq once it is durable. On error the
// writer stays at the same seq, so a retry rewrites the same slot.
func (w *Writer) Write() (uint64, error) {
	if _, err := io.ReadFull(w.rand, w.pay); err != nil {
		return 0, fmt.Errorf("diskrec: random payload: %w", err)
	}
	seq := w.next
	sum, err := Encode(w.buf, seq, w.now().UnixNano(), w.prev, w.pay)
	if err != nil {
		return 0, err
	}
	off := Offset(seq, w.slots)
	if _, err := w.dev.WriteAt(w.buf, off); err != nil {
		return 0, fmt.Errorf("diskrec: write seq %d at offset %d: %w", seq, off, err)
	}
	if err := w.dev.Sync(); err != nil {
		return 0, fmt.Errorf("diskrec: sync after seq %d at offset %d: %w", seq, off, err)
	}
	w.prev = sum
	w.next++
	return seq, nil
}

// alignedBlock returns a RecordSize slice whose start is RecordSize-aligned
// in memory, as O_DIRECT writes require.
func alignedBlock() []byte {
	b := make([]byte, 2*RecordSize)
	skip := int(-uintptr(unsafe.Pointer(&b[0])) & (RecordSize - 1))
	return b[skip : skip+RecordSize : skip+RecordSize]
}
