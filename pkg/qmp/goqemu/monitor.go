package goqemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"github.com/ftctl/ftctl/pkg/qmp"
)

// Compile-time proof that Monitor is a go-qemu Monitor.
var _ goqmp.Monitor = (*Monitor)(nil)

// ErrNotConnected is returned by Run and Events before Connect.
var ErrNotConnected = errors.New("goqemu: monitor not connected")

// DefaultTimeout bounds Connect and each Run, since go-qemu's interface
// carries no context.
const DefaultTimeout = 30 * time.Second

// Monitor implements go-qemu's qmp.Monitor on top of a qmp.Client. Unlike
// go-qemu's SocketMonitor it runs commands concurrently, reads replies of
// any size, and never lets an unread event stall a command.
type Monitor struct {
	network, addr string
	opts          []qmp.Option
	timeout       time.Duration

	mu     sync.Mutex
	client *qmp.Client
	owned  bool // Disconnect closes client only if Connect dialled it
}

// NewMonitor returns a Monitor that dials network/addr on Connect. timeout
// bounds Connect and each Run (DefaultTimeout if <= 0).
func NewMonitor(network, addr string, timeout time.Duration, opts ...qmp.Option) *Monitor {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Monitor{network: network, addr: addr, opts: opts, timeout: timeout}
}

// FromClient wraps an already connected client; Connect is then a no-op
// and Disconnect leaves the client open for its owner to close.
func FromClient(c *qmp.Client, timeout time.Duration) *Monitor {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Monitor{client: c, timeout: timeout}
}

// Client returns the underlying client (nil before Connect).
func (m *Monitor) Client() *qmp.Client {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.client
}

// Connect dials and negotiates capabilities.
func (m *Monitor) Connect() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.client != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.timeout)
	defer cancel()
	c, err := qmp.Dial(ctx, m.network, m.addr, m.opts...)
	if err != nil {
		return err
	}
	m.client, m.owned = c, true
	return nil
}

// Disconnect closes a connection made by Connect.
func (m *Monitor) Disconnect() error {
	m.mu.Lock()
	c, owned := m.client, m.owned
	if owned {
		m.client = nil
	}
	m.mu.Unlock()
	if c == nil || !owned {
		return nil
	}
	return c.Close()
}

// Run executes a raw QMP command such as {"execute":"query-status"} and
// returns the raw reply {"return": ...}, echoing the caller's "id" if it
// gave one. A QMP error reply is returned as *qmp.Error.
func (m *Monitor) Run(command []byte) ([]byte, error) {
	c := m.Client()
	if c == nil {
		return nil, ErrNotConnected
	}
	var cmd struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments"`
		ID        json.RawMessage `json:"id"`
	}
	if err := json.Unmarshal(command, &cmd); err != nil {
		return nil, fmt.Errorf("goqemu: command is not a QMP command object: %w", err)
	}
	if cmd.Execute == "" {
		return nil, fmt.Errorf("goqemu: command has no \"execute\" member: %.80s", command)
	}
	var args any
	if len(cmd.Arguments) > 0 {
		args = cmd.Arguments
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.timeout)
	defer cancel()
	var ret json.RawMessage
	if err := c.Execute(ctx, cmd.Execute, args, &ret); err != nil {
		return nil, err
	}
	reply := struct {
		Return json.RawMessage `json:"return"`
		ID     json.RawMessage `json:"id,omitempty"`
	}{Return: ret, ID: cmd.ID}
	return json.Marshal(reply)
}

// Events streams all events in go-qemu's form until ctx ends or the
// connection closes, then closes the channel. It buffers like
// qmp.Client.Subscribe: a reader that falls behind loses events rather
// than stalling commands.
func (m *Monitor) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	c := m.Client()
	if c == nil {
		return nil, ErrNotConnected
	}
	in, cancel := c.Subscribe()
	out := make(chan goqmp.Event)
	go func() {
		defer close(out)
		defer cancel()
		for {
			select {
			case ev, ok := <-in:
				if !ok {
					return
				}
				select {
				case out <- convert(ev):
				case <-ctx.Done():
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

// convert maps an event to go-qemu's shape. go-qemu wants Data as an
// object; anything else (QEMU sends only objects) is left out.
func convert(ev qmp.Event) goqmp.Event {
	var e goqmp.Event
	e.Event = ev.Name
	if len(ev.Data) > 0 {
		_ = json.Unmarshal(ev.Data, &e.Data)
	}
	if !ev.Timestamp.IsZero() {
		e.Timestamp.Seconds = ev.Timestamp.Unix()
		e.Timestamp.Microseconds = int64(ev.Timestamp.Nanosecond() / 1000)
	}
	return e
}
