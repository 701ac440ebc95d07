package wire

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/cespare/xxhash/v2"
)

// The END frame's payload: digest algorithm u8 | frame count u64 |
// payload bytes u64 | digest u64. The digest is xxhash64 over, for every
// content frame of the epoch in order, type u8 | epoch u64 | length u64 |
// payload. It is not a MAC (TLS authenticates every byte); it proves that
// the epoch arrived whole: no frame lost, duplicated, reordered or borrowed
// from another epoch.
const (
	endLen        = 1 + 8 + 8 + 8
	digestXXHash  = 1
	frameDigestHd = 1 + 8 + 8
)

// DefaultMaxEpochBytes bounds the content an EpochReceiver holds for one
// epoch unless told otherwise.
const DefaultMaxEpochBytes = 2 << 30

type epochDigest struct {
	h      *xxhash.Digest
	frames uint64
	bytes  uint64
}

func newEpochDigest() *epochDigest { return &epochDigest{h: xxhash.New()} }

func (d *epochDigest) add(f Frame) {
	var hd [frameDigestHd]byte
	hd[0] = byte(f.Type)
	binary.BigEndian.PutUint64(hd[1:], f.Epoch)
	binary.BigEndian.PutUint64(hd[9:], uint64(len(f.Payload)))
	_, _ = d.h.Write(hd[:])
	_, _ = d.h.Write(f.Payload)
	d.frames++
	d.bytes += uint64(len(f.Payload))
}

func (d *epochDigest) end() []byte {
	b := make([]byte, endLen)
	b[0] = digestXXHash
	binary.BigEndian.PutUint64(b[1:], d.frames)
	binary.BigEndian.PutUint64(b[9:], d.bytes)
	binary.BigEndian.PutUint64(b[17:], d.h.Sum64())
	return b
}

// EpochSender sends the frames of consecutive epochs over a Conn and closes
// each with an END frame. It is used by one goroutine. After a failed send
// the link is torn and the EpochSender refuses further use: open a new link
// and a new EpochSender.
type EpochSender struct {
	c       Conn
	started bool
	open    bool
	epoch   uint64
	d       *epochDigest
	err     error
}

// NewEpochSender returns an EpochSender over c.
func NewEpochSender(c Conn) *EpochSender { return &EpochSender{c: c} }

// Begin opens epoch n. The first epoch may have any number; each later one
// must be the previous plus one (the receiver refuses gaps), and the
// previous one must have been ended.
func (s *EpochSender) Begin(n uint64) error {
	if s.err != nil {
		return s.err
	}
	if s.open {
		return fmt.Errorf("%w: begin epoch %d: epoch %d has not been ended", ErrInvalid, n, s.epoch)
	}
	if s.started && n != s.epoch+1 {
		return fmt.Errorf("%w: begin epoch %d: epochs must be consecutive and the last was %d", ErrInvalid, n, s.epoch)
	}
	s.started, s.open, s.epoch = true, true, n
	s.d = newEpochDigest()
	return nil
}

// Send sends one content frame (TypeManifest, TypeMemory, TypeDevState) of
// the open epoch. The payload may be reused once Send returns.
func (s *EpochSender) Send(ctx context.Context, t Type, payload []byte) error {
	if s.err != nil {
		return s.err
	}
	if !s.open {
		return fmt.Errorf("%w: send %s: no epoch is open (call Begin)", ErrInvalid, t)
	}
	if !t.InEpoch() || t == TypeEnd {
		return fmt.Errorf("%w: send %s: not an epoch content type", ErrInvalid, t)
	}
	f := Frame{Type: t, Epoch: s.epoch, Payload: payload}
	if err := s.c.Send(ctx, f); err != nil {
		return s.fail(err)
	}
	s.d.add(f)
	return nil
}

// End sends the END frame of the open epoch.
func (s *EpochSender) End(ctx context.Context) error {
	if s.err != nil {
		return s.err
	}
	if !s.open {
		return fmt.Errorf("%w: end: no epoch is open", ErrInvalid)
	}
	if err := s.c.Send(ctx, Frame{Type: TypeEnd, Epoch: s.epoch, Payload: s.d.end()}); err != nil {
		return s.fail(err)
	}
	s.open = false
	s.d = nil
	return nil
}

func (s *EpochSender) fail(err error) error {
	s.err = fmt.Errorf("epoch %d torn by a failed send: %w", s.epoch, err)
	return s.err
}

// Epoch is one complete, verified epoch: its content frames in the order
// they were sent (the END frame is not included).
type Epoch struct {
	N      uint64
	Frames []Frame
}

// EpochReceiver assembles epochs from a Conn. It is used by one goroutine.
// A torn epoch is never returned: its frames are dropped and Next fails with
// ErrTornEpoch (or the link's error), and keeps failing; the caller drops the
// link and stays on its last committed epoch.
type EpochReceiver struct {
	// MaxEpochBytes bounds the content bytes held for one epoch before its
	// END; a larger epoch is refused as torn. Zero means
	// DefaultMaxEpochBytes.
	MaxEpochBytes uint64

	c        Conn
	haveLast bool
	last     uint64
	cur      *Epoch
	d        *epochDigest
	err      error
}

// NewEpochReceiver returns an EpochReceiver over c that accepts any epoch
// number first; see ResumeAfter.
func NewEpochReceiver(c Conn) *EpochReceiver { return &EpochReceiver{c: c} }

// ResumeAfter makes the receiver expect epoch last+1 next, refusing older
// (replayed) and later (skipped) epochs. A secondary calls it with its last
// committed epoch when a new link opens.
func (r *EpochReceiver) ResumeAfter(last uint64) {
	r.haveLast, r.last = true, last
}

// Last returns the number of the last epoch Next returned (or set by
// ResumeAfter); ok is false before any.
func (r *EpochReceiver) Last() (n uint64, ok bool) { return r.last, r.haveLast }

// Next returns either a complete verified epoch (ep != nil) or an
// out-of-band frame (oob != nil: TypeBlock, TypeAck, TypeHeartbeat,
// TypeControl), which may arrive in the middle of an epoch. If ctx ends, Next returns its error
// and the partial epoch is kept for the next call.
func (r *EpochReceiver) Next(ctx context.Context) (ep *Epoch, oob *Frame, err error) {
	if r.err != nil {
		return nil, nil, r.err
	}
	limit := r.MaxEpochBytes
	if limit == 0 {
		limit = DefaultMaxEpochBytes
	}
	for {
		f, err := r.c.Recv(ctx)
		if err != nil {
			if isCtxErr(err) {
				return nil, nil, err
			}
			return nil, nil, r.fail(err)
		}
		if !f.Type.InEpoch() {
			return nil, &f, nil
		}
		if r.cur == nil {
			if r.haveLast && f.Epoch <= r.last {
				return nil, nil, r.fail(fmt.Errorf("%w: %s frame of epoch %d, but epoch %d is already complete (replayed or stale epoch)",
					ErrTornEpoch, f.Type, f.Epoch, r.last))
			}
			if r.haveLast && f.Epoch != r.last+1 {
				return nil, nil, r.fail(fmt.Errorf("%w: epoch jumps from %d to %d", ErrTornEpoch, r.last, f.Epoch))
			}
			r.cur = &Epoch{N: f.Epoch}
			r.d = newEpochDigest()
		} else if f.Epoch != r.cur.N {
			return nil, nil, r.fail(fmt.Errorf("%w: %s frame of epoch %d before the END of epoch %d",
				ErrTornEpoch, f.Type, f.Epoch, r.cur.N))
		}
		if f.Type == TypeEnd {
			if err := r.verifyEnd(f); err != nil {
				return nil, nil, r.fail(err)
			}
			ep := r.cur
			r.haveLast, r.last = true, ep.N
			r.cur, r.d = nil, nil
			return ep, nil, nil
		}
		if r.d.bytes+uint64(len(f.Payload)) > limit {
			return nil, nil, r.fail(fmt.Errorf("%w: epoch %d exceeds %d bytes before its END", ErrTornEpoch, r.cur.N, limit))
		}
		r.d.add(f)
		r.cur.Frames = append(r.cur.Frames, f)
	}
}

func (r *EpochReceiver) verifyEnd(f Frame) error {
	p := f.Payload
	if len(p) != endLen {
		return fmt.Errorf("%w: END of epoch %d has a %d-byte payload, want %d", ErrCorrupt, f.Epoch, len(p), endLen)
	}
	if p[0] != digestXXHash {
		return fmt.Errorf("%w: END of epoch %d uses unknown digest algorithm %d", ErrCorrupt, f.Epoch, p[0])
	}
	frames := binary.BigEndian.Uint64(p[1:])
	bytes := binary.BigEndian.Uint64(p[9:])
	sum := binary.BigEndian.Uint64(p[17:])
	if frames != r.d.frames {
		return fmt.Errorf("%w: END of epoch %d counts %d frames, %d arrived", ErrTornEpoch, f.Epoch, frames, r.d.frames)
	}
	if bytes != r.d.bytes {
		return fmt.Errorf("%w: END of epoch %d counts %d payload bytes, %d arrived", ErrTornEpoch, f.Epoch, bytes, r.d.bytes)
	}
	if got := r.d.h.Sum64(); got != sum {
		return fmt.Errorf("%w: digest of epoch %d does not match its END (computed %#016x, END says %#016x)",
			ErrTornEpoch, f.Epoch, got, sum)
	}
	return nil
}

func (r *EpochReceiver) fail(err error) error {
	if r.cur != nil {
		err = fmt.Errorf("epoch %d discarded: %w", r.cur.N, err)
	}
	r.cur, r.d = nil, nil
	r.err = err
	return err
}
