package libvirt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"github.com/ftctl/ftctl/pkg/qmp"
)

// Sentinel errors; every error from this package wraps one of them or a
// context error.
var (
	// ErrConnect: libvirtd could not be reached, or the connection is gone.
	ErrConnect = errors.New("libvirt: cannot connect")
	// ErrNoDomain: no domain of that name.
	ErrNoDomain = errors.New("libvirt: no such domain")
	// ErrNotReady: the domain is not in a state for the request (for
	// example a QMP command to a domain that is not running).
	ErrNotReady = errors.New("libvirt: domain not ready")
	// ErrBadURI: the connection URI is malformed or names no transport
	// go-libvirt supports.
	ErrBadURI = errors.New("libvirt: bad connection URI")
)

// DefaultSocket is libvirtd's system socket.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// Domains is what ftctl needs to read and change libvirt's domains. *Conn
// implements it; tests of higher layers can fake it.
type Domains interface {
	XML(ctx context.Context, name string, inactive bool) (string, error)
	State(ctx context.Context, name string) (State, error)
	Define(ctx context.Context, xml string) error
}

// Monitor reaches a running domain's QEMU through libvirt.
type Monitor interface {
	QMP(ctx context.Context, name string, cmd []byte) (json.RawMessage, error)
	QMPEvents(ctx context.Context, name string) (<-chan qmp.Event, error)
}

// Events streams a domain's lifecycle.
type Events interface {
	Lifecycle(ctx context.Context, name string) (<-chan LifecycleEvent, error)
}

// Conn is a connection to one libvirtd. Its methods are safe for
// concurrent use. go-libvirt calls take no context: a method whose
// context ends first returns the context's error at once and leaves the
// call to finish (or fail with the connection) in the background.
type Conn struct {
	l   *golibvirt.Libvirt
	uri string
	raw *rawConn // the socket under go-libvirt, nil over SSH
}

// rawConn remembers the socket a dialer produced, so Close can cut it when
// go-libvirt's own disconnect does not return.
type rawConn struct {
	mu sync.Mutex
	c  net.Conn
}

func (r *rawConn) close() {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.c != nil {
		r.c.Close()
	}
}

type recordingDialer struct {
	d   socket.Dialer
	raw *rawConn
}

func (d recordingDialer) Dial() (net.Conn, error) {
	c, err := d.d.Dial()
	if err == nil {
		d.raw.mu.Lock()
		d.raw.c = c
		d.raw.mu.Unlock()
	}
	return c, err
}

var (
	_ Domains = (*Conn)(nil)
	_ Monitor = (*Conn)(nil)
	_ Events  = (*Conn)(nil)
)

// ctxDialer is go-libvirt's socket.Dialer for a unix socket, bounded by
// the context of Dial rather than a fixed timeout.
type ctxDialer struct {
	ctx  context.Context
	path string
}

func (d ctxDialer) Dial() (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(d.ctx, "unix", d.path)
	if err != nil {
		return nil, err
	}
	return newFixConn(c), nil
}

// fixDialer puts fixConn under one of go-libvirt's own dialers.
type fixDialer struct{ d socket.Dialer }

func (d fixDialer) Dial() (net.Conn, error) {
	c, err := d.d.Dial()
	if err != nil {
		return nil, err
	}
	return newFixConn(c), nil
}

// Dial connects to libvirtd. uri is "" for the local system socket, an
// absolute path of a libvirtd socket, or a libvirt URI: qemu:///system
// (optionally ?socket=PATH), qemu+unix, qemu+tcp, qemu+tls (?pkipath=,
// ?no_verify=1) or qemu+ssh / qemu+libssh (go-libvirt's own SSH dialer;
// over SSH, QMP events without data, such as STOP, are lost to a
// go-libvirt decoding bug that the other transports work around).
func Dial(ctx context.Context, uri string) (*Conn, error) {
	dialer, remote, err := dialerFor(ctx, uri)
	if err != nil {
		return nil, err
	}
	var l *golibvirt.Libvirt
	var raw *rawConn
	if dialer != nil {
		raw = &rawConn{}
		l = golibvirt.NewWithDialer(recordingDialer{dialer, raw})
		_, err = call(ctx, func() (struct{}, error) {
			return struct{}{}, l.ConnectToURI(golibvirt.ConnectURI(remote))
		})
	} else {
		u, _ := url.Parse(uri)
		l, err = call(ctx, func() (*golibvirt.Libvirt, error) { return golibvirt.ConnectToURI(u) })
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrConnect, describe(uri), ctx.Err())
		}
		return nil, fmt.Errorf("%w: %s: %v", ErrConnect, describe(uri), err)
	}
	return &Conn{l: l, uri: uri, raw: raw}, nil
}

func describe(uri string) string {
	if uri == "" {
		return DefaultSocket
	}
	return uri
}

// dialerFor returns the dialer for uri (nil for SSH, which go-libvirt
// dials itself) and the URI to open on the daemon.
func dialerFor(ctx context.Context, uri string) (socket.Dialer, string, error) {
	switch {
	case uri == "":
		return ctxDialer{ctx, DefaultSocket}, string(golibvirt.QEMUSystem), nil
	case strings.HasPrefix(uri, "/"):
		return ctxDialer{ctx, uri}, string(golibvirt.QEMUSystem), nil
	}
	u, err := url.Parse(uri)
	if err != nil {
		return nil, "", fmt.Errorf("%w: %q: %v", ErrBadURI, uri, err)
	}
	driver, transport, _ := strings.Cut(u.Scheme, "+")
	if driver != "qemu" {
		return nil, "", fmt.Errorf("%w: %q: driver %q (ftctl drives QEMU domains: qemu://...)", ErrBadURI, uri, driver)
	}
	if transport == "" {
		transport = "unix"
		if u.Host != "" {
			transport = "tls"
		}
	}
	remote := string(golibvirt.RemoteURI(u))
	q := u.Query()
	switch transport {
	case "unix":
		if u.Host != "" {
			return nil, "", fmt.Errorf("%w: %q: a unix socket URI has no host", ErrBadURI, uri)
		}
		s := q.Get("socket")
		if s == "" {
			s = DefaultSocket
		}
		return ctxDialer{ctx, s}, remote, nil
	case "tcp", "tls", "ssh", "libssh", "libssh2":
		if u.Hostname() == "" {
			return nil, "", fmt.Errorf("%w: %q: transport %q needs a host", ErrBadURI, uri, transport)
		}
	default:
		return nil, "", fmt.Errorf("%w: %q: transport %q (want unix, tcp, tls or ssh)", ErrBadURI, uri, transport)
	}
	switch transport {
	case "tcp":
		var opts []dialers.RemoteOption
		if p := u.Port(); p != "" {
			opts = append(opts, dialers.UsePort(p))
		}
		return fixDialer{dialers.NewRemote(u.Hostname(), opts...)}, remote, nil
	case "tls":
		var opts []dialers.TLSOption
		if p := u.Port(); p != "" {
			opts = append(opts, dialers.UseTLSPort(p))
		}
		if pki := q.Get("pkipath"); pki != "" {
			opts = append(opts, dialers.UsePKIPath(pki))
		}
		switch q.Get("no_verify") {
		case "", "0":
		case "1":
			opts = append(opts, dialers.WithInsecureNoVerify())
		default:
			return nil, "", fmt.Errorf("%w: %q: no_verify must be 0 or 1", ErrBadURI, uri)
		}
		return fixDialer{dialers.NewTLS(u.Hostname(), opts...)}, remote, nil
	}
	return nil, remote, nil
}

// closeTimeout bounds a polite disconnect.
const closeTimeout = 5 * time.Second

// Close disconnects. Event channels close when their subscriptions end.
// If libvirtd (or go-libvirt) does not answer the disconnect within
// closeTimeout, the socket is cut so Close never hangs.
func (c *Conn) Close() error {
	done := make(chan error, 1)
	go func() { done <- c.l.Disconnect() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%w: disconnect: %v", ErrConnect, err)
		}
		return nil
	case <-time.After(closeTimeout):
		c.raw.close()
		return fmt.Errorf("%w: disconnect got no answer in %v; connection cut", ErrConnect, closeTimeout)
	}
}

// Disconnected is closed when the connection to libvirtd is lost.
func (c *Conn) Disconnected() <-chan struct{} { return c.l.Disconnected() }

// Version returns libvirtd's library version as major*1e6+minor*1e3+micro.
func (c *Conn) Version(ctx context.Context) (uint64, error) {
	v, err := call(ctx, func() (uint64, error) { return c.l.ConnectGetLibVersion() })
	return v, c.wrap(err, "")
}

// Libvirt returns the underlying go-libvirt client, for calls this package
// does not wrap.
func (c *Conn) Libvirt() *golibvirt.Libvirt { return c.l }

func (c *Conn) lookup(ctx context.Context, name string) (golibvirt.Domain, error) {
	d, err := call(ctx, func() (golibvirt.Domain, error) { return c.l.DomainLookupByName(name) })
	return d, c.wrap(err, name)
}

// XML returns the domain's definition: the live one of a running domain,
// or with inactive the persistent one that the next start uses.
func (c *Conn) XML(ctx context.Context, name string, inactive bool) (string, error) {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return "", err
	}
	var flags golibvirt.DomainXMLFlags
	if inactive {
		flags |= golibvirt.DomainXMLInactive
	}
	s, err := call(ctx, func() (string, error) { return c.l.DomainGetXMLDesc(d, flags) })
	return s, c.wrap(err, name)
}

// State returns the domain's state and its reason.
func (c *Conn) State(ctx context.Context, name string) (State, error) {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return State{}, err
	}
	type sr struct{ s, r int32 }
	v, err := call(ctx, func() (sr, error) {
		s, r, err := c.l.DomainGetState(d, 0)
		return sr{s, r}, err
	})
	if err != nil {
		return State{}, c.wrap(err, name)
	}
	return State{Code: StateCode(v.s), Reason: v.r}, nil
}

// Define makes (or replaces) a persistent domain from its XML.
func (c *Conn) Define(ctx context.Context, xml string) error {
	_, err := call(ctx, func() (golibvirt.Domain, error) { return c.l.DomainDefineXML(xml) })
	return c.wrap(err, "")
}

// Start boots a defined domain; paused leaves its CPUs stopped (libvirt's
// --paused), the way a standby waits for an incoming state.
func (c *Conn) Start(ctx context.Context, name string, paused bool) error {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	var flags uint32
	if paused {
		flags = uint32(golibvirt.DomainStartPaused)
	}
	_, err = call(ctx, func() (golibvirt.Domain, error) { return c.l.DomainCreateWithFlags(d, flags) })
	return c.wrap(err, name)
}

// Destroy stops a running domain at once (virsh destroy).
func (c *Conn) Destroy(ctx context.Context, name string) error {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	_, err = call(ctx, func() (struct{}, error) { return struct{}{}, c.l.DomainDestroy(d) })
	return c.wrap(err, name)
}

// Undefine removes a domain's persistent definition.
func (c *Conn) Undefine(ctx context.Context, name string) error {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	_, err = call(ctx, func() (struct{}, error) { return struct{}{}, c.l.DomainUndefineFlags(d, 0) })
	return c.wrap(err, name)
}

// Running lists the names of running domains.
func (c *Conn) Running(ctx context.Context) ([]string, error) {
	ds, err := call(ctx, func() ([]golibvirt.Domain, error) {
		ds, _, err := c.l.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive)
		return ds, err
	})
	if err != nil {
		return nil, c.wrap(err, "")
	}
	names := make([]string, len(ds))
	for i, d := range ds {
		names[i] = d.Name
	}
	return names, nil
}

// QMP sends one QMP command ({"execute": ...}) through libvirt's monitor
// pass-through and returns the reply's "return" value. A QMP error reply
// is a *qmp.Error, as from ftctl's own QMP client. libvirt marks the
// domain tainted "custom-monitor" on first use.
func (c *Conn) QMP(ctx context.Context, name string, cmd []byte) (json.RawMessage, error) {
	var req struct {
		Execute string `json:"execute"`
	}
	if err := json.Unmarshal(cmd, &req); err != nil || req.Execute == "" {
		return nil, fmt.Errorf("libvirt: QMP command is not an object with \"execute\": %.80q", cmd)
	}
	d, err := c.lookup(ctx, name)
	if err != nil {
		return nil, err
	}
	out, err := call(ctx, func() (string, error) { return c.l.QEMUDomainMonitorCommand(d, string(cmd), 0) })
	if err != nil {
		return nil, c.wrap(err, name)
	}
	return parseReply(req.Execute, []byte(out))
}

func parseReply(command string, out []byte) (json.RawMessage, error) {
	var reply struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(out, &reply); err != nil {
		return nil, fmt.Errorf("libvirt: QMP %s: reply is not JSON: %v: %.80q", command, err, out)
	}
	if reply.Error != nil {
		return nil, &qmp.Error{Command: command, Class: reply.Error.Class, Desc: reply.Error.Desc}
	}
	if reply.Return == nil {
		return nil, fmt.Errorf("libvirt: QMP %s: reply has neither return nor error: %.80q", command, out)
	}
	return reply.Return, nil
}

// QMPEvents streams the QMP events of one running domain, as libvirt
// relays them from its own monitor, until ctx ends or the connection
// closes; then the channel closes. Read it promptly: go-libvirt holds
// further events for this subscription until each is taken.
func (c *Conn) QMPEvents(ctx context.Context, name string) (<-chan qmp.Event, error) {
	if _, err := c.lookup(ctx, name); err != nil {
		return nil, err
	}
	in, err := call(ctx, func() (<-chan golibvirt.DomainEvent, error) { return c.l.SubscribeQEMUEvents(ctx, name) })
	if err != nil {
		return nil, c.wrap(err, name)
	}
	return pump(ctx, in, func(ev golibvirt.DomainEvent) (qmp.Event, bool) { return convertQMPEvent(ev), true }), nil
}

func convertQMPEvent(ev golibvirt.DomainEvent) qmp.Event {
	e := qmp.Event{Name: ev.Event}
	if len(ev.Details) > 0 && string(ev.Details) != "null" {
		e.Data = json.RawMessage(append([]byte(nil), ev.Details...))
	}
	if ev.Seconds != 0 || ev.Microseconds != 0 {
		e.Timestamp = time.Unix(int64(ev.Seconds), int64(ev.Microseconds)*1000)
	}
	return e
}

// drain lets go-libvirt's forwarding goroutine finish after ctx ended: it
// may be blocked sending one more event.
func drain[T any](in <-chan T) {
	go func() {
		for range in {
		}
	}()
}

// Lifecycle streams lifecycle events (defined, started, suspended,
// resumed, stopped, ...) of the named domain, or of all domains when name
// is "", until ctx ends or the connection closes.
func (c *Conn) Lifecycle(ctx context.Context, name string) (<-chan LifecycleEvent, error) {
	in, err := call(ctx, func() (<-chan golibvirt.DomainEventLifecycleMsg, error) { return c.l.LifecycleEvents(ctx) })
	if err != nil {
		return nil, c.wrap(err, name)
	}
	return pump(ctx, in, func(m golibvirt.DomainEventLifecycleMsg) (LifecycleEvent, bool) {
		if name != "" && m.Dom.Name != name {
			return LifecycleEvent{}, false
		}
		return LifecycleEvent{Domain: m.Dom.Name, Type: EventType(m.Event), Detail: m.Detail}, true
	}), nil
}

// maxQueuedEvents bounds the events pump keeps for a slow reader.
const maxQueuedEvents = 4096

// pump forwards go-libvirt's events to a channel of ours and never blocks
// on the reader: go-libvirt delivers events from the goroutine that also
// reads every RPC reply, so one unread event channel stalls every later
// call on the connection (a destroy hung for 13 minutes in CI that way).
// Events wait in a queue instead; past maxQueuedEvents the oldest are
// dropped. The channel closes when in ends or ctx does.
func pump[T, U any](ctx context.Context, in <-chan T, conv func(T) (U, bool)) <-chan U {
	out := make(chan U)
	go func() {
		defer close(out)
		var queue []U
		for {
			var send chan U
			var next U
			if len(queue) > 0 {
				send, next = out, queue[0]
			}
			select {
			case ev, ok := <-in:
				if !ok {
					// Deliver what is left while the reader still wants it.
					for _, e := range queue {
						select {
						case out <- e:
						case <-ctx.Done():
							return
						}
					}
					return
				}
				if u, keep := conv(ev); keep {
					if len(queue) >= maxQueuedEvents {
						queue = queue[1:]
					}
					queue = append(queue, u)
				}
			case send <- next:
				queue = queue[1:]
			case <-ctx.Done():
				drain(in)
				return
			}
		}
	}()
	return out
}

// wrap maps go-libvirt errors onto this package's sentinels, keeping
// libvirt's message.
func (c *Conn) wrap(err error, name string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	what := "libvirt"
	if name != "" {
		what = "domain " + name
	}
	var le golibvirt.Error
	if errors.As(err, &le) {
		switch golibvirt.ErrorNumber(le.Code) {
		case golibvirt.ErrNoDomain:
			return fmt.Errorf("%w: %s: %s", ErrNoDomain, what, le.Message)
		case golibvirt.ErrOperationInvalid, golibvirt.ErrAgentUnresponsive, golibvirt.ErrOperationTimeout:
			return fmt.Errorf("%w: %s: %s", ErrNotReady, what, le.Message)
		}
		return fmt.Errorf("libvirt: %s: %s (code %d)", what, le.Message, le.Code)
	}
	if !c.l.IsConnected() {
		return fmt.Errorf("%w: %s: %v", ErrConnect, what, err)
	}
	return fmt.Errorf("libvirt: %s: %w", what, err)
}

// call runs f, returning early with ctx's error if ctx ends first.
func call[T any](ctx context.Context, f func() (T, error)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	if ctx.Done() == nil {
		return f()
	}
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}
