// Package cluster owns a protected pair on one machine: a pkg/testbed bed
// (hosts A and B and a client, as network namespaces), the pair
// credentials, and one `ftctl agent` process per host running inside its
// namespace, with the steps a demonstration or a test drives them
// through: start the built-in guest, pair, kill a host (isolate it, SIGKILL
// its agent and QEMU), restart an agent as a fresh host, status, serial
// logs, and the checks of the guest's counter and disk chain. `ftctl demo`,
// `ftctl bench` and e2e's randomized kill test share it.
//
// Every file the cluster makes lives under one root directory, and every
// QEMU it starts names that root in its command line, which is how Close
// finds the QEMUs that outlive their agent (they do, by design).
package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/testbed"
)

// Sentinels wrapped by this package's errors.
var (
	// ErrConfig: an Options field is unusable.
	ErrConfig = errors.New("cluster: bad options")
	// ErrAgent: an agent process failed to start or answer.
	ErrAgent = errors.New("cluster: agent failed")
	// ErrTimeout: a wait ended before the awaited state came.
	ErrTimeout = errors.New("cluster: timed out")
	// ErrCheck: a check of the guest's counter or disk failed.
	ErrCheck = errors.New("cluster: check failed")
)

// PeerPort is the port each agent accepts replication links on.
const PeerPort = agent.DefaultPeerPort

// Options configure New.
type Options struct {
	// Binary is the ftctl executable run as the agents (and for `cert`).
	Binary string
	// Prefix names the bed's namespaces (testbed.Options.Prefix);
	// default "ftc".
	Prefix string
	// TempDir is where the cluster's root directory is made; default
	// os.TempDir(). Keep it short: unix socket paths are limited to 107
	// bytes.
	TempDir string
	// PeerTimeout is the agents' --peer-timeout; default 1s.
	PeerTimeout time.Duration
	// AgentArgs are extra flags for every agent (e.g. --policy periodic).
	AgentArgs []string
	// Keep leaves the root directory (logs, disks) in place on Close.
	Keep bool
	// Logger receives progress lines at debug level; nil discards them.
	Logger *slog.Logger
}

// Cluster is one bed with its two agents.
type Cluster struct {
	Bin  string
	Root string // every file of the cluster
	PKI  string // ca.pem and each host's key pair
	Bed  *testbed.Bed
	// A and B are the agents on the bed's hosts A and B. Restart replaces
	// an Agent by a fresh one, so read these fields after it.
	A, B *Agent

	opts Options
	log  *slog.Logger
	old  []*Agent // agents replaced by Restart
}

// New builds the bed, issues credentials with the binary's `cert`
// commands and starts both agents. On error it removes what it made.
func New(ctx context.Context, o Options) (c *Cluster, err error) {
	if o.Binary == "" {
		return nil, fmt.Errorf("%w: no ftctl binary given", ErrConfig)
	}
	if fi, serr := os.Stat(o.Binary); serr != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return nil, fmt.Errorf("%w: ftctl binary %q is not an executable file (%v)", ErrConfig, o.Binary, serr)
	}
	if o.PeerTimeout < 0 {
		return nil, fmt.Errorf("%w: negative peer timeout %v", ErrConfig, o.PeerTimeout)
	}
	if o.PeerTimeout == 0 {
		o.PeerTimeout = time.Second
	}
	if o.Prefix == "" {
		o.Prefix = "ftc"
	}
	if o.TempDir == "" {
		o.TempDir = os.TempDir()
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	root, err := os.MkdirTemp(o.TempDir, "ftc-")
	if err != nil {
		return nil, fmt.Errorf("%w: work directory: %v", ErrConfig, err)
	}
	c = &Cluster{Bin: o.Binary, Root: root, PKI: filepath.Join(root, "pki"), opts: o, log: log}
	defer func() {
		if err != nil {
			if cerr := c.Close(); cerr != nil {
				err = errors.Join(err, fmt.Errorf("and cleaning up: %w", cerr))
			}
			c = nil
		}
	}()
	if c.Bed, err = testbed.New(ctx, testbed.Options{Prefix: o.Prefix, Logger: log}); err != nil {
		return c, err
	}
	if err = c.run(ctx, "cert", "init", "--dir", c.PKI); err != nil {
		return c, err
	}
	for _, h := range []*testbed.Host{c.Bed.A, c.Bed.B} {
		if err = c.run(ctx, "cert", "issue", "--dir", c.PKI, hostName(h), "--host", h.ReplAddr.String()); err != nil {
			return c, err
		}
	}
	c.A = c.newAgent(c.Bed.A, 0)
	c.B = c.newAgent(c.Bed.B, 0)
	if err = c.A.Start(ctx); err != nil {
		return c, err
	}
	if err = c.B.Start(ctx); err != nil {
		return c, err
	}
	return c, nil
}

// hostName is the agent name of a bed host: host-a, host-b.
func hostName(h *testbed.Host) string { return "host-" + h.Name }

// run runs the ftctl binary in this namespace.
func (c *Cluster) run(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, c.Bin, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ftctl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// Peer is the other agent of the pair.
func (c *Cluster) Peer(p *Agent) *Agent {
	if p == c.A {
		return c.B
	}
	return c.A
}

// Agents returns A and B.
func (c *Cluster) Agents() []*Agent { return []*Agent{c.A, c.B} }

// Restart replaces host p's agent by a fresh one, as a replacement host
// would come up: the old agent and any QEMU it left are SIGKILLed, the
// host rejoins every network, and the new agent gets new state, run and
// RAM directories. The old agent's files stay readable (serial logs) until
// Close, except its RAM files, which are removed at once since they are
// large.
func (c *Cluster) Restart(ctx context.Context, p *Agent) (*Agent, error) {
	p.Kill()
	if err := c.Bed.Rejoin(p.Host); err != nil {
		return nil, err
	}
	killUnder(p.Dir + "/")
	os.RemoveAll(filepath.Join(p.Dir, "ram"))
	n := p.gen + 1
	np := c.newAgent(p.Host, n)
	if p == c.A {
		c.A = np
	} else {
		c.B = np
	}
	c.old = append(c.old, p)
	return np, np.Start(ctx)
}

// Close stops the agents (their VMs and replicas first), kills any QEMU
// left under the root, removes the bed and, unless Options.Keep, the root.
// It is safe to call on a half-built cluster and more than once.
func (c *Cluster) Close() error {
	var errs []error
	for _, p := range append(c.Agents(), c.old...) {
		if p == nil || !p.Running() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		cl := p.Client()
		if list, err := cl.List(ctx); err == nil {
			for _, s := range list {
				if s.Role == agent.RoleSecondary {
					cl.Unpair(ctx, s.Name)
				} else {
					cl.Stop(ctx, s.Name)
				}
			}
		}
		cancel()
		p.Terminate()
	}
	killUnder(c.Root + "/")
	if c.Bed != nil {
		if err := c.Bed.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if !c.opts.Keep && c.Root != "" {
		if err := os.RemoveAll(c.Root); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killUnder SIGKILLs every process whose command line mentions prefix,
// and waits (bounded) for each to go.
func killUnder(prefix string) []int {
	var killed []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(prefix)) {
			continue
		}
		syscall.Kill(pid, syscall.SIGKILL)
		killed = append(killed, pid)
		for range 100 {
			if _, err := os.Stat(filepath.Join("/proc", e.Name())); err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return killed
}

// poll calls f every interval until it reports done or fails, or ctx ends
// (then the error wraps ErrTimeout and says what was awaited).
func poll(ctx context.Context, every time.Duration, what string, f func() (bool, error)) error {
	for {
		done, err := f()
		if err != nil || done {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %s (%v)", ErrTimeout, what, context.Cause(ctx))
		case <-time.After(every):
		}
	}
}
