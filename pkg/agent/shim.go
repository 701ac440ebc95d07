package agent

// Shims (the containerd-shim model): with Config.ShimCommand set, each VM
// this host runs as primary lives in a process of its own, `ftctl shim`,
// started in its own session. The shim is an Agent serving that one VM: it
// is QEMU's parent and owns the VM's devices (the NBD export of its disk,
// the output buffer of its NIC), its lockstep Primary, its lease guard and
// its management heartbeat server. The host's agent only supervises: it
// starts shims, forwards control requests to them over their control
// sockets, and, when it starts, finds the shims still running from the VM
// records on disk and the shims' sockets answering. So an agent restart —
// even kill -9 — neither stops a guest nor interrupts its protection.
//
// The replication link is the shim's own: it dials the peer with the
// agent's credentials (the shim is started with the agent's flags). Handing
// a connection over from the agent with SCM_RIGHTS would not work for the
// link's TLS session, whose keys live in the process that made it, and
// proxying the bytes through the agent would make the agent a point of
// failure again; a shim that dials out itself depends on the agent only
// until it runs.
//
// Replicas (the secondary role) still live in the agent process for now.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

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
	sock := ShimSocket(a.cfg.RunDir, spec.Name)
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		return VMStatus{}, err
	}
	logf, err := os.OpenFile(ShimLog(a.cfg.RunDir, spec.Name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return VMStatus{}, fmt.Errorf("shim log: %w", err)
	}
	defer logf.Close()
	args := append(append([]string{}, a.cfg.ShimCommand[1:]...), "--vm", spec.Name)
	// Not CommandContext: the shim must outlive the request and the agent.
	cmd := exec.Command(a.cfg.ShimCommand[0], args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: no signal meant for the agent's process group or
	// terminal reaches it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return VMStatus{}, fmt.Errorf("start shim for %s: %w", spec.Name, err)
	}
	sp := &shimProc{name: spec.Name, socket: sock, c: NewClient(sock), exited: make(chan struct{})}
	go func() { cmd.Wait(); close(sp.exited) }()
	if err := sp.waitReady(ctx, 15*time.Second); err != nil {
		cmd.Process.Kill()
		<-sp.exited
		return VMStatus{}, fmt.Errorf("shim for %s: %w; its log: %s", spec.Name, err, tailFile(ShimLog(a.cfg.RunDir, spec.Name), 2000))
	}
	a.mu.Lock()
	a.shims[spec.Name] = sp
	a.mu.Unlock()
	st, err := sp.c.Start(ctx, StartRequest{Spec: spec, Probe: probe})
	if err != nil {
		a.dropShim(sp)
		cmd.Process.Kill()
		<-sp.exited
		return VMStatus{}, err
	}
	return st, nil
}

// waitReady polls the shim's control socket until it answers.
func (sp *shimProc) waitReady(ctx context.Context, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		rctx, rcancel := context.WithTimeout(ctx, time.Second)
		_, err := sp.c.List(rctx)
		rcancel()
		if err == nil {
			return nil
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

// discoverShims finds the shims of VMs this host runs as primary that
// outlived a previous agent: a record on disk says the VM exists, the
// shim's socket answering says its shim is alive.
func (a *Agent) discoverShims(ctx context.Context) {
	ents, err := os.ReadDir(filepath.Join(a.cfg.StateDir, "vms"))
	if err != nil {
		return
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(a.cfg.StateDir, "vms", e.Name()))
		if err != nil {
			continue
		}
		var r record
		if json.Unmarshal(b, &r) != nil || r.Role != RolePrimary || r.Name == "" {
			continue
		}
		sp := &shimProc{name: r.Name, socket: ShimSocket(a.cfg.RunDir, r.Name)}
		sp.c = NewClient(sp.socket)
		cctx, cancel := context.WithTimeout(ctx, shimTimeout)
		st, err := sp.c.Get(cctx, r.Name)
		cancel()
		if err != nil {
			a.log.Warn("VM record without a live shim", "vm", r.Name, "state", r.State, "err", err)
			continue
		}
		a.mu.Lock()
		a.shims[r.Name] = sp
		a.mu.Unlock()
		a.log.Info("reattached to a running shim", "vm", r.Name, "state", st.State, "pid", st.PID, "shim_pid", st.ShimPID)
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
	if err != nil {
		return VMStatus{Name: sp.name, Role: RolePrimary, Error: "its shim does not answer: " + err.Error()}, true
	}
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
// (the ones its supervising agent has), no peer listener, and its own
// management heartbeat server on the agent's management host. It returns
// when ctx ends or once its VM is gone; the VM's QEMU does not stop with
// it.
func RunShim(ctx context.Context, cfg Config, name string) error {
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("%w: shim: VM name %q", ErrBadRequest, name)
	}
	cfg.ShimCommand = nil
	cfg.PeerAddr = ""
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
		a.mu.Lock()
		n := len(a.guests) + len(a.replicas)
		a.mu.Unlock()
		switch {
		case n > 0:
			had = true
		case had:
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
