package netbuf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Frame size bounds on QEMU's stream.
const (
	// HeaderSize is the length prefix before every frame on the stream.
	HeaderSize = 4
	// MinFrameSize is an Ethernet header: anything shorter cannot be a
	// frame, so a prefix announcing less is treated as a corrupt stream.
	MinFrameSize = 14
	// MaxFrameSize is QEMU's NET_BUFSIZE (64 KiB of payload plus 4 KiB of
	// headroom for headers), the largest packet its stream netdev accepts;
	// it covers 64 KiB GSO-sized frames.
	MaxFrameSize = 4096 + 65536
)

var (
	// ErrBadFrame is wrapped by every error about a malformed stream or a
	// frame of impossible size.
	ErrBadFrame = errors.New("netbuf: bad frame")
	// ErrClosed is returned by operations on a closed Buffer or Port.
	ErrClosed = errors.New("netbuf: closed")
	// ErrShortBuffer is wrapped by Port.ReadFrame when the next frame does
	// not fit the caller's buffer; that frame is consumed and lost.
	ErrShortBuffer = errors.New("netbuf: buffer too small for frame")
	// ErrInvalidOptions is wrapped by errors about bad arguments to New or
	// OpenTap; the message names the offending field.
	ErrInvalidOptions = errors.New("netbuf: invalid options")
)

// checkFrameSize reports whether n is a length a frame may have.
func checkFrameSize(n int) error {
	if n < MinFrameSize || n > MaxFrameSize {
		return fmt.Errorf("%w: length %d outside [%d, %d]", ErrBadFrame, n, MinFrameSize, MaxFrameSize)
	}
	return nil
}

// readStreamFrame reads one length-prefixed frame from r into a fresh slice
// of exactly the frame's size. A clean end of stream before a prefix is
// io.EOF; an end inside a prefix or a frame is io.ErrUnexpectedEOF wrapped
// in ErrBadFrame, since QEMU never leaves a frame half written on purpose.
func readStreamFrame(r io.Reader, hdr *[HeaderSize]byte) ([]byte, error) {
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: stream ended inside a length prefix: %w", ErrBadFrame, err)
		}
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxFrameSize {
		return nil, fmt.Errorf("%w: length prefix %d exceeds the maximum %d", ErrBadFrame, n, MaxFrameSize)
	}
	if err := checkFrameSize(int(n)); err != nil {
		return nil, err
	}
	frame := make([]byte, n)
	if _, err := io.ReadFull(r, frame); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: stream ended inside a %d-byte frame: %w", ErrBadFrame, n, io.ErrUnexpectedEOF)
		}
		return nil, err
	}
	return frame, nil
}

// appendStreamFrame appends frame with its length prefix to dst.
func appendStreamFrame(dst, frame []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(frame)))
	return append(dst, frame...)
}
