package agent_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/vm"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// yesArbiter stands in for the client-oriented probe where the test itself
// knows the primary is dead (it killed it).
type yesArbiter struct{}

func (yesArbiter) MayPromote(context.Context, agent.ArbiterQuery) (bool, string, error) {
	return true, "test: the primary was killed", nil
}

type host struct {
	a      *agent.Agent
	c      *agent.Client
	cancel context.CancelFunc
	done   chan error
}

func newHost(t *testing.T, ca *wire.CA, name string) *host {
	t.Helper()
	return newHostWith(t, ca, name, nil)
}

// newHostWith is newHost with the test's own changes to the config.
func newHostWith(t *testing.T, ca *wire.CA, name string, change func(*agent.Config)) *host {
	t.Helper()
	_, _, creds := issueCreds(t, ca, name)
	dir := t.TempDir()
	cfg := agent.Config{
		Name: name, StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"), RAMDir: filepath.Join(dir, "ram"),
		PeerAddr: "127.0.0.1:0", Credentials: creds, Arbiter: yesArbiter{}, Logger: quiet,
		Policy: lockstep.Policy{MaxInterval: 100 * time.Millisecond}, PeerTimeout: 2 * time.Second,
		QMPTimeout: time.Second,
	}
	if change != nil {
		change(&cfg)
	}
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &host{a: a, c: agent.NewClient(a.ControlSocket()), cancel: cancel, done: make(chan error, 1)}
	go func() { h.done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-h.done; a.Close() })
	for a.PeerAddr() == "" {
		select {
		case err := <-h.done:
			t.Fatalf("agent %s: %v", name, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	return h
}

func (h *host) waitState(t *testing.T, ctx context.Context, name string, want agent.State) agent.VMStatus {
	t.Helper()
	var last agent.VMStatus
	for {
		s, err := h.c.Get(ctx, name)
		if err == nil {
			last = s
			checkStatus(t, s)
			if s.State == want {
				return s
			}
			if s.State == agent.StateDegraded || s.State == agent.StateStopped {
				t.Fatalf("%s on %s is %s, want %s: %s", name, h.a.Name(), s.State, want, s.Reason)
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s on %s never reached %s: last %+v (%v)", name, h.a.Name(), want, last, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// checkStatus fails on a status that contradicts itself, whenever a test
// happens to read one.
func checkStatus(t *testing.T, s agent.VMStatus) {
	t.Helper()
	if s.State == agent.StatePromoted && s.Role != agent.RolePrimary {
		t.Fatalf("%s is %s in role %s: a promoted VM is its host's primary", s.Name, s.State, s.Role)
	}
}

// newDisk makes an empty 16 MiB disk image at path.
func newDisk(t *testing.T, path string) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 16<<20); err != nil {
		t.Fatal(err)
	}
	return path
}

// guestSpec is VM "web": the test guest running workload (its kernel
// command line part), with a disk of its own.
func guestSpec(t *testing.T, img guestimage.Image, workload string) vm.Spec {
	t.Helper()
	return vm.Spec{Name: "web", MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd, Accel: vm.AccelTCG,
		Cmdline: img.Cmdline + " " + workload,
		Disks:   []vm.Disk{{Path: newDisk(t, filepath.Join(t.TempDir(), "disk.raw"))}}}
}

func (h *host) waitSerial(t *testing.T, ctx context.Context, name string, ok func([]byte) bool) []byte {
	t.Helper()
	for {
		b, _ := h.a.Serial(name)
		if ok(b) {
			return b
		}
		select {
		case <-ctx.Done():
			t.Fatalf("serial of %s on %s: %v; last %q", name, h.a.Name(), ctx.Err(), tailOf(b))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func tailOf(b []byte) []byte {
	if len(b) > 300 {
		return b[len(b)-300:]
	}
	return b
}

// TestPairFailoverFailback: a VM started by agent A is paired to agent B;
// A's QEMU is SIGKILLed and B promotes the last committed checkpoint; the VM
// is then protected back onto A (re-protection without stopping it) and
// handed back with a planned switchover, with no gap in its counter.
func TestPairFailoverFailback(t *testing.T) {
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, 5*time.Minute)
	ca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	A, B := newHost(t, ca, "host-a"), newHost(t, ca, "host-b")
	spec := guestSpec(t, img, "ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=50ms")

	// Errors a user can make, each clear.
	if _, err := A.c.Pair(ctx, "nope", B.a.PeerAddr()); !errors.Is(err, agent.ErrNotFound) {
		t.Fatalf("pair of an unknown VM: %v", err)
	}
	if _, err := A.c.Start(ctx, agent.StartRequest{Spec: vm.Spec{Name: "bad", MemoryMiB: 0, Kernel: img.Kernel}}); !errors.Is(err, vm.ErrInvalidSpec) {
		t.Fatalf("start with a bad spec: %v", err)
	}
	if _, err := A.c.Start(ctx, agent.StartRequest{Spec: spec}); err != nil {
		t.Fatal(err)
	}
	if _, err := A.c.Start(ctx, agent.StartRequest{Spec: spec}); !errors.Is(err, agent.ErrExists) {
		t.Fatalf("starting the same VM twice: %v", err)
	}
	if _, err := A.c.Pair(ctx, "web", "127.0.0.1:1"); !errors.Is(err, agent.ErrPeer) {
		t.Fatalf("pair with an unreachable host: %v", err)
	}
	A.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.LastDiskSeq(b) >= 2 })
	if _, err := A.c.Pair(ctx, "web", B.a.PeerAddr()); err != nil {
		t.Fatal(err)
	}
	if _, err := A.c.Pair(ctx, "web", B.a.PeerAddr()); !errors.Is(err, agent.ErrState) {
		t.Fatalf("pairing an already paired VM: %v", err)
	}
	A.waitState(t, ctx, "web", agent.StateProtected)
	B.waitState(t, ctx, "web", agent.StateStandby)
	time.Sleep(500 * time.Millisecond)
	st, _ := A.c.Get(ctx, "web")
	t.Logf("protected: %+v", st)

	// Host A's VM dies like its host: SIGKILL.
	before, _ := A.a.Serial("web")
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	sb := B.waitState(t, ctx, "web", agent.StatePromoted)
	t.Logf("promoted on B: %s", sb.Reason)
	after := B.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.Last(b) >= counterlog.Last(before)+5 })
	vals := counterlog.Values(after)
	if len(vals) == 0 || vals[0] > counterlog.Last(before)+1 {
		t.Fatalf("B resumed at counter %v, but A had only reached %d", vals, counterlog.Last(before))
	}
	if _, err := counterlog.Check(vals); err != nil {
		t.Fatalf("B's counter: %v", err)
	}

	// Re-protect onto A (the old host is back) without stopping the VM.
	if _, err := B.c.Pair(ctx, "web", A.a.PeerAddr()); err != nil {
		t.Fatal(err)
	}
	B.waitState(t, ctx, "web", agent.StateProtected)
	time.Sleep(500 * time.Millisecond)
	res, err := B.c.Failover(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("handed back to A at epoch %d", res.Epoch)
	atHandover, err := B.a.Serial("web")
	if err != nil {
		t.Fatal(err)
	}
	A.waitState(t, ctx, "web", agent.StatePromoted)
	if s, err := B.c.Get(ctx, "web"); err != nil || s.State != agent.StateHandedOver || s.PID != 0 {
		t.Fatalf("after the handover B shows %+v, %v; want handed-over and no QEMU", s, err)
	}
	back := A.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.Last(b) >= counterlog.Last(atHandover)+5 })
	if _, err := counterlog.Check(counterlog.Values(counterlog.Stitch(atHandover, back))); err != nil {
		t.Fatalf("counter across the planned failback: %v", err)
	}
	if err := A.c.Stop(ctx, "web"); err != nil {
		t.Fatal(err)
	}
}

// TestHungPrimary: a primary QEMU frozen with SIGSTOP stops answering QMP.
// Unprotected, the hang is only reported (status shows it hung and not
// responding) and clears when QEMU runs again. Protected, A kills the hung
// QEMU and tells B, whose agent promotes at once; A shows the VM stopped
// and why.
func TestHungPrimary(t *testing.T) {
	img := testenv.Guest(t)
	ctx := testenv.Deadline(t, 3*time.Minute)
	ca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	A, B := newHost(t, ca, "host-a"), newHost(t, ca, "host-b")
	spec := vm.Spec{Name: "web", MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd, Accel: vm.AccelTCG,
		Cmdline: img.Cmdline + " ftguest.run=counter ftguest.interval=50ms"}
	st, err := A.c.Start(ctx, agent.StartRequest{Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	A.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.Last(b) >= 2 })

	waitHealth := func(hung bool) agent.VMStatus {
		t.Helper()
		for {
			s, err := A.c.Get(ctx, "web")
			if err == nil && strings.HasPrefix(s.QEMUHealth, "QEMU hung") == hung {
				return s
			}
			select {
			case <-ctx.Done():
				t.Fatalf("QEMU health never became hung=%v: %+v, %v", hung, s, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	if err := syscall.Kill(st.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	s := waitHealth(true)
	t.Logf("unprotected, hang reported after %v: %s", time.Since(t0).Round(time.Millisecond), s.QEMUHealth)
	if s.State != agent.StateUnprotected || s.RunState != "not-responding" || s.PID != st.PID {
		t.Fatalf("a hung unprotected VM must be left alone and shown hung: %+v", s)
	}
	if err := syscall.Kill(st.PID, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if s = waitHealth(false); s.QEMUHealth != "" || s.State != agent.StateUnprotected {
		t.Fatalf("after SIGCONT: %+v", s)
	}

	if _, err := A.c.Pair(ctx, "web", B.a.PeerAddr()); err != nil {
		t.Fatal(err)
	}
	A.waitState(t, ctx, "web", agent.StateProtected)
	B.waitState(t, ctx, "web", agent.StateStandby)
	A.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.Last(b) >= 10 })
	if err := syscall.Kill(st.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	before, _ := A.a.Serial("web")
	sb := B.waitState(t, ctx, "web", agent.StatePromoted)
	t.Logf("protected, B promoted %v after the SIGSTOP: %s", time.Since(t0).Round(time.Millisecond), sb.Reason)
	if !strings.Contains(sb.Reason, "QEMU hung") || !strings.Contains(sb.Reason, "primary's agent reports") {
		t.Fatalf("B's reason does not say the primary reported a hung QEMU: %q", sb.Reason)
	}
	sa, err := A.c.Get(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if sa.State != agent.StateStopped || sa.PID != 0 || !strings.Contains(sa.Reason, "killed it") {
		t.Fatalf("A after killing its hung QEMU: %+v", sa)
	}
	after := B.waitSerial(t, ctx, "web", func(b []byte) bool { return counterlog.Last(b) >= counterlog.Last(before)+3 })
	if vals := counterlog.Values(after); len(vals) == 0 || vals[0] > counterlog.Last(before)+1 {
		t.Fatalf("B resumed at counter %v, but A had only reached %d", vals, counterlog.Last(before))
	}
}

// issueCreds issues name a certificate from ca for 127.0.0.1: the PEM
// files a shim is started with, and the link credentials an agent uses.
func issueCreds(t *testing.T, ca *wire.CA, name string) (cert, key []byte, creds *wire.Credentials) {
	t.Helper()
	cert, key, err := ca.Issue(name, []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	if creds, err = wire.CredentialsFromPEM(ca.CertPEM(), cert, key); err != nil {
		t.Fatal(err)
	}
	return cert, key, creds
}
