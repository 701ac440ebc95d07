package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftctl/ftctl/pkg/failover"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/vm"
)

// Agent is one host's daemon.
type Agent struct {
	cfg Config
	log *slog.Logger

	// degradeDelay holds every degrade back (tests: a primary that
	// notices the lost secondary late).
	degradeDelay atomic.Int64 // ns

	mu       sync.Mutex
	guests   map[string]*guest
	replicas map[string]*replicaVM
	// shims are the VMs run by shim processes (Config.ShimCommand).
	shims map[string]*shimProc
	// shimOf is the VM this agent serves when it is itself a shim.
	shimOf string
	// lv: libvirt domains (libvirt.go).
	lv libvirtState
	// lost: libvirt domains a previous agent or shim served (lost.go).
	lost map[string]*lostVM
	// shimMu serialises the starting of replica shims.
	shimMu sync.Mutex
	// replicaRoutes remembers the peers' replica shims (shimroute.go).
	replicaRoutes replicaRoutes
	// busy counts pairings being accepted (a shim must not think itself
	// idle meanwhile).
	busy int
	// refused: a replica shim refused a pairing (it exits once idle,
	// rather than waiting a minute for a VM).
	refused bool
	// served: a VM, replica or prepared domain was taken on (a shim whose
	// VM is gone again exits, however briefly the VM stayed).
	served bool
	peerLn *wire.Listener
	hbSrv  *failover.HeartbeatServer
	ctl    net.Listener
	srv    *http.Server
	closed bool
}

// New checks the configuration and prepares the agent's directories.
func New(cfg Config) (*Agent, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	for _, d := range []string{cfg.StateDir, cfg.RunDir, cfg.RAMDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("agent directory: %w", err)
		}
	}
	return &Agent{cfg: cfg, log: cfg.Logger.With("agent", cfg.Name), guests: map[string]*guest{}, replicas: map[string]*replicaVM{}, shims: map[string]*shimProc{}}, nil
}

// Name is the agent's host name.
func (a *Agent) Name() string { return a.cfg.Name }

// PeerAddr is the address the peer listener is bound to (after Start).
func (a *Agent) PeerAddr() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.peerLn == nil {
		return ""
	}
	return a.peerLn.Addr().String()
}

// MgmtAddr is the address the management heartbeat server is bound to
// (after Start; "" without one).
func (a *Agent) MgmtAddr() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.hbSrv == nil {
		return ""
	}
	return a.hbSrv.Addr().String()
}

// ControlSocket is the path of the control API.
func (a *Agent) ControlSocket() string { return a.cfg.ControlSocket }

// Run serves the control API and the peer listener until ctx ends. VMs
// keep running after Run returns (QEMU processes are not children that die
// with the agent); Close stops them.
func (a *Agent) Run(ctx context.Context) error {
	if err := a.listen(ctx); err != nil {
		return err
	}
	if len(a.cfg.ShimCommand) > 0 {
		a.discoverShims(ctx)
	}
	if a.shimOf == "" {
		// After discoverShims: what no shim claims is lost. (A shim
		// shares the agent's state directory but knows only its VM.)
		a.loadLost()
	}
	errc := make(chan error, 2)
	go func() {
		if err := a.srv.Serve(a.ctl); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	if a.peerLn != nil {
		go a.acceptPeers(ctx)
	}
	if a.hbSrv != nil {
		go func() {
			if err := a.hbSrv.Serve(ctx); err != nil {
				a.log.Error("management heartbeat server stopped", "err", err)
			}
		}()
	}
	a.log.Info("agent running", "control", a.cfg.ControlSocket, "peer", a.PeerAddr(), "mgmt", a.MgmtAddr())
	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a.srv.Shutdown(sctx)
	if a.peerLn != nil {
		a.peerLn.Close()
	}
	if a.hbSrv != nil {
		a.hbSrv.Close()
	}
	return nil
}

// listen opens the control socket (root only) and the peer listener.
func (a *Agent) listen(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(a.cfg.ControlSocket), 0o700); err != nil {
		return err
	}
	os.Remove(a.cfg.ControlSocket)
	ln, err := net.Listen("unix", a.cfg.ControlSocket)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(a.cfg.ControlSocket, 0o600); err != nil {
		ln.Close()
		return err
	}
	a.ctl = ln
	a.srv = &http.Server{Handler: a.routes(), ReadHeaderTimeout: 10 * time.Second}
	if a.cfg.PeerAddr != "" {
		pl, err := a.listenPeer(ctx)
		if err != nil {
			ln.Close()
			return fmt.Errorf("peer listener on %s: %w", a.cfg.PeerAddr, err)
		}
		a.mu.Lock()
		a.peerLn = pl
		a.mu.Unlock()
	}
	if a.cfg.MgmtAddr != "" {
		// Pings only prove the pinging peer alive to the peer itself (the
		// pongs); this server just answers.
		hs, err := failover.ListenHeartbeat(ctx, a.cfg.MgmtAddr, failover.HeartbeatServerConfig{Key: a.cfg.MgmtKey})
		if err != nil {
			ln.Close()
			if a.peerLn != nil {
				a.peerLn.Close()
			}
			return fmt.Errorf("management heartbeats on %s: %w", a.cfg.MgmtAddr, err)
		}
		a.mu.Lock()
		a.hbSrv = hs
		a.mu.Unlock()
	}
	return nil
}

// acceptPeers serves replication links from primaries.
func (a *Agent) acceptPeers(ctx context.Context) {
	for {
		c, err := a.peerLn.Accept(ctx)
		if err != nil {
			if errors.Is(err, wire.ErrAuth) {
				a.log.Warn("peer refused", "err", err)
				continue
			}
			if ctx.Err() == nil {
				a.log.Info("peer listener stopped", "err", err)
			}
			return
		}
		go a.servePeer(ctx, c)
	}
}

func (a *Agent) servePeer(ctx context.Context, c wire.Conn) {
	wc := newWatchedConn(c)
	hctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	m, err := recvMsg(hctx, wc)
	cancel()
	if err != nil {
		a.log.Warn("peer sent no request", "peer", c.Peer(), "err", err)
		c.Close()
		return
	}
	if a.shimOf != "" && m.VM != a.shimOf {
		// A replica shim's listener is its VM's alone (a stale route of
		// a primary can lead here).
		sendMsg(ctx, wc, message{Op: opRefused, VM: m.VM, Error: fmt.Sprintf("%v: this is the shim of %s, not of %s", ErrNotFound, a.shimOf, m.VM)})
		c.Close()
		return
	}
	if len(a.cfg.ShimCommand) > 0 && (m.Op == opProtect || m.Op == opVMLost) {
		// Replicas live in shims: send the primary there.
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		addr, err := a.replicaShimAddr(sctx, m)
		cancel()
		reply := message{Op: opRedirect, VM: m.VM, Addr: addr}
		if err != nil {
			a.log.Warn("no replica shim", "op", m.Op, "vm", m.VM, "peer", c.Peer(), "err", err)
			reply = message{Op: opRefused, VM: m.VM, Error: err.Error()}
		}
		sendMsg(ctx, wc, reply)
		c.Close()
		return
	}
	if m.Op == opVMLost {
		// The primary's VM died and its replication link was gone
		// already: the news comes on a link of its own.
		err := a.vmLostNews(m, c.Peer())
		reply := message{Op: opReady, VM: m.VM}
		if err != nil {
			a.log.Warn("refusing a vm-lost report", "vm", m.VM, "peer", c.Peer(), "err", err)
			reply = message{Op: opRefused, VM: m.VM, Error: err.Error()}
		}
		sendMsg(ctx, wc, reply)
		c.Close()
		return
	}
	if m.Op != opProtect {
		sendMsg(ctx, wc, message{Op: opRefused, Error: fmt.Sprintf("unexpected %q", m.Op)})
		c.Close()
		return
	}
	if m.From == "" {
		m.From = c.Peer()
	}
	a.mu.Lock()
	a.busy++
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.busy--
		a.mu.Unlock()
	}()
	r, err := a.acceptProtect(ctx, m)
	if err != nil {
		a.log.Warn("refusing to protect", "vm", m.VM, "peer", m.From, "err", err)
		a.mu.Lock()
		// A replica shim started for this request has nothing to keep.
		a.refused = true
		a.mu.Unlock()
		sendMsg(ctx, wc, message{Op: opRefused, VM: m.VM, Error: err.Error()})
		c.Close()
		return
	}
	r.timeout = replicaTimeout(a.cfg.PeerTimeout, m.PeerTimeout)
	if r.health, err = a.newPeerHealth(m.Mgmt, r.timeout); err != nil {
		a.log.Warn("peer health", "vm", m.VM, "err", err)
		sendMsg(ctx, wc, message{Op: opRefused, VM: m.VM, Error: err.Error()})
		c.Close()
		a.dropReplica(r)
		return
	}
	wc.health.Store(r.health)
	ready := message{Op: opReady, VM: m.VM, Mgmt: a.MgmtAddr(), PeerTimeout: r.timeout, ProbeWindow: a.silenceWindow(m.Probe)}
	if err := sendMsg(ctx, wc, ready); err != nil {
		// r.conn is still nil: stop must not wait for a run that never
		// started.
		c.Close()
		a.dropReplica(r)
		return
	}
	if !r.attach(wc, "protecting for "+m.From) {
		// Replaced or removed while it was being prepared.
		c.Close()
		return
	}
	go r.watchStandby()
	a.mu.Lock()
	a.busy--
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.busy++
		a.mu.Unlock()
	}()
	r.run(context.WithoutCancel(ctx))
}

// vmLostNews hands a primary's report that its VM died to the replica
// it concerns, and ends that replica's link so it decides at once.
func (a *Agent) vmLostNews(m message, authPeer string) error {
	a.mu.Lock()
	r, ok := a.replicas[m.VM]
	a.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, m.VM)
	}
	if m.From != r.peer && authPeer != r.peer {
		return fmt.Errorf("%w: %s is protected for %s, not %s", ErrPeer, m.VM, r.peer, m.From)
	}
	r.noteVMLost(m.Error)
	if c := r.link(); c != nil {
		c.Close()
	}
	return nil
}

func (a *Agent) acceptProtect(ctx context.Context, m message) (*replicaVM, error) {
	if err := a.claimLost(m.VM); err != nil {
		return nil, err
	}
	if sp := a.shimFor(m.VM); sp != nil {
		st, _ := a.shimStatus(sp)
		if st.State != StateStopped && st.State != StateHandedOver {
			return nil, fmt.Errorf("%w: %s runs on this host", ErrExists, m.VM)
		}
		sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		err := sp.c.Stop(sctx, m.VM)
		cancel()
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("%w: %s: what is left of it here: %w", ErrState, m.VM, err)
		}
		a.dropShim(sp)
	}
	a.mu.Lock()
	if g, ok := a.guests[m.VM]; ok {
		a.mu.Unlock()
		g.mu.Lock()
		dead := g.state == StateStopped || g.state == StateHandedOver
		g.mu.Unlock()
		if !dead {
			return nil, fmt.Errorf("%w: %s runs on this host", ErrExists, m.VM)
		}
		// What is left of a VM whose QEMU died here (this host was its
		// primary and failed) makes way for the new replica.
		g.stop(ctx)
		a.forget(m.VM)
		a.mu.Lock()
	}
	old := a.replicas[m.VM]
	delete(a.replicas, m.VM)
	a.mu.Unlock()
	if old != nil {
		// A new pairing replaces a stale replica (the primary re-pairs
		// after the link came back): its content is outdated anyway.
		old.stop()
	}
	r, err := a.prepareReplica(ctx, m)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.replicas[m.VM] = r
	a.served = true
	a.mu.Unlock()
	return r, nil
}

func (a *Agent) dropReplica(r *replicaVM) {
	a.mu.Lock()
	if a.replicas[r.name] == r {
		delete(a.replicas, r.name)
	}
	// Busy until the standby is torn down: a replica shim must not exit
	// halfway through (a libvirt standby domain is destroyed and
	// undefined here).
	a.busy++
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.busy--
		a.mu.Unlock()
	}()
	r.stop()
	a.removeRecord(r.name)
}

// adoptPromoted turns a promoted replica into a guest of this host, which
// can then be paired again (re-protection).
func (a *Agent) adoptPromoted(r *replicaVM, reason string) {
	r.health.close()
	if r.replayer != nil {
		r.replayer.Close()
	}
	if r.img != nil {
		r.img.Close()
	}
	r.replica.Close()
	g := &guest{a: a, name: r.name, spec: r.spec, probe: r.probe, dir: r.runDir, dev: r.dev, m: r.standby, domain: r.promotedXML,
		state: StatePromoted, reason: reason, since: time.Now(), extra: []string{r.ramPath}}
	a.mu.Lock()
	if a.replicas[r.name] == r {
		delete(a.replicas, r.name)
	}
	a.guests[r.name] = g
	a.mu.Unlock()
	g.setState(StatePromoted, reason)
	go g.watch()
	// The VM runs here now: so does its lease (granted to this node by
	// the arbitration, or released by the primary on a handover).
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := g.startGuard(ctx); err != nil {
			a.log.Warn("promoted VM runs without its lease", "vm", g.name, "err", err)
		}
	}()
}

// forget drops a VM that left this host.
func (a *Agent) forget(name string) {
	a.mu.Lock()
	delete(a.guests, name)
	a.mu.Unlock()
	a.removeRecord(name)
}

// StartVM boots a VM under this agent.
func (a *Agent) StartVM(ctx context.Context, spec vm.Spec, probe ProbeSpec) (VMStatus, error) {
	a.mu.Lock()
	_, g := a.guests[spec.Name]
	_, r := a.replicas[spec.Name]
	_, sh := a.shims[spec.Name]
	_, lost := a.lost[spec.Name]
	a.mu.Unlock()
	if g || r || sh || lost {
		return VMStatus{}, fmt.Errorf("%w: %s", ErrExists, spec.Name)
	}
	if err := spec.WithDefaults().Validate(); err != nil && !errors.Is(err, vm.ErrInvalidSpec) {
		return VMStatus{}, err
	}
	if len(a.cfg.ShimCommand) > 0 {
		return a.startShim(ctx, spec, probe)
	}
	gu, err := a.startGuest(ctx, spec, probe)
	if err != nil {
		return VMStatus{}, err
	}
	a.mu.Lock()
	a.guests[spec.Name] = gu
	a.served = true
	a.mu.Unlock()
	return gu.status(), nil
}

func (a *Agent) guest(name string) (*guest, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	g, ok := a.guests[name]
	if !ok {
		if l := a.lost[name]; l != nil {
			return nil, l.errLost()
		}
		if _, ok := a.replicas[name]; ok {
			return nil, fmt.Errorf("%w: %s is a replica here; run the command on its primary's host", ErrState, name)
		}
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	return g, nil
}

// Pair starts protecting a VM on peer.
func (a *Agent) Pair(ctx context.Context, name, peer string) (VMStatus, error) {
	if sp := a.shimFor(name); sp != nil {
		return sp.c.Pair(ctx, name, peer)
	}
	g, err := a.guest(name)
	if err != nil {
		return VMStatus{}, err
	}
	if err := g.pair(ctx, peer); err != nil {
		return VMStatus{}, err
	}
	return g.status(), nil
}

// Failover hands a VM over to its secondary (planned, zero loss).
func (a *Agent) Failover(ctx context.Context, name string) (uint64, error) {
	if sp := a.shimFor(name); sp != nil {
		r, err := sp.c.Failover(ctx, name)
		return r.Epoch, err
	}
	g, err := a.guest(name)
	if err != nil {
		return 0, err
	}
	return g.failover(ctx)
}

// Unpair stops protecting a VM.
func (a *Agent) Unpair(ctx context.Context, name string) error {
	if sp := a.shimFor(name); sp != nil {
		if err := sp.c.Unpair(ctx, name); err != nil {
			return err
		}
		// A replica shim ends with its replica.
		a.shimStatus(sp)
		return nil
	}
	a.mu.Lock()
	r, isReplica := a.replicas[name]
	a.mu.Unlock()
	if isReplica {
		a.dropReplica(r)
		return nil
	}
	g, err := a.guest(name)
	if err != nil {
		return err
	}
	return g.unpair()
}

// Resume lets a fenced VM run on, alone (see guest.fenceLate).
func (a *Agent) Resume(ctx context.Context, name string) error {
	if sp := a.shimFor(name); sp != nil {
		return sp.c.Resume(ctx, name)
	}
	g, err := a.guest(name)
	if err != nil {
		return err
	}
	return g.resume(ctx)
}

// StopVM shuts a VM down.
func (a *Agent) StopVM(ctx context.Context, name string) error {
	if sp := a.shimFor(name); sp != nil {
		err := sp.c.Stop(ctx, name)
		if err == nil || errors.Is(err, ErrNotFound) {
			a.dropShim(sp)
		}
		return err
	}
	if l := a.lostFor(name); l != nil {
		return a.stopLost(ctx, l)
	}
	if a.stopPrepared(name) {
		return nil
	}
	g, err := a.guest(name)
	if err != nil {
		return err
	}
	return g.stop(ctx)
}

// Status lists the VMs (or one).
func (a *Agent) Status(name string) ([]VMStatus, error) {
	// Prepared domains first: adopting one moves it to the guests under
	// lv.mu, so it is seen in one list or the other (or both: the guest
	// wins), never in neither.
	prep := a.preparedStatus(name)
	a.mu.Lock()
	var gs []*guest
	var rs []*replicaVM
	var ss []*shimProc
	var ls []*lostVM
	for n, l := range a.lost {
		if name == "" || n == name {
			ls = append(ls, l)
		}
	}
	for n, sp := range a.shims {
		if name == "" || n == name {
			ss = append(ss, sp)
		}
	}
	for n, g := range a.guests {
		if name == "" || n == name {
			gs = append(gs, g)
		}
	}
	for n, r := range a.replicas {
		if name == "" || n == name {
			rs = append(rs, r)
		}
	}
	a.mu.Unlock()
	var out []VMStatus
	for _, sp := range ss {
		if st, ok := a.shimStatus(sp); ok {
			out = append(out, st)
		}
	}
	for _, l := range ls {
		out = append(out, l.status())
	}
	for _, p := range prep {
		if !slices.ContainsFunc(gs, func(g *guest) bool { return g.name == p.Name }) {
			out = append(out, p)
		}
	}
	if name != "" && len(gs)+len(rs)+len(out) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	for _, g := range gs {
		out = append(out, withRunState(g.status(), g.m))
	}
	for _, r := range rs {
		out = append(out, withRunState(r.status(), r.standby))
	}
	if a.shimOf != "" {
		// Replicas too: the agent shows which process owns each VM.
		for i := range out {
			out[i].ShimPID = os.Getpid()
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// withRunState asks the VM's QEMU for its run state (briefly: a status
// must not hang on a QEMU that stopped answering).
func withRunState(s VMStatus, m machine) VMStatus {
	if m == nil || s.PID == 0 {
		return s
	}
	if strings.HasPrefix(s.QEMUHealth, "QEMU hung") {
		s.RunState = "not-responding"
		return s
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if st, err := m.QMP().QueryStatus(ctx); err == nil {
		s.RunState = st.Status
	}
	return s
}

// Close stops every VM and replica this agent runs (for tests and an
// orderly shutdown of the host, not for an agent restart).
func (a *Agent) Close() error {
	a.mu.Lock()
	gs := make([]*guest, 0, len(a.guests))
	for _, g := range a.guests {
		gs = append(gs, g)
	}
	rs := make([]*replicaVM, 0, len(a.replicas))
	for _, r := range a.replicas {
		rs = append(rs, r)
	}
	ss := make([]*shimProc, 0, len(a.shims))
	for _, sp := range a.shims {
		ss = append(ss, sp)
	}
	a.closed = true
	a.mu.Unlock()
	for _, sp := range ss {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		if st, ok := a.shimStatus(sp); ok && st.Role == RoleSecondary {
			sp.c.Unpair(ctx, sp.name)
		} else {
			sp.c.Stop(ctx, sp.name)
		}
		cancel()
		a.dropShim(sp)
	}
	for _, g := range gs {
		g.stop(context.Background())
	}
	for _, r := range rs {
		a.dropReplica(r)
	}
	a.closeLibvirt()
	return nil
}

// Serial returns what the VM has written to its serial console on this
// host (for a replica: its standby, silent until promoted).
func (a *Agent) Serial(name string) ([]byte, error) {
	if sp := a.shimFor(name); sp != nil {
		ctx, cancel := context.WithTimeout(context.Background(), shimTimeout)
		defer cancel()
		return sp.c.Serial(ctx, name)
	}
	a.mu.Lock()
	g, isGuest := a.guests[name]
	r, isReplica := a.replicas[name]
	a.mu.Unlock()
	switch {
	case isGuest:
		return g.m.Serial()
	case isReplica && r.standby != nil:
		return r.standby.Serial()
	}
	return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
}
