// Package diskrec owns the on-disk record format of the test guest's disk
// writer: fixed-size records that chain to their predecessor by hash, the
// writer that lays them out on a block device (wrapping around at its end),
// and Verify, which walks a device image and says how far the chain is
// unbroken.
//
// The chain makes lost, duplicated or stale writes visible after a failover:
// a record written after a rollback carries a fresh random payload, so a
// stale successor left on the disk no longer matches its predecessor's hash.
package diskrec

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Record layout (little endian), RecordSize bytes in all:
//
//	0    8  magic "FTDREC\r\n" (the CR LF catches text-mode mangling)
//	8    2  version
//	10   6  reserved, zero
//	16   8  seq (1, 2, 3, ...; never 0)
//	24   8  time of writing, Unix nanoseconds (informational only)
//	32  32  Prev: Sum of the record with seq-1, zero for seq 1
//	64  ..  random payload
//	4064 32 Sum: SHA-256 of bytes 0..4064
const (
	// RecordSize is the size of one record and the unit of every write.
	RecordSize = 4096
	// Version is the record format version this package writes and reads.
	Version = 1

	headerSize  = 64
	sumOffset   = RecordSize - sha256.Size
	payloadSize = sumOffset - headerSize
)

// PayloadSize is the number of random payload bytes in each record.
const PayloadSize = payloadSize

var magic = [8]byte{'F', 'T', 'D', 'R', 'E', 'C', '\r', '\n'}

// Sentinel errors; every error from this package wraps one of them.
var (
	// ErrCorrupt: a record carries the magic but its checksum, version or
	// fields are wrong, or it sits in a slot its seq does not belong to.
	ErrCorrupt = errors.New("diskrec: corrupt record")
	// ErrBrokenChain: a record is well formed but does not follow its
	// predecessor (prev-hash mismatch, gap, or a record beyond the head).
	ErrBrokenChain = errors.New("diskrec: broken chain")
	// ErrNotRecord: the block holds no record at all (zeroes or foreign
	// data without the magic). Verify treats such a slot as unwritten.
	ErrNotRecord = errors.New("diskrec: not a record")
	// ErrBadDevice: the device is too small or its size is not usable.
	ErrBadDevice = errors.New("diskrec: unusable device")
)

// Hash identifies a record: the SHA-256 checksum stored in its last bytes.
type Hash [sha256.Size]byte

// String renders the first bytes of the hash, enough for error messages.
func (h Hash) String() string { return fmt.Sprintf("%x", h[:8]) }

// Record is one decoded record.
type Record struct {
	Seq     uint64
	Time    int64 // Unix nanoseconds when written; not checked
	Prev    Hash  // Sum of the record with Seq-1; zero for Seq 1
	Payload []byte
	Sum     Hash // checksum of the encoded record, its identity in the chain
}

// Encode writes the record with the given fields into buf, which must be
// exactly RecordSize bytes, and returns the record's Sum. payload must be
// PayloadSize bytes.
func Encode(buf []byte, seq uint64, unixNano int64, prev Hash, payload []byte) (Hash, error) {
	if len(buf) != RecordSize {
		return Hash{}, fmt.Errorf("%w: encode buffer is %d bytes, want %d", ErrCorrupt, len(buf), RecordSize)
	}
	if len(payload) != PayloadSize {
		return Hash{}, fmt.Errorf("%w: payload is %d bytes, want %d", ErrCorrupt, len(payload), PayloadSize)
	}
	if seq == 0 {
		return Hash{}, fmt.Errorf("%w: seq 0 is reserved", ErrCorrupt)
	}
	copy(buf[0:8], magic[:])
	binary.LittleEndian.PutUint16(buf[8:10], Version)
	clear(buf[10:16])
	binary.LittleEndian.PutUint64(buf[16:24], seq)
	binary.LittleEndian.PutUint64(buf[24:32], uint64(unixNano))
	copy(buf[32:64], prev[:])
	copy(buf[headerSize:sumOffset], payload)
	sum := Hash(sha256.Sum256(buf[:sumOffset]))
	copy(buf[sumOffset:], sum[:])
	return sum, nil
}

// Decode parses one record. It returns an error wrapping ErrNotRecord when
// buf holds no record (all zero or no magic) and ErrCorrupt when it holds a
// damaged one. It never panics, whatever buf holds. The returned Payload
// aliases buf.
func Decode(buf []byte) (Record, error) {
	if len(buf) != RecordSize {
		return Record{}, fmt.Errorf("%w: block is %d bytes, want %d", ErrCorrupt, len(buf), RecordSize)
	}
	if !bytes.Equal(buf[0:8], magic[:]) {
		return Record{}, ErrNotRecord
	}
	if v := binary.LittleEndian.Uint16(buf[8:10]); v != Version {
		return Record{}, fmt.Errorf("%w: version %d, want %d", ErrCorrupt, v, Version)
	}
	var r Record
	copy(r.Sum[:], buf[sumOffset:])
	if Hash(sha256.Sum256(buf[:sumOffset])) != r.Sum {
		return Record{}, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	if !allZero(buf[10:16]) {
		return Record{}, fmt.Errorf("%w: reserved bytes not zero", ErrCorrupt)
	}
	r.Seq = binary.LittleEndian.Uint64(buf[16:24])
	if r.Seq == 0 {
		return Record{}, fmt.Errorf("%w: seq 0", ErrCorrupt)
	}
	r.Time = int64(binary.LittleEndian.Uint64(buf[24:32]))
	copy(r.Prev[:], buf[32:64])
	if r.Seq == 1 && r.Prev != (Hash{}) {
		return Record{}, fmt.Errorf("%w: seq 1 with non-zero prev hash", ErrCorrupt)
	}
	r.Payload = buf[headerSize:sumOffset]
	return r, nil
}

// Slots is the number of records a device of size bytes holds. Trailing
// bytes short of a whole record are never used.
func Slots(size int64) int64 { return size / RecordSize }

// Offset is the byte offset of the record with the given seq on a device
// with the given number of slots: records are laid out in seq order and wrap
// around to offset 0 after the last slot, so seq s lives in slot
// (s-1) mod slots. Both arguments must be positive.
func Offset(seq uint64, slots int64) int64 {
	return int64((seq-1)%uint64(slots)) * RecordSize
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
