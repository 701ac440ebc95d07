// Package eventlog owns the write-event log of the Forever mechanism: a
// backend wrapper that turns every completed WRITE, TRIM and WRITE_ZEROES
// into a sequenced, epoch-tagged, checksummed Record and streams it to a
// Sink as it happens; MarkEpoch closes an epoch (called while the VM is
// stopped). It also defines the records' wire form, used for staging files
// and the replication link, and a bounded in-memory Pipe.
package eventlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/cespare/xxhash/v2"
)

// Kind says what a Record does.
type Kind uint8

// Record kinds. Write, Trim and Zero are events that change the disk;
// EpochEnd closes an epoch; Commit is only written to staging files, to make
// a commit decision durable.
const (
	KindWrite Kind = iota + 1
	KindTrim
	KindZero
	KindEpochEnd
	KindCommit
)

func (k Kind) String() string {
	switch k {
	case KindWrite:
		return "write"
	case KindTrim:
		return "trim"
	case KindZero:
		return "write-zeroes"
	case KindEpochEnd:
		return "epoch-end"
	case KindCommit:
		return "commit"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// FlagNoHole on a KindZero record keeps the range allocated.
const FlagNoHole uint8 = 1

// Sentinel errors.
var (
	// ErrCorrupt means a record failed its checksum or its framing.
	ErrCorrupt = errors.New("corrupt event record")
	// ErrClosed means the stream or log was closed.
	ErrClosed = errors.New("event stream closed")
)

// Record is one item of the stream.
//
// For events (Write, Trim, Zero): Seq is the global sequence number (1, 2,
// ... without gaps across epochs), Epoch the epoch it belongs to, Offset and
// Length the byte range, Data the bytes of a Write (len(Data) == Length).
// For EpochEnd: Epoch is the closed epoch, Seq the last sequence number
// issued so far, Length the number of events in the epoch.
type Record struct {
	Kind   Kind
	Flags  uint8
	Seq    uint64
	Epoch  uint64
	Offset uint64
	Length uint64
	Data   []byte
	// Sum covers every field above and Data; Seal sets it, Verify checks it.
	Sum uint64
}

const (
	recMagic = 0x46544556 // "FTEV"
	// HeaderLen is the encoded size of a record without its data.
	HeaderLen = 52
	sumOff    = 44
	// MaxData bounds a record's data when decoding, so a corrupt length
	// cannot make a reader allocate without limit.
	MaxData = 64 << 20
)

func (r *Record) header(b []byte) {
	binary.BigEndian.PutUint32(b[0:], recMagic)
	b[4] = byte(r.Kind)
	b[5] = r.Flags
	b[6], b[7] = 0, 0
	binary.BigEndian.PutUint64(b[8:], r.Seq)
	binary.BigEndian.PutUint64(b[16:], r.Epoch)
	binary.BigEndian.PutUint64(b[24:], r.Offset)
	binary.BigEndian.PutUint64(b[32:], r.Length)
	binary.BigEndian.PutUint32(b[40:], uint32(len(r.Data)))
}

// sum hashes the header and a digest of the data; dataSum lets the expensive
// part be computed outside the log's ordering lock.
func (r *Record) sum(dataSum uint64) uint64 {
	var b [sumOff + 8]byte
	r.header(b[:])
	binary.BigEndian.PutUint64(b[sumOff:], dataSum)
	return xxhash.Sum64(b[:])
}

// Seal computes Sum.
func (r *Record) Seal() { r.Sum = r.sum(xxhash.Sum64(r.Data)) }

// Verify checks Sum and the record's internal consistency.
func (r *Record) Verify() error {
	if got := r.sum(xxhash.Sum64(r.Data)); got != r.Sum {
		return fmt.Errorf("%w: %s seq %d epoch %d: checksum %#x, record says %#x", ErrCorrupt, r.Kind, r.Seq, r.Epoch, got, r.Sum)
	}
	return r.check()
}

func (r *Record) check() error {
	switch r.Kind {
	case KindWrite:
		if uint64(len(r.Data)) != r.Length {
			return fmt.Errorf("%w: write seq %d has %d data bytes for length %d", ErrCorrupt, r.Seq, len(r.Data), r.Length)
		}
	case KindTrim, KindZero, KindEpochEnd, KindCommit:
		if len(r.Data) != 0 {
			return fmt.Errorf("%w: %s seq %d carries %d data bytes", ErrCorrupt, r.Kind, r.Seq, len(r.Data))
		}
	default:
		return fmt.Errorf("%w: unknown kind %d", ErrCorrupt, r.Kind)
	}
	if r.Flags&^FlagNoHole != 0 || (r.Flags != 0 && r.Kind != KindZero) {
		return fmt.Errorf("%w: %s seq %d has flags %#x", ErrCorrupt, r.Kind, r.Seq, r.Flags)
	}
	if r.Kind <= KindZero && r.Offset+r.Length < r.Offset {
		return fmt.Errorf("%w: %s seq %d range overflows", ErrCorrupt, r.Kind, r.Seq)
	}
	return nil
}

// IsEvent reports whether the record changes the disk.
func (r Record) IsEvent() bool { return r.Kind >= KindWrite && r.Kind <= KindZero }

// EncodedLen is the size of the wire form.
func (r Record) EncodedLen() int { return HeaderLen + len(r.Data) }

// AppendBinary appends the wire form: a 52-byte big-endian header (magic,
// kind, flags, seq, epoch, offset, length, data length, sum) and the data.
func (r *Record) AppendBinary(b []byte) []byte {
	var h [HeaderLen]byte
	r.header(h[:])
	binary.BigEndian.PutUint64(h[sumOff:], r.Sum)
	return append(append(b, h[:]...), r.Data...)
}

// WriteRecord writes the wire form to w.
func WriteRecord(w io.Writer, r *Record) error {
	var h [HeaderLen]byte
	r.header(h[:])
	binary.BigEndian.PutUint64(h[sumOff:], r.Sum)
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	_, err := w.Write(r.Data)
	return err
}

// ReadRecord reads and verifies one record. It returns io.EOF at a clean end
// of stream and an ErrCorrupt-wrapped error for anything malformed,
// including a stream cut inside a record.
func ReadRecord(rd io.Reader) (Record, error) {
	var h [HeaderLen]byte
	if _, err := io.ReadFull(rd, h[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return Record{}, fmt.Errorf("%w: stream ends inside a record header", ErrCorrupt)
		}
		return Record{}, err
	}
	r, n, err := decodeHeader(h[:])
	if err != nil {
		return Record{}, err
	}
	if n > 0 {
		r.Data = make([]byte, n)
		if _, err := io.ReadFull(rd, r.Data); err != nil {
			return Record{}, fmt.Errorf("%w: stream ends inside the %d data bytes of seq %d: %v", ErrCorrupt, n, r.Seq, err)
		}
	}
	return r, r.Verify()
}

// Decode parses one record from the front of b and returns the bytes used.
func Decode(b []byte) (Record, int, error) {
	if len(b) < HeaderLen {
		return Record{}, 0, fmt.Errorf("%w: %d bytes, a header needs %d", ErrCorrupt, len(b), HeaderLen)
	}
	r, n, err := decodeHeader(b)
	if err != nil {
		return Record{}, 0, err
	}
	if len(b)-HeaderLen < n {
		return Record{}, 0, fmt.Errorf("%w: record of seq %d needs %d data bytes, %d left", ErrCorrupt, r.Seq, n, len(b)-HeaderLen)
	}
	if n > 0 {
		r.Data = b[HeaderLen : HeaderLen+n : HeaderLen+n]
	}
	return r, HeaderLen + n, r.Verify()
}

func decodeHeader(h []byte) (Record, int, error) {
	if m := binary.BigEndian.Uint32(h); m != recMagic {
		return Record{}, 0, fmt.Errorf("%w: bad magic %#x", ErrCorrupt, m)
	}
	if h[6] != 0 || h[7] != 0 {
		return Record{}, 0, fmt.Errorf("%w: reserved header bytes %#x %#x are not zero", ErrCorrupt, h[6], h[7])
	}
	r := Record{
		Kind:   Kind(h[4]),
		Flags:  h[5],
		Seq:    binary.BigEndian.Uint64(h[8:]),
		Epoch:  binary.BigEndian.Uint64(h[16:]),
		Offset: binary.BigEndian.Uint64(h[24:]),
		Length: binary.BigEndian.Uint64(h[32:]),
		Sum:    binary.BigEndian.Uint64(h[sumOff:]),
	}
	n := binary.BigEndian.Uint32(h[40:])
	if n > MaxData {
		return Record{}, 0, fmt.Errorf("%w: seq %d claims %d data bytes, limit %d", ErrCorrupt, r.Seq, n, MaxData)
	}
	return r, int(n), nil
}
