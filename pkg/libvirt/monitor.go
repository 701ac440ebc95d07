package libvirt

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// GoQEMUMonitor adapts a libvirt domain's monitor pass-through to go-qemu's
// qmp.Monitor, so code written against that interface (go-qemu's
// qemu.Domain, or ftctl code that also takes pkg/qmp/goqemu.Monitor)
// drives libvirt-managed domains too. Each Run is bounded by Timeout.
type GoQEMUMonitor struct {
	Conn    *Conn
	Domain  string
	Timeout time.Duration
}

var _ goqmp.Monitor = (*GoQEMUMonitor)(nil)

func (m *GoQEMUMonitor) ctx() (context.Context, context.CancelFunc) {
	t := m.Timeout
	if t <= 0 {
		t = 30 * time.Second
	}
	return context.WithTimeout(context.Background(), t)
}

// Connect checks that the domain exists and is running.
func (m *GoQEMUMonitor) Connect() error {
	ctx, cancel := m.ctx()
	defer cancel()
	st, err := m.Conn.State(ctx, m.Domain)
	if err != nil {
		return err
	}
	if st.Code != StateRunning && st.Code != StatePaused {
		return fmt.Errorf("%w: domain %s is %s", ErrNotReady, m.Domain, st)
	}
	return nil
}

// Disconnect does nothing: the libvirt connection belongs to Conn.
func (m *GoQEMUMonitor) Disconnect() error { return nil }

// Run executes a raw QMP command and returns the raw reply {"return": ...},
// as go-qemu expects. A QMP error reply is a *qmp.Error.
func (m *GoQEMUMonitor) Run(command []byte) ([]byte, error) {
	ctx, cancel := m.ctx()
	defer cancel()
	ret, err := m.Conn.QMP(ctx, m.Domain, command)
	if err != nil {
		return nil, err
	}
	return json.Marshal(struct {
		Return json.RawMessage `json:"return"`
	}{ret})
}

// Events streams the domain's QMP events in go-qemu's form.
func (m *GoQEMUMonitor) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	in, err := m.Conn.QMPEvents(ctx, m.Domain)
	if err != nil {
		return nil, err
	}
	out := make(chan goqmp.Event)
	go func() {
		defer close(out)
		for ev := range in {
			var e goqmp.Event
			e.Event = ev.Name
			if len(ev.Data) > 0 {
				_ = json.Unmarshal(ev.Data, &e.Data)
			}
			if !ev.Timestamp.IsZero() {
				e.Timestamp.Seconds = ev.Timestamp.Unix()
				e.Timestamp.Microseconds = int64(ev.Timestamp.Nanosecond() / 1000)
			}
			select {
			case out <- e:
			case <-ctx.Done():
				drain(in)
				return
			}
		}
	}()
	return out, nil
}
