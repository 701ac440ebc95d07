package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/vm"
)

// Arbiter decides whether a secondary that lost its primary may promote:
// only when the primary is really gone, never when just the replication
// link broke (DESIGN.md invariant 4).
type Arbiter interface {
	MayPromote(ctx context.Context, v ArbiterQuery) (ok bool, reason string, err error)
}

// ArbiterQuery is what an arbiter knows about the VM in question.
type ArbiterQuery struct {
	VM    string
	Probe ProbeSpec
	// PrimaryVMDead, if set, is the primary agent's own report that the
	// VM died there (its QEMU exited, or hung and was killed): probing the
	// LAN can add nothing, only a lease holder still has a say.
	PrimaryVMDead string
}

// ProbeSpec says how a client reaches the VM on its LAN, for the
// client-oriented probe: if the VM still answers there, its primary lives.
type ProbeSpec struct {
	Addrs    []string `json:"addrs,omitempty"`     // the VM's IP addresses
	TCPPorts []int    `json:"tcp_ports,omitempty"` // services to try
}

// Control messages between agents travel in wire.TypeControl frames.
const (
	opProtect  = "protect"  // primary → secondary: prepare a replica and a standby
	opReady    = "ready"    // secondary → primary: go ahead
	opRefused  = "refused"  // secondary → primary: cannot protect (Error says why)
	opHandover = "handover" // primary → secondary: take over at Epoch (planned)
	opPromoted = "promoted" // secondary → primary: the VM runs here now
	// opVMLost: primary → secondary: the VM's QEMU died (or hung and was
	// killed) here; take over from the last committed checkpoint. Sent on
	// the replication link, or as the first message of a new one when the
	// link is gone already.
	opVMLost = "vm-lost"
	// opUnpair: primary → secondary: the VM was shut down in order (a
	// libvirt domain stopped by its guest or by libvirt); drop the replica
	// instead of taking over.
	opUnpair = "unpair"
	// opRedirect: secondary's agent → primary: this VM's replica lives in
	// a shim of its own; send the request again to Addr (the shim's peer
	// listener). The primary remembers it for later requests about the VM.
	opRedirect = "redirect"
)

type message struct {
	Op    string    `json:"op"`
	VM    string    `json:"vm,omitempty"`
	Spec  *vm.Spec  `json:"spec,omitempty"`
	Disks []int64   `json:"disks,omitempty"` // disk sizes in bytes
	Probe ProbeSpec `json:"probe,omitempty"`
	// LogEpoch/LogSeq: where the primary's disk event log stands, so the
	// replayer starts in step with it.
	LogEpoch uint64 `json:"log_epoch,omitempty"`
	LogSeq   uint64 `json:"log_seq,omitempty"`
	Epoch    uint64 `json:"epoch,omitempty"`
	Error    string `json:"error,omitempty"`
	From     string `json:"from,omitempty"`
	// Mgmt is the sender's management heartbeat address (protect, ready).
	Mgmt string `json:"mgmt,omitempty"`
	// Domain is the prepared libvirt domain XML of a VM that runs under
	// libvirt (protect): the secondary makes its standby a libvirt domain
	// from it.
	Domain string `json:"domain,omitempty"`
	// PeerTimeout is the primary's own link-silence timeout (protect): it
	// holds the VM's output until it declares the link dead, so the
	// secondary, whose LAN probe must hear the VM's answers, must not
	// declare the link dead sooner (see replicaTimeout).
	PeerTimeout time.Duration `json:"peer_timeout,omitempty"`
	// Addr is where to send the request instead (redirect).
	Addr string `json:"addr,omitempty"`
	// ProbeWindow (ready) is how long the secondary's LAN probe listens
	// for the VM once it has declared the link dead (PeerTimeout then
	// carries its own effective timeout), when silence alone makes it
	// promote; 0 if it never promotes on the probe's silence alone. The
	// primary must let the VM's held output out before that window
	// closes, or stay paused (see protection.tooLate).
	ProbeWindow time.Duration `json:"probe_window,omitempty"`
}

func sendMsg(ctx context.Context, c wire.Conn, m message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return c.Send(ctx, wire.Frame{Type: wire.TypeControl, Payload: b})
}

// recvMsg waits for the next control message, skipping heartbeats.
func recvMsg(ctx context.Context, c wire.Conn) (message, error) {
	for {
		f, err := c.Recv(ctx)
		if err != nil {
			return message{}, err
		}
		switch f.Type {
		case wire.TypeHeartbeat, wire.TypeAck:
			continue
		case wire.TypeControl:
			return decodeMsg(f.Payload)
		default:
			return message{}, fmt.Errorf("%w: expected a control message, got a %v frame", ErrPeer, f.Type)
		}
	}
}

func decodeMsg(b []byte) (message, error) {
	var m message
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%w: malformed control message: %v", ErrPeer, err)
	}
	if m.Op == "" {
		return m, fmt.Errorf("%w: control message without op", ErrPeer)
	}
	if m.PeerTimeout < 0 || m.PeerTimeout > maxPeerTimeout {
		return m, fmt.Errorf("%w: %s message with a peer timeout of %v (want 0 to %v)", ErrPeer, m.Op, m.PeerTimeout, maxPeerTimeout)
	}
	return m, nil
}

// maxPeerTimeout bounds the link-silence timeout a primary may ask its
// secondary to honour.
const maxPeerTimeout = time.Minute

// replicaTimeout is how long a secondary lets its primary's link stay
// silent before declaring it dead: its own timeout, or the primary's if
// longer. The primary holds the VM's output (and so the VM's answers to
// the secondary's LAN probe) until its own timeout fires; a secondary that
// decided sooner would probe a VM whose answers are still held, hear
// nothing, and promote while the primary runs.
func replicaTimeout(own, primary time.Duration) time.Duration {
	return max(own, primary)
}

// attach gives a prepared replica its link and makes it a standby, unless
// it was removed meanwhile (replaced by a newer pairing, or unpaired); it
// says whether it did. The link is read by other goroutines (a vm-lost
// report on a link of its own, stop), hence r.mu.
func (r *replicaVM) attach(c *watchedConn, reason string) bool {
	r.mu.Lock()
	if r.state == StateStopped {
		r.mu.Unlock()
		return false
	}
	r.conn = c
	r.state, r.reason, r.since = StateStandby, reason, time.Now()
	r.mu.Unlock()
	r.a.log.Info("state", "vm", r.name, "state", StateStandby, "reason", reason)
	r.a.saveRecord(record{Name: r.name, Role: RoleSecondary, State: StateStandby, Peer: r.peer, Spec: r.spec})
	return true
}

// watchStandby drops the replica when its standby QEMU dies while it
// protects: without a standby it could not take over, and the primary
// must not believe itself protected. Its link ends with it, so the
// primary degrades and pairs again (with a new replica and standby). It
// returns once the pairing has ended (r.done).
func (r *replicaVM) watchStandby() {
	if r.standby == nil {
		return
	}
	select {
	case <-r.standby.Exited():
	case <-r.done:
		return
	}
	r.mu.Lock()
	st := r.state
	r.mu.Unlock()
	if st != StateStandby {
		return
	}
	r.a.log.Warn("standby QEMU exited; dropping the replica", "vm", r.name, "peer", r.peer, "qemu", r.standby.Stderr())
	r.a.dropReplica(r)
}

// link is the replica's replication link (nil before attach).
func (r *replicaVM) link() *watchedConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.conn
}

// watchedConn notes when anything last arrived on a link, so a watchdog
// can declare a silent link dead: a peer host that vanished leaves a TCP
// connection hanging, not closed. Only time spent waiting in Recv counts as
// silence: while this side is busy (a long commit), the peer is not silent,
// we are just not listening.
type watchedConn struct {
	wire.Conn
	last    atomic.Int64 // unix ns of the last frame received
	waiting atomic.Int64 // unix ns when the current Recv started; 0 outside Recv
	// silent is how long the link had been silent when watch closed it
	// (ns); 0 if watch did not close it.
	silent atomic.Int64
	// health, once set, hears of every frame (the replication path of the
	// peer's detector).
	health atomic.Pointer[peerHealth]
}

// cause says why the link ended: the watchdog's verdict when it closed the
// link (the error the link's users see then only says "closed locally"),
// else err.
func (w *watchedConn) cause(err error) string {
	if s := time.Duration(w.silent.Load()); s > 0 {
		return fmt.Sprintf("nothing heard from the peer for %v", s.Round(time.Millisecond))
	}
	return fmt.Sprint(err)
}

func newWatchedConn(c wire.Conn) *watchedConn {
	w := &watchedConn{Conn: c}
	w.last.Store(time.Now().UnixNano())
	return w
}

func (w *watchedConn) Recv(ctx context.Context) (wire.Frame, error) {
	w.waiting.Store(time.Now().UnixNano())
	f, err := w.Conn.Recv(ctx)
	w.waiting.Store(0)
	if err == nil {
		w.last.Store(time.Now().UnixNano())
		w.health.Load().heardRepl()
	}
	return f, err
}

// silence is how long a Recv has been waiting with nothing arriving.
func (w *watchedConn) silence() time.Duration {
	start := w.waiting.Load()
	if start == 0 {
		return 0
	}
	return time.Since(time.Unix(0, max(start, w.last.Load())))
}

// watch closes the link when it stays silent for timeout, and reports it.
// It looks every timeout/20: a primary must act on a dead link well
// before the secondary's probe window closes (protection.tooLate), and
// every tick of lateness eats into that margin.
func (w *watchedConn) watch(ctx context.Context, timeout time.Duration, lost func(time.Duration)) {
	t := time.NewTicker(timeout / 20)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if s := w.silence(); s > timeout {
				w.silent.Store(int64(s))
				lost(s)
				w.Close()
				return
			}
		}
	}
}

// switchSink is the event sink of a disk export: it discards events while
// the VM is unprotected (there is no replica to keep in step; pairing
// starts with a full copy) and forwards them to the replication stream
// while protected. Switch it only while the VM is paused, so no write is
// in flight.
type switchSink struct {
	mu   sync.Mutex
	dest eventlog.Sink
}

func (s *switchSink) Send(ctx context.Context, r eventlog.Record) error {
	s.mu.Lock()
	d := s.dest
	s.mu.Unlock()
	if d == nil {
		return nil
	}
	return d.Send(ctx, r)
}

func (s *switchSink) set(d eventlog.Sink) {
	s.mu.Lock()
	s.dest = d
	s.mu.Unlock()
}
