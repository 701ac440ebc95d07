// Package qmp owns ftctl's QEMU Machine Protocol client: the connection to a
// QEMU monitor socket, the capabilities handshake, concurrent commands matched
// to their replies by request id, asynchronous events fanned out to buffered
// subscriber channels, file-descriptor passing with SCM_RIGHTS, and typed
// helpers for the commands the checkpoint loop needs (stop, cont, migration,
// fd handling, announce-self, quit).
//
// # Concurrency
//
// A Client is safe for use by many goroutines. Writes are serialised by one
// lock; one reader goroutine decodes the stream and hands each reply to the
// caller waiting for its id. Events are delivered with non-blocking sends, so
// a slow subscriber loses events (counted by DroppedEvents) but never delays a
// command reply.
//
// # Failure model
//
// Every call takes a context. A call whose context ends before the reply
// returns the context's error and forgets its request; if the reply arrives
// later it is ignored. When the connection ends (EOF, Close, a write that was
// cut in half) every pending and future call fails with an error wrapping
// ErrClosed.
//
// Anything from the server that is not a well-formed QMP message - a line
// that is not a JSON object, a reply with an id this client never sent, a
// reply without an id, a second greeting - is fatal: the client closes the
// connection and Err reports an error wrapping both ErrProtocol (naming what
// was wrong) and ErrClosed. After a framing error the stream cannot be
// trusted to line up with our requests any more, and guessing would risk
// giving one caller another caller's reply. A reply whose payload does not fit
// the caller's result type is not fatal: that call fails with ErrProtocol and
// the connection stays up.
package qmp

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

var (
	// ErrClosed means the connection is gone: EOF from the server, Close,
	// or a failure that made the client shut it down.
	ErrClosed = errors.New("qmp: connection closed")
	// ErrProtocol means the server sent something that is not valid QMP:
	// a garbage line, a bad greeting, a reply with an unmatched id, or a
	// reply payload of an unexpected shape.
	ErrProtocol = errors.New("qmp: protocol error")
	// ErrMigrationFailed means a migration ended in status failed or
	// cancelled; the wrapping error carries QEMU's error-desc.
	ErrMigrationFailed = errors.New("qmp: migration failed")
)

// Error is an error reply from QEMU. It keeps the QMP error class (for
// example "GenericError", "CommandNotFound", "DeviceNotActive") so callers
// can act on it with errors.As.
type Error struct {
	// Command is the command that failed.
	Command string
	// Class is QMP's error class.
	Class string
	// Desc is QEMU's human-readable description.
	Desc string
}

// Error implements error.
func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Event is an asynchronous QMP event such as STOP, RESUME or MIGRATION.
type Event struct {
	// Name is the event name, e.g. "MIGRATION".
	Name string
	// Data is the event's data object, or nil if it has none.
	Data json.RawMessage
	// Timestamp is QEMU's time of the event (zero if the server sent none).
	Timestamp time.Time
}

// Greeting is what the server announced when the connection opened.
type Greeting struct {
	// Major, Minor and Micro are QEMU's version, e.g. 7.2.22.
	Major, Minor, Micro int
	// Package is the distribution's package string.
	Package string
	// Capabilities lists the optional QMP capabilities offered (e.g. "oob").
	// This client enables none of them.
	Capabilities []string
}

// Option configures a Client.
type Option func(*options)

type options struct {
	eventBuffer int
	logger      *slog.Logger
	maxMessage  int
	// WaitMigration's poll interval grows from pollMin to pollMax; tests
	// stretch it to prove the event path on its own.
	pollMin, pollMax time.Duration
}

// DefaultEventBuffer is the per-subscriber channel capacity unless
// WithEventBuffer says otherwise.
const DefaultEventBuffer = 64

// DefaultMaxMessageSize bounds one incoming message unless
// WithMaxMessageSize says otherwise. It is far above any real reply (the
// largest seen are HMP memory dumps of a few MiB) and exists only so that a
// broken peer streaming bytes without a newline cannot exhaust memory.
const DefaultMaxMessageSize = 256 << 20

func defaultOptions() options {
	return options{
		eventBuffer: DefaultEventBuffer,
		logger:      slog.New(slog.DiscardHandler),
		maxMessage:  DefaultMaxMessageSize,
		pollMin:     migratePollMin,
		pollMax:     migratePollMax,
	}
}

// WithEventBuffer sets the capacity of each subscriber's channel
// (n < 1 means 1).
func WithEventBuffer(n int) Option {
	return func(o *options) {
		if n < 1 {
			n = 1
		}
		o.eventBuffer = n
	}
}

// WithLogger sends the client's diagnostics (late replies, dropped events,
// protocol errors) to l. The default discards them.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// WithMaxMessageSize bounds the size of one incoming message in bytes;
// n <= 0 removes the bound.
func WithMaxMessageSize(n int) Option {
	return func(o *options) { o.maxMessage = n }
}
