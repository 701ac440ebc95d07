package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/vm"
)

// shimEnv carries a shim's configuration from a test to the test binary
// re-executed as the shim (the real one is `ftctl shim` with the agent's
// flags).
const shimEnv = "FTCTL_AGENT_TEST_SHIM"

type shimConf struct {
	Name, StateDir, RunDir, RAMDir string
	CA, Cert, Key                  []byte
	// PeerAddr is the agent's peer listener (a replica shim listens on
	// its host); Arbiter: promote when the primary is lost (yesArbiter).
	PeerAddr string
	Arbiter  bool
	// Verbose: log to stderr (the process's log file), not nowhere.
	Verbose bool
	// Libvirt: the host's libvirtd (Config.Libvirt), which shims get
	// as `ftctl shim` gets the agent's --libvirt.
	Libvirt string
	// QMPTimeout, if set, replaces the default of these tests (1 s).
	QMPTimeout time.Duration
}

func (sc shimConf) config() (agent.Config, error) {
	creds, err := wire.CredentialsFromPEM(sc.CA, sc.Cert, sc.Key)
	if err != nil {
		return agent.Config{}, err
	}
	cfg := agent.Config{Name: sc.Name, StateDir: sc.StateDir, RunDir: sc.RunDir, RAMDir: sc.RAMDir,
		PeerAddr: sc.PeerAddr, Credentials: creds, Logger: quiet, Policy: lockstep.Policy{MaxInterval: 100 * time.Millisecond},
		PeerTimeout: 2 * time.Second, QMPTimeout: time.Second, Libvirt: sc.Libvirt}
	if sc.QMPTimeout > 0 {
		cfg.QMPTimeout = sc.QMPTimeout
	}
	if sc.Arbiter {
		cfg.Arbiter = yesArbiter{}
	}
	if sc.Verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return cfg, nil
}

func TestMain(m *testing.M) {
	if v := os.Getenv(agentEnv); v != "" {
		os.Exit(runTestAgent(v))
	}
	if v := os.Getenv(shimEnv); v != "" {
		os.Exit(runTestShim(v))
	}
	os.Exit(m.Run())
}

func runTestShim(v string) int {
	var sc shimConf
	if err := json.Unmarshal([]byte(v), &sc); err != nil {
		fmt.Fprintln(os.Stderr, "shim config:", err)
		return 2
	}
	name, role := "", agent.RolePrimary
	for i, a := range os.Args {
		if i+1 >= len(os.Args) {
			break
		}
		switch a {
		case "--vm":
			name = os.Args[i+1]
		case "--role":
			role = agent.Role(os.Args[i+1])
		}
	}
	cfg, err := sc.config()
	if err != nil {
		fmt.Fprintln(os.Stderr, "shim credentials:", err)
		return 2
	}
	ctx, stop := signalContext()
	defer stop()
	err = agent.RunShim(ctx, cfg, name, role)
	if err != nil {
		fmt.Fprintln(os.Stderr, "shim:", err)
		return 1
	}
	return 0
}

// shimCommand is a ShimCommand that runs this test binary as the shim of
// sc, whatever the process's environment says (two agents of one test
// process need shims of their own configurations).
func shimCommand(t *testing.T, sc shimConf) []string {
	t.Helper()
	env, err := exec.LookPath("env")
	if err != nil {
		t.Skipf("needs env(1) to start shims: %v", err)
	}
	b, err := json.Marshal(sc)
	if err != nil {
		t.Fatal(err)
	}
	return []string{env, shimEnv + "=" + string(b), os.Args[0]}
}

// shimsOn says whether the tests that can should run their agents with
// shims (FTCTL_SHIMS=true, as `ftctl agent` reads it).
func shimsOn() bool {
	on, _ := strconv.ParseBool(os.Getenv("FTCTL_SHIMS"))
	return on
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM)
}

// TestAgentRestartKeepsShim: with shims, a VM started and protected by
// agent A lives in a process of its own. A's agent goes away without
// stopping anything (as on kill -9, the shim is simply not told) and a new
// agent with the same directories finds the shim again: the VM shows
// protected with the same QEMU and shim, its counter never stopped, B's
// replica kept committing, and the new agent can stop it, which ends the
// shim.
func TestAgentRestartKeepsShim(t *testing.T) {
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, 3*time.Minute)
	ca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	B := newHost(t, ca, "host-b")
	cert, key, err := ca.Issue("host-a", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sc := shimConf{Name: "host-a", StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"),
		RAMDir: filepath.Join(dir, "ram"), CA: ca.CertPEM(), Cert: cert, Key: key}
	b, _ := json.Marshal(sc)
	t.Setenv(shimEnv, string(b))
	creds, err := wire.CredentialsFromPEM(ca.CertPEM(), cert, key)
	if err != nil {
		t.Fatal(err)
	}
	cfg := agent.Config{Name: sc.Name, StateDir: sc.StateDir, RunDir: sc.RunDir, RAMDir: sc.RAMDir,
		Credentials: creds, Logger: quiet, ShimCommand: []string{os.Args[0]}}
	startAgent := func() (*agent.Agent, *agent.Client, func()) {
		a, err := agent.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		actx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(actx) }()
		c := agent.NewClient(a.ControlSocket())
		for {
			if _, err := c.List(ctx); err == nil {
				break
			}
			select {
			case err := <-done:
				t.Fatalf("agent: %v", err)
			case <-time.After(20 * time.Millisecond):
			}
		}
		return a, c, func() { cancel(); <-done }
	}

	disk := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(disk, nil, 0o600)
	os.Truncate(disk, 16<<20)
	spec := vm.Spec{Name: "web", MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd, Accel: vm.AccelTCG,
		Cmdline: img.Cmdline + " ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=50ms",
		Disks:   []vm.Disk{{Path: disk}}}

	a1, c1, stop1 := startAgent()
	st, err := c1.Start(ctx, agent.StartRequest{Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Only matters when the test failed before stopping the VM.
		if st.ShimPID > 0 && !isZombie(st.ShimPID) {
			syscall.Kill(st.ShimPID, syscall.SIGKILL)
		}
		if st.PID > 0 && !isZombie(st.PID) {
			syscall.Kill(st.PID, syscall.SIGKILL)
		}
	})
	if st.ShimPID == 0 || st.ShimPID == os.Getpid() {
		t.Fatalf("VM runs in shim pid %d, want a process of its own", st.ShimPID)
	}
	waitSerialOf(t, ctx, a1, "web", func(b []byte) bool { return counterlog.LastDiskSeq(b) >= 2 })
	if _, err := c1.Pair(ctx, "web", B.a.PeerAddr()); err != nil {
		t.Fatal(err)
	}
	waitStateOf(t, ctx, c1, "web", agent.StateProtected)
	before, _ := c1.Get(ctx, "web")
	serialBefore, _ := a1.Serial("web")
	sb, _ := B.c.Get(ctx, "web")

	// The agent goes; nothing is stopped.
	stop1()

	a2, c2, stop2 := startAgent()
	defer stop2()
	after := waitStateOf(t, ctx, c2, "web", agent.StateProtected)
	if after.PID != before.PID || after.ShimPID != before.ShimPID {
		t.Fatalf("after the agent restart: QEMU %d shim %d, before QEMU %d shim %d", after.PID, after.ShimPID, before.PID, before.ShimPID)
	}
	serialAfter := waitSerialOf(t, ctx, a2, "web", func(b []byte) bool {
		return counterlog.Last(b) >= counterlog.Last(serialBefore)+5 && counterlog.LastDiskSeq(b) >= counterlog.LastDiskSeq(serialBefore)+3
	})
	if _, err := counterlog.Check(counterlog.Values(serialAfter)); err != nil {
		t.Fatalf("counter across the agent restart: %v", err)
	}
	for {
		s, err := B.c.Get(ctx, "web")
		if err == nil && s.State == agent.StateStandby && s.Epoch > sb.Epoch+5 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("B's replica stopped committing: %+v, %v (was epoch %d)", s, err, sb.Epoch)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := c2.Stop(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Get(ctx, "web"); err == nil {
		t.Fatal("the stopped VM is still listed")
	}
	for syscall.Kill(before.ShimPID, 0) == nil {
		if isZombie(before.ShimPID) {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("shim %d did not exit after its VM stopped", before.ShimPID)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	for i := len(b) - 1; i > 0; i-- {
		if b[i] == ')' {
			return i+2 < len(b) && b[i+2] == 'Z'
		}
	}
	return false
}

func waitStateOf(t *testing.T, ctx context.Context, c *agent.Client, name string, want agent.State) agent.VMStatus {
	t.Helper()
	var last agent.VMStatus
	var err error
	for {
		last, err = c.Get(ctx, name)
		if err == nil {
			checkStatus(t, last)
		}
		if err == nil && last.State == want {
			return last
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s never reached %s: last %+v (%v)", name, want, last, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func waitSerialOf(t *testing.T, ctx context.Context, a *agent.Agent, name string, ok func([]byte) bool) []byte {
	t.Helper()
	for {
		b, _ := a.Serial(name)
		if ok(b) {
			return b
		}
		select {
		case <-ctx.Done():
			t.Fatalf("serial of %s: %v; last %q", name, ctx.Err(), tailOf(b))
		case <-time.After(50 * time.Millisecond):
		}
	}
}
