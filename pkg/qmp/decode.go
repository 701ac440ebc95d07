package qmp

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"
)

// msgKind says what a decoded server message is.
type msgKind int

const (
	kindGreeting msgKind = iota + 1
	kindReturn
	kindError
	kindEvent
)

func (k msgKind) String() string {
	switch k {
	case kindGreeting:
		return "greeting"
	case kindReturn:
		return "reply"
	case kindError:
		return "error reply"
	case kindEvent:
		return "event"
	}
	return "unknown"
}

// message is one decoded line from the server.
type message struct {
	kind msgKind

	// id is the raw JSON id of a reply, nil when the reply had none.
	id json.RawMessage
	// ret is the "return" value of a successful reply.
	ret json.RawMessage
	// errClass and errDesc describe an error reply.
	errClass, errDesc string

	event Event

	greeting Greeting
}

// wireMsg mirrors every member a QMP server message may have; which ones are
// present decides the kind.
type wireMsg struct {
	QMP       *wireGreeting   `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *wireError      `json:"error"`
	ID        json.RawMessage `json:"id"`
	Event     *string         `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *wireTimestamp  `json:"timestamp"`
}

type wireGreeting struct {
	Version *struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
	Capabilities []string `json:"capabilities"`
}

type wireError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

type wireTimestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

// snippet quotes the start of a bad line for an error message, so the error
// names what was wrong without dumping megabytes.
func snippet(b []byte) string {
	const max = 96
	b = bytes.TrimSpace(b)
	if len(b) > max {
		return strconv.Quote(string(b[:max])) + fmt.Sprintf("... (%d bytes)", len(b))
	}
	return strconv.Quote(string(b))
}

// decodeMessage decodes one server line. Errors wrap ErrProtocol.
func decodeMessage(line []byte) (message, error) {
	var w wireMsg
	trimmed := bytes.TrimSpace(line)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return message{}, fmt.Errorf("%w: not a JSON object: %s", ErrProtocol, snippet(line))
	}
	if err := json.Unmarshal(trimmed, &w); err != nil {
		return message{}, fmt.Errorf("%w: bad JSON message %s: %v", ErrProtocol, snippet(line), err)
	}
	isNull := func(r json.RawMessage) bool { return len(r) == 0 || string(r) == "null" }

	kinds := 0
	var m message
	if w.QMP != nil {
		kinds++
		m.kind = kindGreeting
	}
	if !isNull(w.Return) {
		kinds++
		m.kind = kindReturn
	}
	if w.Error != nil {
		kinds++
		m.kind = kindError
	}
	if w.Event != nil {
		kinds++
		m.kind = kindEvent
	}
	switch kinds {
	case 0:
		return message{}, fmt.Errorf("%w: message is neither reply, event nor greeting: %s", ErrProtocol, snippet(line))
	case 1:
	default:
		return message{}, fmt.Errorf("%w: message mixes reply, event and greeting members: %s", ErrProtocol, snippet(line))
	}

	switch m.kind {
	case kindGreeting:
		if w.QMP.Version == nil {
			return message{}, fmt.Errorf("%w: greeting without version: %s", ErrProtocol, snippet(line))
		}
		v := w.QMP.Version
		m.greeting = Greeting{
			Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro,
			Package: v.Package, Capabilities: w.QMP.Capabilities,
		}
	case kindReturn:
		m.ret = w.Return
		if !isNull(w.ID) {
			m.id = w.ID
		}
	case kindError:
		if w.Error.Class == "" && w.Error.Desc == "" {
			return message{}, fmt.Errorf("%w: error reply without class or desc: %s", ErrProtocol, snippet(line))
		}
		m.errClass, m.errDesc = w.Error.Class, w.Error.Desc
		if !isNull(w.ID) {
			m.id = w.ID
		}
	case kindEvent:
		if *w.Event == "" {
			return message{}, fmt.Errorf("%w: event with empty name: %s", ErrProtocol, snippet(line))
		}
		m.event.Name = *w.Event
		if !isNull(w.Data) {
			m.event.Data = w.Data
		}
		if ts := w.Timestamp; ts != nil && ts.Seconds >= 0 && ts.Microseconds >= 0 && ts.Microseconds < 1e6 {
			m.event.Timestamp = time.Unix(ts.Seconds, ts.Microseconds*1000)
		}
	}
	return m, nil
}

// parseID turns a reply id into one of our request numbers. Ids are sent as
// plain JSON numbers; anything else was not sent by this client.
func parseID(raw json.RawMessage) (uint64, bool) {
	if len(raw) == 0 || len(raw) > 20 {
		return 0, false
	}
	for _, c := range raw {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseUint(string(raw), 10, 64)
	return n, err == nil
}

// lineReader splits the stream into newline-terminated messages of any
// length (up to max bytes when max > 0). QEMU emits exactly one JSON object
// per line, ending in "\r\n".
type lineReader struct {
	br  *bufio.Reader
	buf []byte
	max int
}

func newLineReader(r io.Reader, max int) *lineReader {
	return &lineReader{br: bufio.NewReaderSize(r, 64<<10), max: max}
}

// errTruncated reports a stream that ended in the middle of a message.
var errTruncated = errors.New("stream ended in the middle of a message")

// next returns the next non-blank line. The slice is valid until the next
// call. At end of stream it returns io.EOF (clean) or an error wrapping
// errTruncated; a line over the limit gives an error wrapping ErrProtocol.
func (r *lineReader) next() ([]byte, error) {
	// Let one huge message not pin its buffer for the connection's life.
	if cap(r.buf) > 1<<20 {
		r.buf = nil
	}
	for {
		r.buf = r.buf[:0]
		for {
			chunk, err := r.br.ReadSlice('\n')
			if r.max > 0 && len(r.buf)+len(chunk) > r.max {
				return nil, fmt.Errorf("%w: message longer than %d bytes", ErrProtocol, r.max)
			}
			r.buf = append(r.buf, chunk...)
			if err == bufio.ErrBufferFull {
				continue
			}
			if err != nil {
				if len(bytes.TrimSpace(r.buf)) > 0 {
					return nil, fmt.Errorf("%w after %d bytes: %w", errTruncated, len(r.buf), err)
				}
				return nil, err
			}
			break
		}
		if len(bytes.TrimSpace(r.buf)) > 0 {
			return r.buf, nil
		}
	}
}
