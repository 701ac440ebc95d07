package checker

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strconv"

	"github.com/cespare/xxhash/v2"
)

// The wire protocol of the test guest's TCP service (cmd/ftguest, workload
// tcp), in its checksummed mode:
//
//	client: "#sum v1\n"                 first line of a connection: opt in
//	server: "#sum v1 ok\n"
//	client: "<line>\n"                  any number of request lines
//	server: "seq=N sum=HHHHHHHHHHHHHHHH <line>\n"
//
// N counts requests over all connections of the server (1, 2, ...), so a
// reply numbered lower than one the client already saw comes from an older
// server state. H is the connection's running checksum after this request
// (see NextSum), in 16 lowercase hex digits, so a reply proves exactly which
// request lines, in which order, the server had taken from this connection.
// A connection that does not open with Hello gets the plain "seq=N <line>"
// replies older clients parse.
const (
	Hello      = "#sum v1"
	HelloReply = "#sum v1 ok"
)

// MaxLine bounds a request line (without its newline). The guest ends a
// connection that sends a longer one; the checker refuses replies longer
// than a line plus the reply's prefix.
const MaxLine = 64 << 10

// maxReply is the longest reply line a server following the protocol sends.
const maxReply = MaxLine + len("seq=18446744073709551615 sum=0123456789abcdef \n")

// NextSum chains one request line into a connection's running checksum:
//
//	sum(0) = 0
//	sum(i) = xxhash64( big-endian 8 bytes of sum(i-1) || line(i) )
//
// where line(i) is the i-th request line of the connection without its
// terminating "\n" and without a "\r" just before it. The previous sum has a
// fixed width, so the chain is unambiguous: two different sequences of
// lines give the same sum only by a 64-bit hash collision.
func NextSum(prev uint64, line []byte) uint64 {
	var d xxhash.Digest
	d.Reset()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], prev)
	d.Write(b[:])
	d.Write(line)
	return d.Sum64()
}

// AppendReply appends the checksummed reply to a request line, newline
// included, to dst.
func AppendReply(dst []byte, seq, sum uint64, line []byte) []byte {
	dst = append(dst, "seq="...)
	dst = strconv.AppendUint(dst, seq, 10)
	dst = append(dst, " sum="...)
	dst = appendHex16(dst, sum)
	dst = append(dst, ' ')
	dst = append(dst, line...)
	return append(dst, '\n')
}

func appendHex16(dst []byte, v uint64) []byte {
	const digits = "0123456789abcdef"
	for shift := 60; shift >= 0; shift -= 4 {
		dst = append(dst, digits[(v>>uint(shift))&0xf])
	}
	return dst
}

// Reply is one parsed checksummed reply.
type Reply struct {
	Seq  uint64 // the server's global request number
	Sum  uint64 // the connection's running checksum after this request
	Line []byte // the request line echoed back
}

// ParseReply parses one reply line, with or without its trailing newline.
// Anything but the exact format is an error wrapping ErrCorrupt.
func ParseReply(b []byte) (Reply, error) {
	b = bytes.TrimSuffix(b, []byte("\n"))
	rest, ok := bytes.CutPrefix(b, []byte("seq="))
	if !ok {
		return Reply{}, fmt.Errorf("%w: reply %.80q does not start with seq=", ErrCorrupt, b)
	}
	num, rest, ok := bytes.Cut(rest, []byte(" "))
	if !ok {
		return Reply{}, fmt.Errorf("%w: reply %.80q has nothing after seq", ErrCorrupt, b)
	}
	seq, err := strconv.ParseUint(string(num), 10, 64)
	if err != nil || seq == 0 || num[0] == '0' {
		return Reply{}, fmt.Errorf("%w: reply %.80q has a bad seq %.30q", ErrCorrupt, b, num)
	}
	hex, ok := bytes.CutPrefix(rest, []byte("sum="))
	if !ok || len(hex) < 17 || hex[16] != ' ' {
		return Reply{}, fmt.Errorf("%w: reply %.80q has no sum= field of 16 hex digits (a server without the %q mode?)", ErrCorrupt, b, Hello)
	}
	var sum uint64
	for _, c := range hex[:16] {
		var v byte
		switch {
		case c >= '0' && c <= '9':
			v = c - '0'
		case c >= 'a' && c <= 'f':
			v = c - 'a' + 10
		default:
			return Reply{}, fmt.Errorf("%w: reply %.80q has a bad sum %q", ErrCorrupt, b, hex[:16])
		}
		sum = sum<<4 | uint64(v)
	}
	return Reply{Seq: seq, Sum: sum, Line: hex[17:]}, nil
}
