package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/testbed"
)

// Agent is one `ftctl agent` process inside a host's namespace. Its
// methods are for one goroutine at a time.
type Agent struct {
	Name   string // host-a, host-b
	Host   *testbed.Host
	Dir    string // its state, run and RAM directories
	Socket string // control socket
	Log    string // stderr of the agent, appended
	Listen string // host:port of the peer listener

	c      *Cluster
	gen    int
	cmd    *exec.Cmd
	exited chan struct{}
}

func (c *Cluster) newAgent(h *testbed.Host, gen int) *Agent {
	name := hostName(h)
	dir := filepath.Join(c.Root, name)
	if gen > 0 {
		dir = fmt.Sprintf("%s.%d", dir, gen)
	}
	return &Agent{Name: name, Host: h, Dir: dir, Socket: filepath.Join(dir, "agent.sock"),
		Log: filepath.Join(dir, "agent.log"), Listen: h.ReplAddr.String() + ":" + PeerPort, c: c, gen: gen}
}

// Start runs the agent and waits until its control socket answers.
func (p *Agent) Start(ctx context.Context) error {
	if p.Running() {
		return fmt.Errorf("%w: %s already runs", ErrAgent, p.Name)
	}
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		return err
	}
	c := p.c
	args := []string{"agent", "--name", p.Name, "--listen", p.Listen,
		"--ca", filepath.Join(c.PKI, "ca.pem"),
		"--cert", filepath.Join(c.PKI, p.Name+".pem"), "--key", filepath.Join(c.PKI, p.Name+"-key.pem"),
		"--bridge", testbed.BridgeName,
		"--state-dir", filepath.Join(p.Dir, "state"), "--run-dir", filepath.Join(p.Dir, "run"),
		"--ram-dir", filepath.Join(p.Dir, "ram"), "--socket", p.Socket,
		"--arbiter", "probe", "--peer-timeout", c.opts.PeerTimeout.String()}
	args = append(args, c.opts.AgentArgs...)
	logf, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	fmt.Fprintf(logf, "==== %s: ftctl %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(args, " "))
	cmd := p.Host.Command(context.Background(), c.Bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group: a terminal's Ctrl-C reaches only the caller,
	// which then shuts the agents down in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	logf.Close()
	if err != nil {
		return fmt.Errorf("%w: start %s: %v", ErrAgent, p.Name, err)
	}
	p.cmd, p.exited = cmd, make(chan struct{})
	go func(ch chan struct{}) { cmd.Wait(); close(ch) }(p.exited)
	c.log.Debug("agent started", "name", p.Name, "pid", cmd.Process.Pid, "dir", p.Dir)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cl := p.Client()
	return poll(wctx, 50*time.Millisecond, "agent "+p.Name+" answering on "+p.Socket, func() (bool, error) {
		select {
		case <-p.exited:
			return false, fmt.Errorf("%w: %s exited at start: %v\n%s", ErrAgent, p.Name, cmd.ProcessState, p.LogTail(4000))
		default:
		}
		actx, acancel := context.WithTimeout(wctx, time.Second)
		defer acancel()
		_, err := cl.List(actx)
		return err == nil, nil
	})
}

// Running reports whether the agent process is alive.
func (p *Agent) Running() bool {
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// PID is the agent's process id (0 before Start).
func (p *Agent) PID() int {
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Kill SIGKILLs the agent process, as when its host dies, and waits for it.
func (p *Agent) Kill() {
	if !p.Running() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// Terminate stops the agent with SIGTERM, SIGKILL after 10 s.
func (p *Agent) Terminate() {
	if !p.Running() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		p.Kill()
	}
}

// Client is the agent's control API client.
func (p *Agent) Client() *agent.Client { return agent.NewClient(p.Socket) }

// Status is the agent's view of VM name.
func (p *Agent) Status(ctx context.Context, name string) (agent.VMStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return p.Client().Get(ctx, name)
}

// WaitState polls until VM name is in state want; any of fatal ends the
// wait with an error at once.
func (p *Agent) WaitState(ctx context.Context, name string, want agent.State, wait time.Duration, fatal ...agent.State) (agent.VMStatus, error) {
	var last agent.VMStatus
	var lerr error
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err := poll(wctx, 50*time.Millisecond, fmt.Sprintf("%s on %s becoming %s", name, p.Name, want), func() (bool, error) {
		last, lerr = p.Status(wctx, name)
		if lerr != nil {
			return false, nil
		}
		for _, f := range fatal {
			if last.State == f {
				return false, fmt.Errorf("%w: %s on %s is %s, want %s: %s", ErrCheck, name, p.Name, last.State, want, last.Reason)
			}
		}
		return last.State == want, nil
	})
	if err != nil && lerr == nil {
		err = fmt.Errorf("%w; last %s %q", err, last.State, last.Reason)
	} else if err != nil {
		err = fmt.Errorf("%w; last error %v", err, lerr)
	}
	return last, err
}

// WaitReason polls until VM name's reason contains word.
func (p *Agent) WaitReason(ctx context.Context, name, word string, wait time.Duration) (agent.VMStatus, error) {
	var last agent.VMStatus
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err := poll(wctx, 50*time.Millisecond, fmt.Sprintf("%q in the reason of %s on %s", word, name, p.Name), func() (bool, error) {
		s, err := p.Status(wctx, name)
		if err == nil {
			last = s
		}
		return err == nil && strings.Contains(s.Reason, word), nil
	})
	if err != nil {
		err = fmt.Errorf("%w; last %s %q", err, last.State, last.Reason)
	}
	return last, err
}

// SerialPath is the serial log of VM name on p: as a primary it started,
// or as a replica (its standby, later the promoted guest).
func (p *Agent) SerialPath(name string, replica bool) string {
	kind := "vms"
	if replica {
		kind = "replicas"
	}
	return filepath.Join(p.Dir, "run", kind, name, "qemu", "serial.log")
}

// Serial reads that log (empty if there is none yet).
func (p *Agent) Serial(name string, replica bool) []byte {
	b, _ := os.ReadFile(p.SerialPath(name, replica))
	return b
}

// WaitSerial polls the serial log until ok accepts it.
func (p *Agent) WaitSerial(ctx context.Context, name string, replica bool, wait time.Duration, what string, ok func([]byte) bool) ([]byte, error) {
	var b []byte
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err := poll(wctx, 50*time.Millisecond, fmt.Sprintf("%s in the serial log of %s on %s", what, name, p.Name), func() (bool, error) {
		b = p.Serial(name, replica)
		return ok(b), nil
	})
	if err != nil {
		err = fmt.Errorf("%w; log ends %q", err, tail(b, 300))
	}
	return b, err
}

// ReplicaDisk is the disk image p keeps for VM name as its replica (and
// runs it on once promoted there).
func (p *Agent) ReplicaDisk(name string) string {
	return filepath.Join(p.Dir, "state", "replicas", name, "disk0.raw")
}

// LogTail is the last n bytes of the agent's log.
func (p *Agent) LogTail(n int) string {
	b, _ := os.ReadFile(p.Log)
	return string(tail(b, n))
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
