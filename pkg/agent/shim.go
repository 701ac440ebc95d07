package agent

// Shims (the containerd-shim model): with Config.ShimCommand set, each VM
// this host runs or protects lives in a process of its own, `ftctl shim`,
// started in its own session. The shim is an Agent serving that one VM.
// For a VM this host runs as primary it is QEMU's parent and owns the VM's
// devices (the NBD export of its disk, the output buffer of its NIC), its
// lockstep Primary, its lease guard and its management heartbeat server.
// For a VM this host protects for a peer (a replica shim, --role
// secondary) it owns the replica RAM and disk, the standby QEMU, the
// lockstep Secondary, the arbitration and, after a promotion, the VM as a
// primary shim would. The host's agent only supervises: it starts shims,
// forwards control requests to them over their control sockets, and, when
// it starts, finds the shims still running from the VM records on disk
// (written by the shims themselves) and the shims' sockets answering. So an
// agent restart — even kill -9 — neither stops a guest nor interrupts its
// protection, on either side of a pair.
//
// The replication link is the shims' own. A primary shim dials the peer
// with the agent's credentials (the shim is started with the agent's
// flags). Handing a connection over from the agent with SCM_RIGHTS would
// not work for the link's TLS session, whose keys live in the process that
// made it, and proxying the bytes through the agent would make the agent a
// point of failure again. So on the secondary side the agent does not
// accept the pairing itself either: a protect request reaching it starts
// the VM's replica shim, which listens on the agent's peer host with a port
// of its own (same credentials), and the agent answers "redirect" with
// that address. The primary dials the shim and sends its request again,
// and remembers the address (replicaRoutes) for later requests about the
// VM — a vm-lost report, a re-pairing — falling back to the peer's agent
// when the shim no longer answers there.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/vm"
)

// shimProc is a VM's shim as its supervising agent knows it.
type shimProc struct {
	name   string
	socket string
	c      *Client
	// exited is closed when a shim this agent started exits (nil for a
	// shim found again after a restart: it is not this agent's child).
	exited chan struct{}
	// kill kills a shim this agent started (nil for one found again).
	kill func() error

	mu sync.Mutex
	// role is the VM's role in the shim as last seen (a replica shim's VM
	// becomes a primary when it is promoted).
	role Role
}

func (sp *shimProc) setRole(r Role) {
	if r == "" {
		return
	}
	sp.mu.Lock()
	sp.role = r
	sp.mu.Unlock()
}

func (sp *shimProc) lastRole() Role {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.role
}

// gone says whether the shim has certainly exited: this agent saw its
// child exit, or its control socket was removed (a shim's listener unlinks
// it when the shim ends in order).
func (sp *shimProc) gone() bool {
	if sp.exited != nil {
		select {
		case <-sp.exited:
			return true
		default:
		}
	}
	_, err := os.Stat(sp.socket)
	return errors.Is(err, os.ErrNotExist)
}

// ShimInfo is what a shim tells its agent about itself.
type ShimInfo struct {
	VM  string `json:"vm"`
	PID int    `json:"pid"`
	// PeerAddr is the shim's own peer listener (replica shims): where
	// the agent redirects the VM's primary.
	PeerAddr string `json:"peer_addr,omitempty"`
	MgmtAddr string `json:"mgmt_addr,omitempty"`
}

// shimRoutes adds a shim's own routes to its control API.
func (a *Agent) shimRoutes(mux *http.ServeMux) {
	if a.shimOf == "" {
		return
	}
	mux.HandleFunc("GET /v1/shim", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, ShimInfo{VM: a.shimOf, PID: os.Getpid(), PeerAddr: a.PeerAddr(), MgmtAddr: a.MgmtAddr()})
	})
}

// ShimInfo asks a shim (not an agent) about itself.
func (c *Client) ShimInfo(ctx context.Context) (ShimInfo, error) {
	var i ShimInfo
	return i, c.do(ctx, http.MethodGet, "/v1/shim", nil, &i)
}

// ShimSocket is the control socket of VM name's shim under runDir.
func ShimSocket(runDir, name string) string {
	return filepath.Join(runDir, "vms", name+".shim.sock")
}

// ShimLog is where VM name's shim writes its log under runDir.
func ShimLog(runDir, name string) string {
	return filepath.Join(runDir, "vms", name+".shim.log")
}

// shimTimeout bounds one forwarded request that is not a long operation.
const shimTimeout = 5 * time.Second

func (a *Agent) shimFor(name string) *shimProc {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.shims[name]
}

// startShim starts VM spec.Name's shim, waits until it answers, and asks
// it to start the VM.
func (a *Agent) startShim(ctx context.Context, spec vm.Spec, probe ProbeSpec) (VMStatus, error) {
	sp, err := a.startShimProc(ctx, spec.Name, RolePrimary)
	if err != nil {
		return VMStatus{}, err
	}
	st, err := sp.c.Start(ctx, StartRequest{Spec: spec, Probe: probe})
	if err != nil {
		a.killShim(sp)
		return VMStatus{}, err
	}
	return st, nil
}

// startShimProc starts the shim of VM name in role, waits until it
// answers and registers it.
func (a *Agent) startShimProc(ctx context.Context, name string, role Role) (*shimProc, error) {
	if err := checkShimName(name); err != nil {
		return nil, err
	}
	sock := ShimSocket(a.cfg.RunDir, name)
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		return nil, err
	}
	// The VM's previous shim (told to stop, or whose replica was dropped)
	// exits a moment later; a new one must not take its socket before:
	// requests would reach the old one, and its exit would unlink the new
	// one's socket.
	if err := awaitShimGone(ctx, sock, 10*time.Second); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrState, name, err)
	}
	if role == RoleSecondary {
		a.killOrphanStandbys(name)
	}
	logf, err := os.OpenFile(ShimLog(a.cfg.RunDir, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("shim log: %w", err)
	}
	defer logf.Close()
	args := append(append([]string{}, a.cfg.ShimCommand[1:]...), "--vm", name)
	if role == RoleSecondary {
		args = append(args, "--role", string(RoleSecondary))
	}
	// Not CommandContext: the shim must outlive the request and the agent.
	cmd := exec.Command(a.cfg.ShimCommand[0], args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: no signal meant for the agent's process group or
	// terminal reaches it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start shim for %s: %w", name, err)
	}
	sp := &shimProc{name: name, socket: sock, c: NewClient(sock), exited: make(chan struct{}), role: role}
	sp.kill = cmd.Process.Kill
	go func() { cmd.Wait(); close(sp.exited) }()
	if err := sp.waitReady(ctx, cmd.Process.Pid, 15*time.Second); err != nil {
		cmd.Process.Kill()
		<-sp.exited
		return nil, fmt.Errorf("shim for %s: %w; its log: %s", name, err, tailFile(ShimLog(a.cfg.RunDir, name), 2000))
	}
	a.mu.Lock()
	a.shims[name] = sp
	a.mu.Unlock()
	return sp, nil
}

// PortRange is an inclusive range of TCP ports; the zero value is none.
type PortRange struct{ Low, High int }

// ParsePortRange parses "LOW-HIGH" (or one port).
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, found := strings.Cut(s, "-")
	if !found {
		hi = lo
	}
	var r PortRange
	var err1, err2 error
	r.Low, err1 = strconv.Atoi(strings.TrimSpace(lo))
	r.High, err2 = strconv.Atoi(strings.TrimSpace(hi))
	if err1 != nil || err2 != nil {
		return PortRange{}, fmt.Errorf("%w: port range %q: want LOW-HIGH", ErrBadRequest, s)
	}
	if err := r.check(); err != nil {
		return PortRange{}, fmt.Errorf("%w: port range %q: %v", ErrBadRequest, s, err)
	}
	return r, nil
}

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Low, r.High) }

func (r PortRange) check() error {
	if r == (PortRange{}) {
		return nil
	}
	if r.Low < 1 || r.High > 65535 || r.Low > r.High {
		return fmt.Errorf("%d-%d is not a range of ports within 1-65535", r.Low, r.High)
	}
	return nil
}

// listenPeer opens the peer listener: on Config.PeerAddr, or, for a
// replica shim with Config.ShimPorts, on the first free port of the range
// (from a random start, so that shims starting together rarely race for
// the same port).
func (a *Agent) listenPeer(ctx context.Context) (*wire.Listener, error) {
	r := a.cfg.ShimPorts
	if a.shimOf == "" || r == (PortRange{}) {
		return wire.Listen(ctx, a.cfg.PeerAddr, a.cfg.Credentials)
	}
	host, _, err := net.SplitHostPort(a.cfg.PeerAddr)
	if err != nil {
		return nil, fmt.Errorf("%w: peer address %q: %v", ErrBadRequest, a.cfg.PeerAddr, err)
	}
	n := r.High - r.Low + 1
	start := rand.IntN(n)
	var last error
	for i := range n {
		l, err := wire.Listen(ctx, net.JoinHostPort(host, strconv.Itoa(r.Low+(start+i)%n)), a.cfg.Credentials)
		if err == nil {
			return l, nil
		}
		last = err
	}
	return nil, fmt.Errorf("no free port in %v on %s (--shim-ports): %w", r, host, last)
}

// killOrphanStandbys kills the standby QEMU a dead replica shim of VM
// name left behind (kill -9 of a shim leaves its children running): a
// QEMU whose command line names the replica's run directory. Useless
// without its shim (its disk and NIC were served there), it would hold
// its guest memory for ever, and a new replica starts from scratch anyway.
func (a *Agent) killOrphanStandbys(name string) {
	dir := []byte(filepath.Join(a.cfg.RunDir, "replicas", name) + string(filepath.Separator))
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || !strings.Contains(filepath.Base(exe), "qemu") {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, dir) {
			continue
		}
		a.log.Warn("killing the standby QEMU a dead replica shim left", "vm", name, "pid", pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// awaitShimGone waits until no shim answers on sock (gone, or never
// there), for at most wait.
func awaitShimGone(ctx context.Context, sock string, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	c := NewClient(sock)
	for {
		if _, err := os.Stat(sock); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		rctx, rcancel := context.WithTimeout(ctx, time.Second)
		info, err := c.ShimInfo(rctx)
		rcancel()
		if err != nil {
			// Dead and its socket stale, or wedged: the socket is free to
			// take.
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("its previous shim (pid %d) still runs on %s", info.PID, sock)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// killShim ends a shim this agent just started and that failed its first
// request.
func (a *Agent) killShim(sp *shimProc) {
	a.dropShim(sp)
	if sp.kill != nil {
		sp.kill()
		<-sp.exited
	}
}

// checkShimName refuses VM names that cannot name a shim's files.
func checkShimName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("%w: shim: VM name %q", ErrBadRequest, name)
	}
	return nil
}

// replicaShimAddr finds or starts the shim that keeps VM m.VM's replica
// on this host and returns its peer address, for a redirect: a protect
// request gets an existing replica shim (which replaces its stale replica,
// as an agent would) or a new one; a vm-lost report only an existing one.
func (a *Agent) replicaShimAddr(ctx context.Context, m message) (string, error) {
	if err := checkShimName(m.VM); err != nil {
		return "", err
	}
	// One request at a time starts shims: two protects for one VM must not
	// start two.
	a.shimMu.Lock()
	defer a.shimMu.Unlock()
	if sp := a.shimFor(m.VM); sp != nil {
		ictx, cancel := context.WithTimeout(ctx, shimTimeout)
		st, err := sp.c.Get(ictx, m.VM)
		var info ShimInfo
		if err == nil {
			info, err = sp.c.ShimInfo(ictx)
		}
		cancel()
		if errors.Is(err, ErrNotFound) && m.Op == opProtect {
			// No replica there right now, but the shim answers: it is
			// replacing its replica (a re-pairing that went straight to
			// it), or about to exit. It takes the request itself; if it
			// has exited by then, the primary asks again later.
			ictx, cancel := context.WithTimeout(ctx, shimTimeout)
			info, ierr := sp.c.ShimInfo(ictx)
			cancel()
			if ierr == nil && info.PeerAddr != "" && sp.lastRole() == RoleSecondary {
				return info.PeerAddr, nil
			}
		}
		switch {
		case err != nil:
			if m.Op != opProtect {
				return "", fmt.Errorf("%w: the shim of %s does not answer: %w", ErrState, m.VM, err)
			}
			// Gone or wedged; a new shim takes its socket over.
			a.log.Warn("replacing a shim that does not answer", "vm", m.VM, "err", err)
			a.dropShim(sp)
		case st.Role == RoleSecondary:
			sp.setRole(RoleSecondary)
			if info.PeerAddr == "" {
				return "", fmt.Errorf("%w: the replica shim of %s has no peer listener", ErrState, m.VM)
			}
			return info.PeerAddr, nil
		case m.Op == opProtect && (st.State == StateStopped || st.State == StateHandedOver):
			// What is left of a VM that ran here (this host was its
			// primary and failed, or handed it over) makes way for the
			// new replica.
			sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			err := sp.c.Stop(sctx, m.VM)
			cancel()
			if err != nil && !errors.Is(err, ErrNotFound) {
				return "", fmt.Errorf("%w: %s: what is left of it here: %w", ErrState, m.VM, err)
			}
			a.dropShim(sp)
		default:
			return "", fmt.Errorf("%w: %s runs on this host", ErrExists, m.VM)
		}
	}
	if m.Op != opProtect {
		return "", fmt.Errorf("%w: %s", ErrNotFound, m.VM)
	}
	if err := a.claimLost(m.VM); err != nil {
		return "", err
	}
	if m.Spec == nil || m.Spec.Name != m.VM {
		return "", fmt.Errorf("%w: protect request for %q without its VM spec", ErrBadRequest, m.VM)
	}
	sp, err := a.startShimProc(ctx, m.VM, RoleSecondary)
	if err != nil {
		return "", err
	}
	ictx, cancel := context.WithTimeout(ctx, shimTimeout)
	info, err := sp.c.ShimInfo(ictx)
	cancel()
	if err == nil && info.PeerAddr == "" {
		err = errors.New("it has no peer listener")
	}
	if err != nil {
		a.killShim(sp)
		return "", fmt.Errorf("replica shim for %s: %w", m.VM, err)
	}
	a.log.Info("started a replica shim", "vm", m.VM, "peer", m.From, "addr", info.PeerAddr, "shim_pid", info.PID)
	return info.PeerAddr, nil
}

// waitReady polls the shim's control socket until the shim with pid
// answers there.
func (sp *shimProc) waitReady(ctx context.Context, pid int, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		rctx, rcancel := context.WithTimeout(ctx, time.Second)
		info, err := sp.c.ShimInfo(rctx)
		rcancel()
		if err == nil && info.PID == pid {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("shim %d answers there", info.PID)
		}
		select {
		case <-sp.exited:
			return errors.New("exited at start")
		case <-ctx.Done():
			return fmt.Errorf("not answering on %s: %w", sp.socket, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// discoverShims finds the shims (of VMs this host runs, and of replicas it
// keeps) that outlived a previous agent: a record on disk says the VM exists, the
// shim's socket answering says its shim is alive.
func (a *Agent) discoverShims(ctx context.Context) {
	for _, r := range a.records() {
		if (r.Role != RolePrimary && r.Role != RoleSecondary) || checkShimName(r.Name) != nil {
			continue
		}
		sp := &shimProc{name: r.Name, socket: ShimSocket(a.cfg.RunDir, r.Name), role: r.Role}
		sp.c = NewClient(sp.socket)
		cctx, cancel := context.WithTimeout(ctx, shimTimeout)
		st, err := sp.c.Get(cctx, r.Name)
		cancel()
		if err != nil {
			a.log.Warn("VM record without a live shim", "vm", r.Name, "state", r.State, "err", err)
			continue
		}
		sp.setRole(st.Role)
		a.mu.Lock()
		a.shims[r.Name] = sp
		a.mu.Unlock()
		a.log.Info("reattached to a running shim", "vm", r.Name, "role", st.Role, "state", st.State, "pid", st.PID, "shim_pid", st.ShimPID)
	}
}

// shimStatus asks a shim for its VM's status; a shim that no longer knows
// its VM (stopped) is forgotten.
func (a *Agent) shimStatus(sp *shimProc) (VMStatus, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), shimTimeout)
	defer cancel()
	st, err := sp.c.Get(ctx, sp.name)
	if errors.Is(err, ErrNotFound) {
		a.dropShim(sp)
		return VMStatus{}, false
	}
	if err != nil && sp.gone() {
		a.dropShim(sp)
		// A shim that died with its VM's record left behind: a libvirt
		// domain runs on without its devices.
		a.noteLost(sp.name)
		if l := a.lostFor(sp.name); l != nil {
			return l.status(), true
		}
		return VMStatus{}, false
	}
	if err != nil {
		return VMStatus{Name: sp.name, Role: sp.lastRole(), Error: "its shim does not answer: " + err.Error()}, true
	}
	sp.setRole(st.Role)
	return st, true
}

func (a *Agent) dropShim(sp *shimProc) {
	a.mu.Lock()
	if a.shims[sp.name] == sp {
		delete(a.shims, sp.name)
	}
	a.mu.Unlock()
}

// RunShim runs the shim of VM name: an agent serving that one VM on
// ShimSocket(cfg.RunDir, name), with cfg's directories and credentials
// (the ones its supervising agent has), and its own management heartbeat
// server on the agent's management host. In role RolePrimary (or "") it
// runs a VM the agent starts in it, with no peer listener; in role
// RoleSecondary it keeps the VM's replica for a peer, on a peer listener of
// its own on cfg.PeerAddr's host (a port of cfg.ShimPorts, or one the
// system picks; GET /v1/shim reports it). It returns when ctx ends or once its VM is
// gone; the VM's QEMU does not stop with it.
func RunShim(ctx context.Context, cfg Config, name string, role Role) error {
	if err := checkShimName(name); err != nil {
		return err
	}
	cfg.ShimCommand = nil
	switch role {
	case "", RolePrimary:
		cfg.PeerAddr = ""
	case RoleSecondary:
		host, _, err := net.SplitHostPort(cfg.PeerAddr)
		if err != nil {
			return fmt.Errorf("%w: a replica shim needs its agent's peer address (--listen), got %q", ErrBadRequest, cfg.PeerAddr)
		}
		cfg.PeerAddr = net.JoinHostPort(host, "0")
	default:
		return fmt.Errorf("%w: shim role %q: want %s or %s", ErrBadRequest, role, RolePrimary, RoleSecondary)
	}
	if cfg.RunDir == "" {
		cfg.RunDir = "/run/ftctl"
	}
	cfg.ControlSocket = ShimSocket(cfg.RunDir, name)
	if cfg.MgmtAddr != "" {
		host, _, err := net.SplitHostPort(cfg.MgmtAddr)
		if err != nil {
			return fmt.Errorf("%w: management address %q: %v", ErrBadRequest, cfg.MgmtAddr, err)
		}
		// The agent holds the configured port; peers are told the
		// shim's own in the pairing handshake.
		cfg.MgmtAddr = net.JoinHostPort(host, "0")
	}
	a, err := New(cfg)
	if err != nil {
		return err
	}
	a.shimOf = name
	a.log = a.log.With("shim", name)
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- a.Run(rctx) }()
	if err := a.shimIdleExit(rctx, errc); err != nil {
		return err
	}
	cancel()
	return <-errc
}

// shimIdleExit returns once the shim's VM is gone for good (stopped, or
// never started within a minute), or when the shim's agent fails.
func (a *Agent) shimIdleExit(ctx context.Context, errc <-chan error) error {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	start, had := time.Now(), false
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			if err == nil {
				err = errors.New("shim's control server ended")
			}
			return err
		case <-t.C:
		}
		// A libvirt domain's devices are open before its QEMU runs
		// (prepared); lv.mu first, as PrepareDomain takes them, so a
		// domain that replaces its last run is seen in one of the maps.
		a.lv.mu.Lock()
		a.mu.Lock()
		// busy: a pairing being accepted (a replica replaced by a new
		// one is briefly in neither map).
		n := len(a.guests) + len(a.replicas) + a.busy + len(a.lv.prepared)
		gone := a.refused || a.served
		a.mu.Unlock()
		a.lv.mu.Unlock()
		switch {
		case n > 0:
			had = true
		case had || gone:
			a.log.Info("VM gone; shim exits")
			return nil
		case time.Since(start) > time.Minute:
			a.log.Warn("no VM started; shim exits")
			return nil
		}
	}
}

func tailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}
