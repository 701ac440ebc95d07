package netbuf

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzReadStreamFrame feeds arbitrary bytes to the stream decoder: it must
// never panic, every frame it returns must be in bounds, the frames it
// returns re-encode to a prefix of the input, and it must stop with io.EOF
// exactly at a frame boundary and with ErrBadFrame otherwise.
func FuzzReadStreamFrame(f *testing.F) {
	f.Add(appendStreamFrame(nil, mkFrame(1, 60)))
	f.Add(appendStreamFrame(appendStreamFrame(nil, mkFrame(1, 14)), mkFrame(2, 100)))
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0, 0, 0, 13, 1, 2})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 1, 0x10, 0x01})
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		var hdr [HeaderSize]byte
		var re []byte
		for {
			frame, err := readStreamFrame(r, &hdr)
			if err != nil {
				if !bytes.HasPrefix(in, re) {
					t.Fatal("decoded frames do not re-encode to a prefix of the input")
				}
				switch {
				case err == io.EOF:
					if len(re) != len(in) {
						t.Fatalf("clean EOF after %d of %d bytes", len(re), len(in))
					}
				case errors.Is(err, ErrBadFrame):
					if len(re) == len(in) {
						t.Fatal("ErrBadFrame at a clean end of stream")
					}
				default:
					t.Fatalf("unexpected error kind: %v", err)
				}
				return
			}
			if len(frame) < MinFrameSize || len(frame) > MaxFrameSize {
				t.Fatalf("decoded a %d-byte frame", len(frame))
			}
			re = appendStreamFrame(re, frame)
		}
	})
}
