package checker

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Sentinels wrapped by the errors of this package. A Report's Err wraps the
// first four (the violations); ErrTimeout and ErrDial describe a server that
// is slow or away, which a failover legitimately causes for a while.
var (
	// ErrReset: an established connection was reset or closed by the
	// server. Connections of a protected VM survive a failover.
	ErrReset = errors.New("connection reset")
	// ErrLost: a request the server took, or an acknowledged one, is
	// missing from its state, or its reply never came while later ones did.
	ErrLost = errors.New("request or reply lost")
	// ErrReplayed: a reply came again, or the server's counter went back:
	// output or state from before what the client had already seen.
	ErrReplayed = errors.New("replayed state")
	// ErrCorrupt: a reply that is malformed, echoes the wrong line, or
	// carries a checksum no sequence of the client's requests gives.
	ErrCorrupt = errors.New("corrupt reply")
	// ErrTimeout: no reply within Config.Timeout, or Verify gave up.
	ErrTimeout = errors.New("timeout")
	// ErrDial: a connection could not be opened.
	ErrDial = errors.New("dial failed")
	// ErrConfig: the Config is unusable.
	ErrConfig = errors.New("bad checker config")
)

// Kind names a class of error the checker counts.
type Kind string

// The kinds of Report.Errors.
const (
	KindReset    Kind = "reset"
	KindLost     Kind = "lost"
	KindReplayed Kind = "replayed"
	KindCorrupt  Kind = "corrupt"
	KindTimeout  Kind = "timeout"
	KindDial     Kind = "dial"
)

// Err returns the sentinel of kind k.
func (k Kind) Err() error {
	switch k {
	case KindReset:
		return ErrReset
	case KindLost:
		return ErrLost
	case KindReplayed:
		return ErrReplayed
	case KindCorrupt:
		return ErrCorrupt
	case KindTimeout:
		return ErrTimeout
	case KindDial:
		return ErrDial
	}
	return fmt.Errorf("unknown kind %q", string(k))
}

// Violation reports whether errors of kind k break the guarantee that a
// protected service keeps every connection and all acknowledged work.
func (k Kind) Violation() bool {
	switch k {
	case KindReset, KindLost, KindReplayed, KindCorrupt:
		return true
	}
	return false
}

// Event is one error the checker saw.
type Event struct {
	Time   time.Time
	Conn   string // "L1" long-lived, "S7" short, ...
	Kind   Kind
	Detail string
}

func (e Event) String() string {
	return fmt.Sprintf("%s %s %s: %s", e.Time.Format("15:04:05.000"), e.Conn, e.Kind, e.Detail)
}

// Ack is one acknowledged request: its reply came and was verified.
type Ack struct {
	Conn     string
	Index    uint64 // the request's number on its connection, from 1
	Seq      uint64 // the server's global request number in the reply
	Sum      uint64 // the connection's running checksum the reply carried
	Sent     time.Time
	Received time.Time
}

// Gap is a stretch with no verified reply on any connection.
type Gap struct {
	Start, End time.Time
}

// Len is the gap's length.
func (g Gap) Len() time.Duration { return g.End.Sub(g.Start) }

// Report is a snapshot of what the checker saw.
type Report struct {
	Addr    string
	Start   time.Time // when Run began
	Elapsed time.Duration

	Sent    uint64 // requests written, all connections
	Replies uint64 // reply lines received
	Acked   uint64 // requests whose reply was verified
	// AckedLost counts acknowledged requests that a later reply proved
	// the server no longer had. A correct failover keeps it 0.
	AckedLost uint64
	MaxSeq    uint64 // the highest verified seq

	Errors map[Kind]uint64
	// Events holds the first errors of each kind, in order, with detail.
	Events []Event

	LongConns int  // long-lived connections opened; 1 unless one was lost
	LongReset bool // a long-lived connection was reset or closed by the server
	LongAcked uint64
	LastAck   Ack // the latest acknowledgement on the long-lived connection

	ShortDone   uint64 // short connections whose every reply verified
	ShortFailed uint64 // short connections that ended in an error

	// LongestGap is the longest stretch without a verified reply on any
	// connection (after the first one): downtime as the client sees it.
	LongestGap Gap
	// CurrentGap is the time since the last verified reply.
	CurrentGap time.Duration
}

// Err returns nil when the checker saw no violation (reset, lost,
// replayed, corrupt), else an error wrapping the sentinel of every kind
// seen, each with its count and first detail. Timeouts and dial failures
// alone are not violations: Verify decides whether the service came back.
func (r Report) Err() error {
	var errs []error
	for _, k := range []Kind{KindLost, KindReplayed, KindReset, KindCorrupt} {
		n := r.Errors[k]
		if n == 0 {
			continue
		}
		detail := ""
		for _, e := range r.Events {
			if e.Kind == k {
				detail = fmt.Sprintf(", first at %s on %s: %s", e.Time.Format("15:04:05.000"), e.Conn, e.Detail)
				break
			}
		}
		errs = append(errs, fmt.Errorf("%w: %d time(s)%s", k.Err(), n, detail))
	}
	if r.AckedLost > 0 {
		errs = append([]error{fmt.Errorf("%w: %d acknowledged request(s) missing from the server", ErrLost, r.AckedLost)}, errs...)
	}
	return errors.Join(errs...)
}

// String is a short multi-line summary for people.
func (r Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "checker %s for %v: sent %d, acked %d, replies %d, max seq %d\n",
		r.Addr, r.Elapsed.Round(time.Millisecond), r.Sent, r.Acked, r.Replies, r.MaxSeq)
	fmt.Fprintf(&b, "long-lived connection: opened %d, reset %v, acked %d; short connections: %d ok, %d failed\n",
		r.LongConns, r.LongReset, r.LongAcked, r.ShortDone, r.ShortFailed)
	fmt.Fprintf(&b, "longest gap without a reply: %v; acknowledged requests lost: %d\n",
		r.LongestGap.Len().Round(time.Millisecond), r.AckedLost)
	if len(r.Errors) > 0 {
		kinds := make([]string, 0, len(r.Errors))
		for k, n := range r.Errors {
			kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
		}
		sort.Strings(kinds)
		fmt.Fprintf(&b, "errors: %s\n", strings.Join(kinds, " "))
	}
	return b.String()
}
