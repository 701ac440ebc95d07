package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Sentinel errors. Every error returned by this package that is not a
// context error wraps one of these (or a context error), and names what was
// wrong.
var (
	// ErrCorrupt means the byte stream is not a valid frame stream: bad
	// magic, bad CRC, bad length, unknown type or flags, truncation, or a
	// frame that is not allowed at this point.
	ErrCorrupt = errors.New("wire: corrupt stream")
	// ErrVersion means the peer speaks another protocol version.
	ErrVersion = errors.New("wire: protocol version mismatch")
	// ErrAuth means the peer failed authentication, or refused ours.
	ErrAuth = errors.New("wire: authentication failed")
	// ErrTornEpoch means an epoch did not arrive whole and in order: an END
	// whose count or digest does not match, an epoch number that jumps or
	// goes back, or frames of two epochs mixed.
	ErrTornEpoch = errors.New("wire: torn epoch")
	// ErrClosed means the link was closed, locally or by the peer, or lost.
	ErrClosed = errors.New("wire: link closed")
	// ErrInvalid means the caller asked for something the protocol does not
	// allow (an unknown type, an oversized payload, epochs out of order).
	ErrInvalid = errors.New("wire: invalid request")
)

// Type says what a frame carries. Values are grouped so the space stays
// open: 1–15 handshake, 16–31 epoch content, 32–63 out-of-band. A peer
// refuses types it does not know (ErrCorrupt); new types come with a new
// protocol version.
type Type uint8

// Frame types.
const (
	// TypeHello opens a link (version agreement); consumed by Dial/Accept.
	TypeHello Type = 1
	// TypeAuth carries the pre-shared-key exchange; consumed by Dial/Accept.
	TypeAuth Type = 2

	// TypeManifest describes an epoch (pkg/lockstep); it opens the epoch.
	TypeManifest Type = 16
	// TypeMemory carries encoded dirty pages of an epoch (pkg/memsync).
	TypeMemory Type = 17
	// TypeDevState carries the device state of an epoch.
	TypeDevState Type = 18
	// TypeEnd closes an epoch; its payload is written by EpochSender.
	TypeEnd Type = 19

	// TypeAck acknowledges that the epoch in Frame.Epoch is committed.
	TypeAck Type = 32
	// TypeHeartbeat proves liveness; either direction.
	TypeHeartbeat Type = 33
	// TypeControl carries switchover and other control messages.
	TypeControl Type = 34
	// TypeBlock carries block write events (pkg/blockreplay). They stream
	// as the guest writes, not as part of an epoch: the records carry their
	// own epoch marks and checksums, and the link's ordering puts every
	// event sent before an epoch's END ahead of it.
	TypeBlock Type = 35
)

// String names the type for error messages.
func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeAuth:
		return "auth"
	case TypeManifest:
		return "manifest"
	case TypeMemory:
		return "memory"
	case TypeDevState:
		return "devstate"
	case TypeBlock:
		return "block"
	case TypeEnd:
		return "end"
	case TypeAck:
		return "ack"
	case TypeHeartbeat:
		return "heartbeat"
	case TypeControl:
		return "control"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Known reports whether this protocol version defines t.
func (t Type) Known() bool {
	switch t {
	case TypeHello, TypeAuth, TypeManifest, TypeMemory, TypeDevState, TypeEnd,
		TypeAck, TypeHeartbeat, TypeControl, TypeBlock:
		return true
	}
	return false
}

// InEpoch reports whether frames of type t belong to an epoch (content or
// END) rather than being out-of-band.
func (t Type) InEpoch() bool { return t.Known() && t >= 16 && t < 32 }

// handshake reports whether t is only valid while a link is being opened.
func (t Type) handshake() bool { return t == TypeHello || t == TypeAuth }

// Frame is one message on the link. For epoch frames Epoch is the epoch they
// belong to; for TypeAck the acknowledged epoch; otherwise free for the
// sender's use.
type Frame struct {
	Type    Type
	Epoch   uint64
	Payload []byte
}

// Encoding constants.
const (
	// Version is the protocol version this package speaks.
	Version = 1
	// MaxPayload bounds a frame's payload; larger lengths are refused
	// before anything is allocated.
	MaxPayload = 64 << 20
	// HeaderLen is the encoded size of a frame header.
	HeaderLen = 20
	// TrailerLen is the encoded size of the CRC after the payload.
	TrailerLen = 4

	magic = 0x46545752 // "FTWR"
	// handshakeMaxPayload bounds frames read before the peer is
	// authenticated, so an unauthenticated peer cannot make us allocate.
	handshakeMaxPayload = 4 << 10
	// firstChunk is how much payload is allocated before any of it has
	// arrived; the buffer grows as bytes really come, so a truncated
	// stream claiming a huge frame costs little memory.
	firstChunk = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// EncodedLen is the number of bytes f takes on the stream.
func (f Frame) EncodedLen() int { return HeaderLen + len(f.Payload) + TrailerLen }

// check refuses frames this package must not put on the stream.
func (f Frame) check() error {
	if !f.Type.Known() {
		return fmt.Errorf("%w: unknown frame type %d", ErrInvalid, uint8(f.Type))
	}
	if len(f.Payload) > MaxPayload {
		return fmt.Errorf("%w: %s payload of %d bytes exceeds the %d-byte limit",
			ErrInvalid, f.Type, len(f.Payload), MaxPayload)
	}
	return nil
}

func putHeader(h *[HeaderLen]byte, f Frame) {
	binary.BigEndian.PutUint32(h[0:], magic)
	h[4] = Version
	h[5] = byte(f.Type)
	h[6] = 0 // flags: none defined in version 1
	h[7] = 0
	binary.BigEndian.PutUint64(h[8:], f.Epoch)
	binary.BigEndian.PutUint32(h[16:], uint32(len(f.Payload)))
}

// AppendFrame appends the encoding of f to dst. It is meant for tests and
// tools that build raw streams; Conns encode internally.
func AppendFrame(dst []byte, f Frame) ([]byte, error) {
	if err := f.check(); err != nil {
		return dst, err
	}
	var h [HeaderLen]byte
	putHeader(&h, f)
	crc := crc32.Update(0, castagnoli, h[:])
	crc = crc32.Update(crc, castagnoli, f.Payload)
	dst = append(dst, h[:]...)
	dst = append(dst, f.Payload...)
	return binary.BigEndian.AppendUint32(dst, crc), nil
}

// Encoder writes frames to a byte stream.
type Encoder struct {
	w io.Writer
}

// NewEncoder returns an Encoder writing to w. Each WriteFrame makes up to
// three Write calls (header, payload, trailer), so wrap w in a buffer that
// is flushed per frame when small writes are costly.
func NewEncoder(w io.Writer) *Encoder { return &Encoder{w: w} }

// WriteFrame encodes f. The payload is not retained.
func (e *Encoder) WriteFrame(f Frame) error {
	if err := f.check(); err != nil {
		return err
	}
	var h [HeaderLen]byte
	putHeader(&h, f)
	crc := crc32.Update(0, castagnoli, h[:])
	crc = crc32.Update(crc, castagnoli, f.Payload)
	if _, err := e.w.Write(h[:]); err != nil {
		return err
	}
	if len(f.Payload) > 0 {
		if _, err := e.w.Write(f.Payload); err != nil {
			return err
		}
	}
	var t [TrailerLen]byte
	binary.BigEndian.PutUint32(t[:], crc)
	_, err := e.w.Write(t[:])
	return err
}

// Decoder reads frames from a byte stream. It is resumable: when the
// underlying Read fails with an error that is not end-of-stream (a deadline,
// say), ReadFrame returns that error and the next call continues the same
// frame. Stream errors (ErrCorrupt, ErrVersion) are final.
type Decoder struct {
	r   io.Reader
	max uint32

	hdr     [HeaderLen]byte
	hn      int
	parsed  bool
	f       Frame
	plen    int
	payload []byte // len = bytes received so far
	trl     [TrailerLen]byte
	tn      int
	err     error // final error, returned forever
}

// NewDecoder returns a Decoder reading from r that refuses payloads longer
// than maxPayload (clamped to MaxPayload; 0 means MaxPayload).
func NewDecoder(r io.Reader, maxPayload int) *Decoder {
	d := &Decoder{r: r}
	d.SetMaxPayload(maxPayload)
	return d
}

// SetMaxPayload changes the payload bound for frames not yet started.
func (d *Decoder) SetMaxPayload(n int) {
	if n <= 0 || n > MaxPayload {
		n = MaxPayload
	}
	d.max = uint32(n)
}

func (d *Decoder) fail(err error) error {
	d.err = err
	return err
}

// ReadFrame returns the next frame whose CRC verified. A clean end of stream
// between frames returns io.EOF; end of stream inside a frame returns an
// ErrCorrupt that also wraps io.ErrUnexpectedEOF. The returned payload is
// freshly allocated and owned by the caller.
func (d *Decoder) ReadFrame() (Frame, error) {
	if d.err != nil {
		return Frame{}, d.err
	}
	for d.hn < HeaderLen {
		n, err := d.r.Read(d.hdr[d.hn:])
		d.hn += n
		if d.hn == HeaderLen {
			break
		}
		if err == io.EOF {
			if d.hn == 0 {
				return Frame{}, io.EOF // stream ended between frames; not final
			}
			return Frame{}, d.fail(fmt.Errorf("%w: stream ended inside a frame header (%d of %d bytes): %w",
				ErrCorrupt, d.hn, HeaderLen, io.ErrUnexpectedEOF))
		}
		if err != nil {
			return Frame{}, err
		}
	}
	if !d.parsed {
		if err := d.parseHeader(); err != nil {
			return Frame{}, d.fail(err)
		}
	}
	for len(d.payload) < d.plen {
		if len(d.payload) == cap(d.payload) {
			// Grow only as data really arrives: a claimed length costs
			// memory only once its bytes are on the stream.
			c := max(min(2*cap(d.payload), d.plen), min(firstChunk, d.plen))
			nb := make([]byte, len(d.payload), c)
			copy(nb, d.payload)
			d.payload = nb
		}
		n, err := d.r.Read(d.payload[len(d.payload):cap(d.payload)])
		d.payload = d.payload[:len(d.payload)+n]
		if len(d.payload) == d.plen {
			break
		}
		if err == io.EOF {
			return Frame{}, d.fail(fmt.Errorf("%w: stream ended inside the payload of a %s frame of epoch %d (%d of %d bytes): %w",
				ErrCorrupt, d.f.Type, d.f.Epoch, len(d.payload), d.plen, io.ErrUnexpectedEOF))
		}
		if err != nil {
			return Frame{}, err
		}
	}
	for d.tn < TrailerLen {
		n, err := d.r.Read(d.trl[d.tn:])
		d.tn += n
		if d.tn == TrailerLen {
			break
		}
		if err == io.EOF {
			return Frame{}, d.fail(fmt.Errorf("%w: stream ended inside the CRC of a %s frame of epoch %d: %w",
				ErrCorrupt, d.f.Type, d.f.Epoch, io.ErrUnexpectedEOF))
		}
		if err != nil {
			return Frame{}, err
		}
	}
	want := binary.BigEndian.Uint32(d.trl[:])
	got := crc32.Update(crc32.Update(0, castagnoli, d.hdr[:]), castagnoli, d.payload)
	if got != want {
		return Frame{}, d.fail(fmt.Errorf("%w: CRC32C mismatch on a %s frame of epoch %d with %d payload bytes (computed %#08x, frame says %#08x)",
			ErrCorrupt, d.f.Type, d.f.Epoch, d.plen, got, want))
	}
	f := d.f
	f.Payload = d.payload
	if f.Payload == nil {
		f.Payload = []byte{}
	}
	d.hn, d.parsed, d.payload, d.tn, d.plen = 0, false, nil, 0, 0
	return f, nil
}

func (d *Decoder) parseHeader() error {
	h := &d.hdr
	if m := binary.BigEndian.Uint32(h[0:]); m != magic {
		return fmt.Errorf("%w: bad magic %#08x (want %#08x \"FTWR\"); the peer is not an ftctl wire endpoint or the stream lost sync",
			ErrCorrupt, m, magic)
	}
	if h[4] != Version {
		return fmt.Errorf("%w: frame of protocol version %d, this agent speaks version %d", ErrVersion, h[4], Version)
	}
	t := Type(h[5])
	if !t.Known() {
		return fmt.Errorf("%w: unknown frame type %d", ErrCorrupt, h[5])
	}
	if h[6] != 0 || h[7] != 0 {
		return fmt.Errorf("%w: %s frame with unknown flags %#02x/%#02x", ErrCorrupt, t, h[6], h[7])
	}
	n := binary.BigEndian.Uint32(h[16:])
	epoch := binary.BigEndian.Uint64(h[8:])
	if n > d.max {
		return fmt.Errorf("%w: %s frame of epoch %d claims a %d-byte payload, above the %d-byte limit",
			ErrCorrupt, t, epoch, n, d.max)
	}
	d.f = Frame{Type: t, Epoch: epoch}
	d.plen = int(n)
	d.parsed = true
	return nil
}
