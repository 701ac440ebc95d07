package lockstep

import (
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/cespare/xxhash/v2"
	"github.com/klauspost/compress/zstd"
)

// Device-state delta encoding.
//
// A checkpoint's device state (QEMU's x-ignore-shared migration stream,
// about 400 KB) is mostly ROM blocks and device models that do not change
// between checkpoints: at an idle guest a few dozen bytes differ. Both ends
// hold the previous checkpoint's state (the secondary commits epochs strictly
// in order and the primary's link dies with any loss), so the primary sends
// state N relative to state N-1 and the secondary rebuilds it before it
// stores it.
//
// Choice of codec, from BenchmarkDevStateCodecs on 20 states captured from
// a TCG guest (411 KB each; QEMU's save of one took 4.7 ms in the same run):
//
//	codec               bytes/ckpt  encode  decode
//	zstd (no base)         127 KB   2.5 ms  0.5 ms
//	XOR, then zstd           280 B  0.2 ms  0.4 ms
//	zstd, base as dict       275 B  4.5 ms  0.15 ms
//	XOR, shifted states       73 KB  1.9 ms  1.3 ms
//	dict, shifted states     285 B  4.1 ms  0.13 ms
//
// The dictionary costs 20 times the XOR because zstd indexes the 400 KB
// base anew for every base. XOR is the common case, but it fails when a
// section changes size and shifts what follows ("shifted": a 37-byte
// insertion), so a base of another length, or an XOR delta that
// compresses badly, goes through the dictionary, which finds shifted
// matches. The first checkpoint of a link has no base and is plain zstd.
// Encoding runs after the guest resumed but before the epoch is sent, so
// it adds to the output-commit latency: hence the cheap path first.
//
// The fuzz targets (FuzzDecodeDevState, FuzzDevStateRoundTrip) want
// -fuzzminimizetime 100x: minimising with the default budget stalls them.

// DevCodec names how a device-state payload is encoded.
type DevCodec uint8

// Device-state codecs.
const (
	// DevZstd is the whole state, zstd-compressed: no base.
	DevZstd DevCodec = 1
	// DevXORZstd is the state XORed with the base (same length), then
	// zstd-compressed.
	DevXORZstd DevCodec = 2
	// DevDictZstd is the state zstd-compressed with the base as a raw
	// dictionary.
	DevDictZstd DevCodec = 3
)

func (c DevCodec) String() string {
	switch c {
	case DevZstd:
		return "zstd"
	case DevXORZstd:
		return "xor+zstd"
	case DevDictZstd:
		return "dict+zstd"
	}
	return fmt.Sprintf("devcodec(%d)", uint8(c))
}

const (
	devStateVersion = 1
	devHeaderLen    = 1 + 1 + 8 + 8 + 4 + 8
	// maxDevState bounds a decoded device state, so a hostile payload
	// cannot make the secondary allocate more (QEMU's device state is a few
	// hundred KB; checkpoint refuses to save more than this too).
	maxDevState = 64 << 20
	// devDictID is the zstd dictionary id of the base: the header already
	// names the base (epoch and checksum), so one id serves.
	devDictID = 1
	// xorWorse: an XOR delta larger than 1/xorWorse of the state is taken as
	// a sign of shifted content, and the dictionary is tried as well.
	xorWorse = 32
)

// devHeader opens every device-state payload: what the secondary needs to
// rebuild the state and to verify that it did so exactly.
type devHeader struct {
	Codec     DevCodec
	BaseEpoch uint64 // epoch of the base state; 0: no base
	BaseSum   uint64 // xxhash64 of the base state; 0 without a base
	RawLen    uint32 // length of the decoded state
	Sum       uint64 // xxhash64 of the decoded state
}

func (h devHeader) appendTo(b []byte) []byte {
	b = append(b, devStateVersion, byte(h.Codec))
	b = binary.BigEndian.AppendUint64(b, h.BaseEpoch)
	b = binary.BigEndian.AppendUint64(b, h.BaseSum)
	b = binary.BigEndian.AppendUint32(b, h.RawLen)
	return binary.BigEndian.AppendUint64(b, h.Sum)
}

// parseDevHeader splits a device-state payload into its checked header and
// the encoded body.
func parseDevHeader(p []byte) (devHeader, []byte, error) {
	if len(p) < devHeaderLen {
		return devHeader{}, nil, fmt.Errorf("%w: device state payload of %d bytes is shorter than its %d-byte header", ErrProtocol, len(p), devHeaderLen)
	}
	if p[0] != devStateVersion {
		return devHeader{}, nil, fmt.Errorf("%w: device state format version %d, want %d", ErrProtocol, p[0], devStateVersion)
	}
	h := devHeader{
		Codec:     DevCodec(p[1]),
		BaseEpoch: binary.BigEndian.Uint64(p[2:]),
		BaseSum:   binary.BigEndian.Uint64(p[10:]),
		RawLen:    binary.BigEndian.Uint32(p[18:]),
		Sum:       binary.BigEndian.Uint64(p[22:]),
	}
	switch {
	case h.Codec != DevZstd && h.Codec != DevXORZstd && h.Codec != DevDictZstd:
		return h, nil, fmt.Errorf("%w: device state has unknown codec %d", ErrProtocol, p[1])
	case (h.Codec == DevZstd) != (h.BaseEpoch == 0):
		return h, nil, fmt.Errorf("%w: device state codec %v with base epoch %d", ErrProtocol, h.Codec, h.BaseEpoch)
	case h.RawLen == 0:
		return h, nil, fmt.Errorf("%w: empty device state", ErrProtocol)
	case h.RawLen > maxDevState:
		return h, nil, fmt.Errorf("%w: device state of %d bytes exceeds the %d MiB bound", ErrProtocol, h.RawLen, maxDevState>>20)
	}
	return h, p[devHeaderLen:], nil
}

// plainDecoder decodes the codecs that need no dictionary; DecodeAll is
// safe for concurrent use, so one serves every secondary of the process.
var plainDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil, devDecoderOptions()...)
})

func devDecoderOptions(extra ...zstd.DOption) []zstd.DOption {
	return append([]zstd.DOption{
		zstd.WithDecoderConcurrency(1),
		// Never decode past the header's length (DecodeAll is given a
		// buffer of exactly that capacity) nor use a bigger window.
		zstd.WithDecodeAllCapLimit(true),
		zstd.WithDecoderMaxMemory(maxDevState),
	}, extra...)
}

// decodeDevState rebuilds the device state of a payload parsed by
// parseDevHeader. base must be the state h.BaseEpoch names (nil when h has
// no base); it is checked against h.BaseSum first, and the result against
// h.RawLen and h.Sum, so what is returned is exactly what the primary
// captured. Every failure is an ErrProtocol.
func decodeDevState(h devHeader, body, base []byte) ([]byte, error) {
	if h.BaseEpoch != 0 {
		if base == nil {
			return nil, fmt.Errorf("%w: device state is relative to epoch %d, whose state is not here", ErrProtocol, h.BaseEpoch)
		}
		if s := xxhash.Sum64(base); s != h.BaseSum {
			return nil, fmt.Errorf("%w: device state base of epoch %d has checksum %016x, the primary's had %016x", ErrProtocol, h.BaseEpoch, s, h.BaseSum)
		}
	}
	dec, err := plainDecoder()
	if h.Codec == DevDictZstd {
		dec, err = zstd.NewReader(nil, devDecoderOptions(zstd.WithDecoderDictRaw(devDictID, base))...)
		if err == nil {
			defer dec.Close()
		}
	}
	if err != nil {
		return nil, fmt.Errorf("lockstep: device state decoder: %w", err)
	}
	if h.Codec == DevXORZstd && len(base) != int(h.RawLen) {
		return nil, fmt.Errorf("%w: XOR device state of %d bytes against a base of %d", ErrProtocol, h.RawLen, len(base))
	}
	// The zstd frame must announce what the header does before anything
	// is allocated for it.
	var zh zstd.Header
	if err := zh.Decode(body); err != nil {
		return nil, fmt.Errorf("%w: device state (%v): zstd frame header: %w", ErrProtocol, h.Codec, err)
	}
	wantDict := uint32(0)
	if h.Codec == DevDictZstd {
		wantDict = devDictID
	}
	switch {
	case zh.Skippable || !zh.HasFCS || zh.FrameContentSize != uint64(h.RawLen):
		return nil, fmt.Errorf("%w: device state (%v) of %d bytes in a zstd frame announcing %d (known %v)",
			ErrProtocol, h.Codec, h.RawLen, zh.FrameContentSize, zh.HasFCS && !zh.Skippable)
	case zh.DictionaryID != wantDict:
		return nil, fmt.Errorf("%w: device state (%v) in a zstd frame using dictionary %d", ErrProtocol, h.Codec, zh.DictionaryID)
	}
	out, err := dec.DecodeAll(body, make([]byte, 0, h.RawLen))
	if err != nil {
		return nil, fmt.Errorf("%w: device state (%v, %d bytes): %w", ErrProtocol, h.Codec, h.RawLen, err)
	}
	if len(out) != int(h.RawLen) {
		return nil, fmt.Errorf("%w: device state decoded to %d bytes, its header says %d", ErrProtocol, len(out), h.RawLen)
	}
	if h.Codec == DevXORZstd {
		subtle.XORBytes(out, out, base)
	}
	if s := xxhash.Sum64(out); s != h.Sum {
		return nil, fmt.Errorf("%w: decoded device state has checksum %016x, the primary's had %016x", ErrProtocol, s, h.Sum)
	}
	return out, nil
}

// devEncoder encodes each checkpoint's device state against the previous
// one it encoded; it belongs to one link, whose epochs are sent in the
// order they were encoded.
type devEncoder struct {
	plain *zstd.Encoder
	xor   []byte // scratch for XOR deltas

	baseEpoch uint64 // 0: no base yet
	base      []byte
	baseSum   uint64
}

func newDevEncoder() (*devEncoder, error) {
	// SpeedDefault: on these states it is both smaller and no slower than
	// SpeedFastest (the benchmark prints both).
	e, err := zstd.NewWriter(nil, devEncoderOptions()...)
	if err != nil {
		return nil, fmt.Errorf("lockstep: device state encoder: %w", err)
	}
	return &devEncoder{plain: e}, nil
}

// encode returns the payload of epoch's device state and makes state the
// base of the next call. state must not change afterwards.
func (e *devEncoder) encode(epoch uint64, state []byte) ([]byte, devHeader, error) {
	switch {
	case len(state) == 0:
		return nil, devHeader{}, fmt.Errorf("lockstep: empty device state for epoch %d", epoch)
	case len(state) > maxDevState:
		return nil, devHeader{}, fmt.Errorf("lockstep: device state of epoch %d has %d bytes, over the %d MiB bound", epoch, len(state), maxDevState>>20)
	case e.baseEpoch != 0 && epoch <= e.baseEpoch:
		return nil, devHeader{}, fmt.Errorf("lockstep: device state of epoch %d encoded after epoch %d", epoch, e.baseEpoch)
	}
	h := devHeader{RawLen: uint32(len(state)), Sum: xxhash.Sum64(state)}
	if e.baseEpoch != 0 {
		h.BaseEpoch, h.BaseSum = e.baseEpoch, e.baseSum
	}
	var out []byte
	switch {
	case e.baseEpoch == 0:
		h.Codec = DevZstd
		out = e.plain.EncodeAll(state, h.appendTo(make([]byte, 0, devHeaderLen+len(state)/2)))
	case len(state) == len(e.base):
		h.Codec = DevXORZstd
		e.xor = subtleXOR(e.xor, state, e.base)
		out = e.plain.EncodeAll(e.xor, h.appendTo(make([]byte, 0, 4096)))
		if len(out)-devHeaderLen > len(state)/xorWorse {
			d, err := e.dict(h, state)
			if err != nil {
				return nil, devHeader{}, err
			}
			if len(d) < len(out) {
				out, h.Codec = d, DevDictZstd
			}
		}
	default:
		d, err := e.dict(h, state)
		if err != nil {
			return nil, devHeader{}, err
		}
		out, h.Codec = d, DevDictZstd
	}
	e.baseEpoch, e.base, e.baseSum = epoch, state, h.Sum
	return out, h, nil
}

func devEncoderOptions(extra ...zstd.EOption) []zstd.EOption {
	return append([]zstd.EOption{
		zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderLevel(zstd.SpeedDefault),
		// A single segment always records the content size, which the
		// decoder checks against the header before it allocates.
		zstd.WithSingleSegment(true),
	}, extra...)
}

// dict encodes state with the base as a zstd raw dictionary. A new encoder
// per base: zstd indexes the dictionary on first use either way, and a
// reset encoder would index it twice.
func (e *devEncoder) dict(h devHeader, state []byte) ([]byte, error) {
	enc, err := zstd.NewWriter(nil, devEncoderOptions(zstd.WithEncoderDictRaw(devDictID, e.base))...)
	if err != nil {
		return nil, fmt.Errorf("lockstep: device state dictionary encoder: %w", err)
	}
	defer enc.Close()
	h.Codec = DevDictZstd
	return enc.EncodeAll(state, h.appendTo(make([]byte, 0, 4096))), nil
}

// subtleXOR sets dst to a XOR b (of equal lengths), reusing dst's memory.
func subtleXOR(dst, a, b []byte) []byte {
	if cap(dst) < len(a) {
		dst = make([]byte, len(a))
	}
	dst = dst[:len(a)]
	subtle.XORBytes(dst, a, b)
	return dst
}
