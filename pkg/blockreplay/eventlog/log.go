package eventlog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/cespare/xxhash/v2"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/internal/rangelock"
)

// Options set where a Log's numbering starts.
type Options struct {
	// Epoch is the first open epoch (default 1).
	Epoch uint64
	// LastSeq is the sequence number before the first event (default 0), so
	// a promoted replica can continue the numbering it replayed.
	LastSeq uint64
}

// Log is a backend.Backend that forwards every operation to an inner
// backend and streams each completed write-class operation to a Sink.
//
// Ordering: overlapping operations hold a FIFO range lock from before the
// inner write until their record is sent, so for any byte the record order
// equals the order the writes hit the image; a replica that applies records
// in sequence order ends up equal. Disjoint writes run in parallel and only
// meet at the short critical section that numbers and sends a record.
//
// Back-pressure: Send may block (a slow consumer); the write waits, nothing
// is dropped. If the sink fails, the log keeps serving the guest from the
// local image but stops streaming: Err reports the failure from then on and
// the replica needs a new initial sync.
type Log struct {
	inner backend.Backend
	sink  Sink
	locks rangelock.Locker

	// life bounds Send: a request's own context must not cancel a Send
	// whose write already reached the image, or the replica would miss it.
	life   context.Context
	cancel context.CancelFunc

	mu     sync.Mutex // numbers and sends records, one at a time
	seq    uint64
	epoch  uint64
	events uint64 // in the open epoch
	err    error
}

// ErrBroken wraps the sink failure that stopped streaming.
var ErrBroken = errors.New("event log stopped streaming")

// New wraps inner. Records go to sink in sequence order.
func New(inner backend.Backend, sink Sink, opt Options) *Log {
	if opt.Epoch == 0 {
		opt.Epoch = 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Log{inner: inner, sink: sink, life: ctx, cancel: cancel, epoch: opt.Epoch, seq: opt.LastSeq}
}

// Close fails any Send still blocked on back-pressure, which breaks the log.
// It does not close the inner backend or the sink.
func (l *Log) Close() error {
	l.cancel()
	return nil
}

// Err is the sink failure that stopped streaming, if any.
func (l *Log) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// Size implements backend.Backend.
func (l *Log) Size() int64 { return l.inner.Size() }

// ReadAt implements backend.Backend; reads are not logged.
func (l *Log) ReadAt(ctx context.Context, p []byte, off int64) error {
	return l.inner.ReadAt(ctx, p, off)
}

// Flush implements backend.Backend: the local image is durable on return.
func (l *Log) Flush(ctx context.Context) error { return l.inner.Flush(ctx) }

// WriteAt implements backend.Backend.
func (l *Log) WriteAt(ctx context.Context, p []byte, off int64, fl backend.Flags) error {
	return l.do(ctx, off, int64(len(p)), func() error { return l.inner.WriteAt(ctx, p, off, fl) },
		func() Record {
			d := getData(len(p))
			copy(d, p)
			return Record{Kind: KindWrite, Offset: uint64(off), Length: uint64(len(p)), Data: d}
		})
}

// Trim implements backend.Backend.
func (l *Log) Trim(ctx context.Context, off, n int64, fl backend.Flags) error {
	return l.do(ctx, off, n, func() error { return l.inner.Trim(ctx, off, n, fl) },
		func() Record { return Record{Kind: KindTrim, Offset: uint64(off), Length: uint64(n)} })
}

// WriteZeroes implements backend.Backend.
func (l *Log) WriteZeroes(ctx context.Context, off, n int64, fl backend.Flags) error {
	return l.do(ctx, off, n, func() error { return l.inner.WriteZeroes(ctx, off, n, fl) },
		func() Record {
			r := Record{Kind: KindZero, Offset: uint64(off), Length: uint64(n)}
			if fl&backend.NoHole != 0 {
				r.Flags = FlagNoHole
			}
			return r
		})
}

// do runs one write-class operation and logs it once it completed. A failed
// operation is not logged: the guest got an error, so the range's content
// is undefined to it either way.
func (l *Log) do(ctx context.Context, off, n int64, op func() error, rec func() Record) error {
	if err := backend.CheckRange(l.inner.Size(), off, n); err != nil {
		return err
	}
	if n == 0 {
		return op() // changes nothing: no event
	}
	t, err := l.locks.Lock(ctx, uint64(off), uint64(n))
	if err != nil {
		return err
	}
	defer t.Release()
	if err := op(); err != nil {
		return err
	}
	r := rec()
	l.emit(&r, xxhash.Sum64(r.Data))
	return nil
}

// emit numbers, seals and sends one event. Sink failures break the log
// rather than fail the guest's write, which already reached the image.
func (l *Log) emit(r *Record, dataSum uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return
	}
	l.seq++
	l.events++
	r.Seq, r.Epoch = l.seq, l.epoch
	r.Sum = r.sum(dataSum)
	if err := l.sink.Send(l.life, *r); err != nil {
		l.err = fmt.Errorf("%w: send seq %d: %w", ErrBroken, r.Seq, err)
	}
}

// MarkEpoch closes the open epoch: it sends an EpochEnd record and returns
// the closed epoch and the last sequence number in it. The lockstep layer
// calls it while the VM is stopped, when QEMU has drained all I/O, so the
// epoch holds exactly the writes issued before the stop.
func (l *Log) MarkEpoch(ctx context.Context) (epoch, lastSeq uint64, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return 0, 0, l.err
	}
	r := Record{Kind: KindEpochEnd, Seq: l.seq, Epoch: l.epoch, Length: l.events}
	r.Seal()
	if err := l.sink.Send(ctx, r); err != nil {
		// The epoch stays open; nothing was lost, the caller may retry.
		return 0, 0, fmt.Errorf("send end of epoch %d: %w", l.epoch, err)
	}
	l.epoch++
	l.events = 0
	return r.Epoch, r.Seq, nil
}

// Position is the open epoch and the last sequence number issued.
func (l *Log) Position() (epoch, lastSeq uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.epoch, l.seq
}

// CopyRange supports the initial sync: under the range lock it reads
// [off, off+len(buf)) from the local image and, unless it is all zeroes,
// streams it as a write event without writing anything locally. Holding the
// lock orders the copy against concurrent guest writes: any write that the
// copy missed gets a later sequence number and is replayed after it.
func (l *Log) CopyRange(ctx context.Context, off int64, buf []byte) (sent bool, err error) {
	if err := backend.CheckRange(l.inner.Size(), off, int64(len(buf))); err != nil {
		return false, err
	}
	t, err := l.locks.Lock(ctx, uint64(off), uint64(len(buf)))
	if err != nil {
		return false, err
	}
	defer t.Release()
	if err := l.inner.ReadAt(ctx, buf, off); err != nil {
		return false, err
	}
	if allZero(buf) {
		return false, nil
	}
	d := getData(len(buf))
	copy(d, buf)
	r := Record{Kind: KindWrite, Offset: uint64(off), Length: uint64(len(buf)), Data: d}
	l.emit(&r, xxhash.Sum64(r.Data))
	return true, l.Err()
}

// ZeroRemote streams a whole-disk zero event without touching the local
// image: the initial sync starts the replica from zeroes this way, ordered
// before every later write.
func (l *Log) ZeroRemote(ctx context.Context) error {
	size := l.inner.Size()
	t, err := l.locks.Lock(ctx, 0, uint64(size))
	if err != nil {
		return err
	}
	defer t.Release()
	r := Record{Kind: KindZero, Offset: 0, Length: uint64(size)}
	l.emit(&r, xxhash.Sum64(nil))
	return l.Err()
}

var zeroBlock = make([]byte, 64<<10)

// allZero compares against a zero block: bytes.Equal is vectorised.
func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
