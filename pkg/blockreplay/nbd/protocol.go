package nbd

import (
	"encoding/binary"
	"fmt"
)

// Wire constants from the NBD protocol document (doc/proto.md, with the INFO
// and WRITE_ZEROES extensions that are now part of it).
const (
	magicInit        = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt         = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply    = 0x3e889045565a9
	magicRequest     = 0x25609513
	magicSimpleReply = 0x67446698

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	// Transmission flags.
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8

	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8

	repAck          = 1
	repServer       = 2
	repInfo         = 3
	repErrUnsup     = 1<<31 + 1
	repErrInvalid   = 1<<31 + 3
	repErrUnknown   = 1<<31 + 6
	repErrShutdown  = 1<<31 + 7
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1

	// NBD error values (not host errno: the protocol fixes them).
	errPerm     = 1
	errIO       = 5
	errInval    = 22
	errNoSpc    = 28
	errShutdown = 108

	requestHeaderLen = 28
	// maxOptionLen bounds option data: names are at most 4096 bytes, plus a
	// few info requests. Longer options are a protocol violation.
	maxOptionLen = 16 << 10
	maxString    = 4096
)

// Request is one decoded transmission-phase request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// DecodeRequest parses a 28-byte request header. It only checks framing (the
// magic); the command's meaning is checked by Validate.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) < requestHeaderLen {
		return Request{}, fmt.Errorf("%w: request header is %d bytes, need %d", ErrProtocol, len(b), requestHeaderLen)
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return Request{}, fmt.Errorf("%w: bad request magic %#08x", ErrProtocol, m)
	}
	return Request{
		Flags:  binary.BigEndian.Uint16(b[4:6]),
		Type:   binary.BigEndian.Uint16(b[6:8]),
		Handle: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// Encode writes the request header into b (which must hold 28 bytes); it is
// the client side, used by tests and tools.
func (r Request) Encode(b []byte) {
	binary.BigEndian.PutUint32(b[0:4], magicRequest)
	binary.BigEndian.PutUint16(b[4:6], r.Flags)
	binary.BigEndian.PutUint16(b[6:8], r.Type)
	binary.BigEndian.PutUint64(b[8:16], r.Handle)
	binary.BigEndian.PutUint64(b[16:24], r.Offset)
	binary.BigEndian.PutUint32(b[24:28], r.Length)
}

// verdict is what the server does with a request before executing it.
type verdict struct {
	errno   uint32 // nonzero: reply with this error, do not execute
	payload bool   // a WRITE payload follows the header and must be consumed
	reason  string // why errno was chosen, for the log
}

// validate checks a request against the export. It never looks at the
// payload, so the caller can decide to discard it without buffering.
func validate(r Request, size uint64, maxLen uint32, readOnly bool) verdict {
	v := verdict{payload: r.Type == cmdWrite}
	fail := func(errno uint32, format string, args ...any) verdict {
		v.errno = errno
		v.reason = fmt.Sprintf(format, args...)
		return v
	}
	allowed := uint16(cmdFlagFUA) // FUA is valid on every command (proto.md)
	if r.Type == cmdWriteZeroes {
		allowed |= cmdFlagNoHole
	}
	switch r.Type {
	case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes, cmdFlush, cmdDisc:
	default:
		return fail(errInval, "unknown command %d", r.Type)
	}
	if r.Flags&^allowed != 0 {
		return fail(errInval, "command %d has unsupported flags %#x", r.Type, r.Flags&^allowed)
	}
	end := r.Offset + uint64(r.Length)
	inRange := end >= r.Offset && end <= size
	switch r.Type {
	case cmdRead:
		if r.Length > maxLen {
			return fail(errInval, "read of %d bytes exceeds the %d-byte request limit", r.Length, maxLen)
		}
		if !inRange {
			return fail(errInval, "read [%d,+%d) past the end of a %d-byte export", r.Offset, r.Length, size)
		}
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if readOnly {
			return fail(errPerm, "command %d on a read-only export", r.Type)
		}
		if r.Type == cmdWrite && r.Length > maxLen {
			return fail(errInval, "write of %d bytes exceeds the %d-byte request limit", r.Length, maxLen)
		}
		if !inRange {
			if r.Type == cmdTrim {
				return fail(errInval, "trim [%d,+%d) past the end of a %d-byte export", r.Offset, r.Length, size)
			}
			return fail(errNoSpc, "command %d [%d,+%d) past the end of a %d-byte export", r.Type, r.Offset, r.Length, size)
		}
	case cmdFlush:
		if r.Offset != 0 || r.Length != 0 {
			return fail(errInval, "flush with nonzero offset %d / length %d", r.Offset, r.Length)
		}
	}
	return v
}
