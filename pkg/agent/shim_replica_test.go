package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/vm"
)

// agentEnv makes the test binary run an agent with shims (the real one is
// `ftctl agent --shims`), so that a test can kill -9 it.
const agentEnv = "FTCTL_AGENT_TEST_AGENT"

func runTestAgent(v string) int {
	// Its shims are the test binary too, as shims, not as agents.
	os.Unsetenv(agentEnv)
	os.Setenv(shimEnv, v)
	var sc shimConf
	if err := json.Unmarshal([]byte(v), &sc); err != nil {
		fmt.Fprintln(os.Stderr, "agent config:", err)
		return 2
	}
	cfg, err := sc.config()
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent credentials:", err)
		return 2
	}
	cfg.ShimCommand = []string{os.Args[0]}
	a, err := agent.New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 1
	}
	ctx, stop := signalContext()
	defer stop()
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 1
	}
	return 0
}

// agentProc is an agent running in a process of its own.
type agentProc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	c      *agent.Client
}

// startAgentProc runs an agent with shims as a child process, logging to
// logPath, and waits until it answers.
func startAgentProc(t *testing.T, ctx context.Context, sc shimConf, logPath string) *agentProc {
	t.Helper()
	b, err := json.Marshal(sc)
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), agentEnv+"="+string(b))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &agentProc{cmd: cmd, exited: make(chan struct{}), c: agent.NewClient(filepath.Join(sc.RunDir, "agent.sock"))}
	go func() { cmd.Wait(); close(p.exited) }()
	t.Cleanup(p.kill)
	for {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := p.c.List(rctx)
		cancel()
		if err == nil {
			return p
		}
		select {
		case <-p.exited:
			t.Fatalf("agent exited at start: %s", tailOf(readFile(logPath)))
		case <-ctx.Done():
			t.Fatalf("agent never answered: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// kill is kill -9.
func (p *agentProc) kill() {
	p.cmd.Process.Kill()
	<-p.exited
}

func readFile(p string) []byte {
	b, _ := os.ReadFile(p)
	return b
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// TestSecondaryAgentRestartKeepsReplica: B's agent runs replicas in shims.
// A pairing reaching B's agent is redirected to a replica shim of its own;
// kill -9 of B's agent then leaves the pairing alone: A stays protected
// with no state change (no re-sync), B's shim keeps committing epochs, and
// A's health path still hears B alive. The restarted agent finds the
// replica shim again and lists it. Then A's QEMU is killed, and B's replica
// shim promotes: the VM runs on in that shim, shown by B's agent as a
// promoted primary, its counter going on from the last checkpoint.
func TestSecondaryAgentRestartKeepsReplica(t *testing.T) {
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, 3*time.Minute)
	ca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	A := newHost(t, ca, "host-a")
	cert, key, err := ca.Issue("host-b", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sc := shimConf{Name: "host-b", StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"),
		RAMDir: filepath.Join(dir, "ram"), CA: ca.CertPEM(), Cert: cert, Key: key,
		PeerAddr: "127.0.0.1:" + freePort(t), Arbiter: true, Verbose: true}
	logPath := filepath.Join(dir, "agent.log")
	shimLog := agent.ShimLog(sc.RunDir, "web")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("B's agent log:\n%s", tailN(readFile(logPath), 6000))
			t.Logf("B's shim log:\n%s", tailN(readFile(shimLog), 10000))
		}
	})
	B := startAgentProc(t, ctx, sc, logPath)

	disk := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(disk, nil, 0o600)
	os.Truncate(disk, 16<<20)
	spec := vm.Spec{Name: "web", MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd, Accel: vm.AccelTCG,
		Cmdline: img.Cmdline + " ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=50ms",
		Disks:   []vm.Disk{{Path: disk}}}
	st, err := A.c.Start(ctx, agent.StartRequest{Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	A.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.LastDiskSeq(b) >= 2 })
	if _, err := A.c.Pair(ctx, "web", sc.PeerAddr); err != nil {
		t.Fatal(err)
	}
	A.waitState(t, ctx, "web", agent.StateProtected)
	sb := waitStateOf(t, ctx, B.c, "web", agent.StateStandby)
	var leftover []int
	t.Cleanup(func() {
		// Only matters when the test failed before stopping the VM.
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		shim := agent.NewClient(agent.ShimSocket(sc.RunDir, "web"))
		if info, err := shim.ShimInfo(cctx); err == nil {
			leftover = append(leftover, info.PID)
		}
		if st, err := shim.Get(cctx, "web"); err == nil {
			leftover = append(leftover, st.PID)
		}
		for _, pid := range leftover {
			if pid > 0 && !isZombie(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	leftover = append(leftover, sb.ShimPID, sb.PID)
	if sb.Role != agent.RoleSecondary || sb.ShimPID == 0 || sb.ShimPID == B.cmd.Process.Pid || sb.PID == 0 {
		t.Fatalf("B's replica should live in a shim of its own with its standby: %+v (agent pid %d)", sb, B.cmd.Process.Pid)
	}
	before, err := A.c.Get(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}

	// B's agent dies; nothing else on B is told.
	B.kill()
	shim := agent.NewClient(agent.ShimSocket(sc.RunDir, "web"))
	waitEpoch := func(c *agent.Client, past uint64) agent.VMStatus {
		t.Helper()
		for {
			s, err := c.Get(ctx, "web")
			if err == nil && s.State == agent.StateStandby && s.Epoch > past {
				return s
			}
			select {
			case <-ctx.Done():
				t.Fatalf("B's replica stopped committing: %+v, %v (want epoch > %d)", s, err, past)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	// Longer than A's peer timeout (2 s): a link to the dead agent would
	// have been declared dead by now.
	time.Sleep(3 * time.Second)
	s1 := waitEpoch(shim, sb.Epoch+10)
	during, err := A.c.Get(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if during.State != agent.StateProtected || !during.Since.Equal(before.Since) || during.Checkpoints <= before.Checkpoints {
		t.Fatalf("with B's agent dead A shows %+v; before it was %+v", during, before)
	}
	if during.PeerHealth != "alive" {
		t.Fatalf("A's health path says B is %q after only B's agent died", during.PeerHealth)
	}
	t.Logf("B's agent dead: B's shim committed epochs %d..%d, A protected since %v", sb.Epoch, s1.Epoch, before.Since)

	// The restarted agent finds the replica shim again.
	B = startAgentProc(t, ctx, sc, logPath)
	s2 := waitEpoch(B.c, s1.Epoch)
	if s2.Role != agent.RoleSecondary || s2.ShimPID != sb.ShimPID || s2.PID != sb.PID {
		t.Fatalf("after B's agent restart: %+v; before: shim %d standby %d", s2, sb.ShimPID, sb.PID)
	}
	list, err := B.c.List(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "web" {
		t.Fatalf("B's agent lists %+v, %v", list, err)
	}

	// B's replica shim dies (kill -9: its standby QEMU lives on): A
	// degrades and pairs again by itself. The shim it remembers is gone,
	// so it asks B's agent, which starts a new replica shim, and kills
	// the old standby, useless without its shim.
	syscall.Kill(sb.ShimPID, syscall.SIGKILL)
	for {
		s, err := A.c.Get(ctx, "web")
		if err == nil && s.State == agent.StateProtected && s.Since.After(before.Since) {
			t.Logf("A protected again after B's replica shim died: %s", s.Reason)
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("A never re-paired after B's replica shim died: %+v, %v", s, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	old := sb
	sb = waitStateOf(t, ctx, B.c, "web", agent.StateStandby)
	leftover = append(leftover, sb.ShimPID, sb.PID)
	if sb.ShimPID == old.ShimPID || sb.ShimPID == 0 || sb.PID == old.PID {
		t.Fatalf("B's new replica: %+v; the dead shim was %d", sb, old.ShimPID)
	}
	for !isZombie(old.PID) {
		select {
		case <-ctx.Done():
			t.Fatalf("the dead shim's standby QEMU %d still runs", old.PID)
		case <-time.After(50 * time.Millisecond):
		}
	}

	// A's host fails: B's replica shim takes over and the VM runs there.
	serialA, _ := A.a.Serial("web")
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	sp := waitStateOf(t, ctx, B.c, "web", agent.StatePromoted)
	t.Logf("promoted in B's replica shim: %s", sp.Reason)
	if sp.Role != agent.RolePrimary || sp.ShimPID != sb.ShimPID || sp.PID != sb.PID {
		t.Fatalf("promoted: %+v; want the standby %d in shim %d", sp, sb.PID, sb.ShimPID)
	}
	var after []byte
	for counterlog.Last(after) < counterlog.Last(serialA)+5 {
		select {
		case <-ctx.Done():
			t.Fatalf("B's promoted VM: counter at %d, A had reached %d", counterlog.Last(after), counterlog.Last(serialA))
		case <-time.After(50 * time.Millisecond):
		}
		after, _ = B.c.Serial(ctx, "web")
	}
	vals := counterlog.Values(after)
	if len(vals) == 0 || vals[0] > counterlog.Last(serialA)+1 {
		t.Fatalf("B resumed at counter %v, but A had only reached %d", vals, counterlog.Last(serialA))
	}
	if _, err := counterlog.Check(vals); err != nil {
		t.Fatalf("B's counter: %v", err)
	}
	if err := B.c.Stop(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	for !isZombie(sb.ShimPID) {
		select {
		case <-ctx.Done():
			t.Fatalf("B's shim %d did not exit after its VM stopped", sb.ShimPID)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if _, err := B.c.Get(ctx, "web"); err == nil {
		t.Fatal("the stopped VM is still listed on B")
	}
}

func tailN(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
