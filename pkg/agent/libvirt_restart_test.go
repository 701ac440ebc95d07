package agent_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

// TestLibvirtLostAfterRestart: without shims the agent itself serves a
// libvirt domain's devices, so its restart cuts them. The restarted agent
// does not forget the domain: it lists it as lost (unprotected, saying
// why and what to do), refuses to adopt it, and lets go of it when libvirt
// starts it again (prepare), or says it stopped, or the user stops it.
// (No libvirtd: the hook's requests are made by hand.)
func TestLibvirtLostAfterRestart(t *testing.T) {
	ctx := testenv.Deadline(t, 30*time.Second)
	wca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	_, _, creds := issueCreds(t, wca, "host-a")
	dir, err := os.MkdirTemp("", "ftlost")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := agent.Config{Name: "host-a", StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"),
		RAMDir: filepath.Join(dir, "ram"), Credentials: creds, Logger: quiet}
	run := func() (*agent.Agent, *agent.Client, func()) {
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
			case <-time.After(10 * time.Millisecond):
			}
		}
		var once sync.Once
		return a, c, func() { once.Do(func() { cancel(); <-done }) }
	}
	disk := newDisk(t, filepath.Join(dir, "disk.raw"))
	prepared, _, err := domxml.Prepare(libvirttest.GuestDomain{
		Name: "web", Kernel: "/boot/vmlinuz", Initrd: "/boot/initrd", Serial: "/var/log/web.serial",
		Devices: "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='" + disk + "'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
	}.XML(), domxml.Options{SocketDir: filepath.Join(dir, "sock")})
	if err != nil {
		t.Fatal(err)
	}

	a1, c1, stop1 := run()
	t.Cleanup(func() { a1.Close() })
	if err := c1.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatal(err)
	}
	if s, err := c1.Get(ctx, "web"); err != nil || !strings.Contains(s.Reason, "prepared") {
		t.Fatalf("a prepared domain's status: %+v, %v", s, err)
	}
	// The agent goes (as on kill -9: nothing is closed, nothing told).
	stop1()

	a2, c2, stop2 := run()
	defer func() { stop2(); a2.Close() }()
	s, err := c2.Get(ctx, "web")
	if err != nil {
		t.Fatalf("the restarted agent forgot the domain: %v", err)
	}
	if s.State != agent.StateUnprotected || !strings.HasPrefix(s.Reason, "lost:") || !strings.Contains(s.Reason, "agent process") || !strings.Contains(s.Error, "virsh") {
		t.Fatalf("the restarted agent shows %+v; want it lost, with why and what to do", s)
	}
	t.Logf("after the restart: %s; %s", s.Reason, s.Error)
	if _, err := c2.AdoptDomain(ctx, "web", []byte(prepared), ""); !errors.Is(err, agent.ErrState) || !strings.Contains(err.Error(), "lost") {
		t.Fatalf("adopting a lost domain: %v", err)
	}
	if _, err := c2.Pair(ctx, "web", "127.0.0.1:1"); !errors.Is(err, agent.ErrState) {
		t.Fatalf("pairing a lost domain: %v", err)
	}

	// libvirt starts the domain again: the hook's prepare replaces the
	// lost run with a prepared one.
	if err := c2.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatal(err)
	}
	if s, err := c2.Get(ctx, "web"); err != nil || strings.HasPrefix(s.Reason, "lost") || !strings.Contains(s.Reason, "prepared") {
		t.Fatalf("after a new prepare: %+v, %v", s, err)
	}
	if l, err := c2.List(ctx); err != nil || len(l) != 1 {
		t.Fatalf("listed: %+v, %v; want the prepared domain once", l, err)
	}
	// Restarted again, and then stopped by the user: forgotten for good.
	stop2()
	a3, c3, stop3 := run()
	defer func() { stop3(); a3.Close() }()
	if s, err := c3.Get(ctx, "web"); err != nil || !strings.HasPrefix(s.Reason, "lost:") {
		t.Fatalf("after the second restart: %+v, %v", s, err)
	}
	if err := c3.Stop(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := c3.Get(ctx, "web"); !errors.Is(err, agent.ErrNotFound) {
		t.Fatalf("a stopped lost domain is still listed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, "vms", "web.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("its record is still on disk: %v", err)
	}
}

// TestLibvirtAgentKillKeepsDomain: with shims on both hosts, a libvirt
// domain prepared and adopted through A's agent lives in A's shim, its
// replica in B's replica shim (whose standby is a paused libvirt domain
// on B). kill -9 of A's agent changes nothing: the domain runs on under
// libvirt with its disk served (the guest's disk writer advances), A stays
// protected without a state change and B commits epochs; the restarted
// agent lists the domain, protected, with the same QEMU and shim. Then A's
// QEMU is SIGKILLed: B promotes into B's libvirt domain, and the counter
// goes on from the last committed checkpoint.
func TestLibvirtAgentKillKeepsDomain(t *testing.T) {
	testenv.Guest(t)
	hostA := libvirttest.Start(t, libvirttest.Options{})
	hostB := libvirttest.Start(t, libvirttest.Options{})
	ca, cb := hostA.Conn(t), hostB.Conn(t)
	ctx := testenv.Deadline(t, 3*time.Minute)
	wca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	conf := func(name, libvirtSock, peer string) (shimConf, string) {
		cert, key, err := wca.Issue(name, []string{"127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		dir, err := os.MkdirTemp("", "ftka")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		sc := shimConf{Name: name, StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"),
			RAMDir: filepath.Join(dir, "ram"), CA: wca.CertPEM(), Cert: cert, Key: key, PeerAddr: peer,
			Arbiter: peer != "", Libvirt: libvirtSock, QMPTimeout: 2 * time.Second, Verbose: true}
		logPath := filepath.Join(dir, "agent.log")
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("%s's agent log:\n%s", name, tailN(readFile(logPath), 4000))
				t.Logf("%s's shim log:\n%s", name, tailN(readFile(agent.ShimLog(sc.RunDir, "web")), 8000))
			}
		})
		return sc, logPath
	}
	scA, logA := conf("host-a", hostA.Socket, "")
	scB, logB := conf("host-b", hostB.Socket, "127.0.0.1:"+freePort(t))
	var leftover []int
	t.Cleanup(func() {
		// Only matters when the test failed before the VM stopped: shims
		// outlive their agents by design.
		for _, sc := range []shimConf{scA, scB} {
			cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if info, err := agent.NewClient(agent.ShimSocket(sc.RunDir, "web")).ShimInfo(cctx); err == nil {
				leftover = append(leftover, info.PID)
			}
			cancel()
		}
		for _, pid := range leftover {
			if pid > 0 && !isZombie(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	A := startAgentProc(t, ctx, scA, logA)
	B := startAgentProc(t, ctx, scB, logB)

	dir := t.TempDir()
	disk := newDisk(t, filepath.Join(dir, "disk.raw"))
	prepared := preparedGuest(t, filepath.Join(dir, "a"), disk)
	if err := ca.Define(ctx, prepared); err != nil {
		t.Fatal(err)
	}
	if err := A.c.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatal(err)
	}
	if err := ca.Start(ctx, "web", false); err != nil {
		t.Fatalf("start on A: %v\n%s", err, hostA.QEMULog("web"))
	}
	live, err := ca.XML(ctx, "web", false)
	if err != nil {
		t.Fatal(err)
	}
	readSerial(t, ctx, serialOf(hostA), func(b []byte) bool { return counterlog.LastDiskSeq(b) >= 2 })
	if _, err := A.c.AdoptDomain(ctx, "web", []byte(live), scB.PeerAddr); err != nil {
		t.Fatal(err)
	}
	sa := waitStateOf(t, ctx, A.c, "web", agent.StateProtected)
	sb := waitStateOf(t, ctx, B.c, "web", agent.StateStandby)
	leftover = append(leftover, sa.ShimPID, sb.ShimPID)
	if sa.ShimPID == 0 || sa.ShimPID == A.cmd.Process.Pid || sa.PID == 0 {
		t.Fatalf("A's domain should be served by a shim of its own: %+v (agent pid %d)", sa, A.cmd.Process.Pid)
	}
	if sb.Role != agent.RoleSecondary || sb.ShimPID == 0 || sb.ShimPID == B.cmd.Process.Pid {
		t.Fatalf("B's replica should live in a replica shim: %+v (agent pid %d)", sb, B.cmd.Process.Pid)
	}
	if st, err := cb.State(ctx, "web"); err != nil || st.Code != libvirt.StatePaused {
		t.Fatalf("the standby on B's libvirt: %v %v, want paused", st, err)
	}

	// A's agent dies like a process can: kill -9.
	serialBefore, _ := os.ReadFile(serialOf(hostA))
	A.kill()
	// Longer than the peer timeout (2 s): a link the dead agent held
	// would be declared dead by now.
	time.Sleep(3 * time.Second)
	shimA := agent.NewClient(agent.ShimSocket(scA.RunDir, "web"))
	for {
		s, err := B.c.Get(ctx, "web")
		if err == nil && s.State == agent.StateStandby && s.Epoch > sb.Epoch+5 {
			t.Logf("A's agent dead: B committed epochs %d..%d", sb.Epoch, s.Epoch)
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("B stopped committing with A's agent dead: %+v, %v (was epoch %d)", s, err, sb.Epoch)
		case <-time.After(50 * time.Millisecond):
		}
	}
	// The guest's disk keeps working: its writer's records advance.
	during := readSerial(t, ctx, serialOf(hostA), func(b []byte) bool {
		return counterlog.LastDiskSeq(b) >= counterlog.LastDiskSeq(serialBefore)+3 && counterlog.Last(b) >= counterlog.Last(serialBefore)+5
	})
	if _, err := counterlog.Check(counterlog.Values(during)); err != nil {
		t.Fatalf("counter with A's agent dead: %v", err)
	}
	if s, err := shimA.Get(ctx, "web"); err != nil || s.State != agent.StateProtected || !s.Since.Equal(sa.Since) || s.Checkpoints <= sa.Checkpoints {
		t.Fatalf("A's shim with its agent dead: %+v, %v; before: %+v", s, err, sa)
	}

	// The restarted agent finds the shim and lists the domain.
	A = startAgentProc(t, ctx, scA, logA)
	list, err := A.c.List(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "web" {
		t.Fatalf("the restarted agent lists %+v, %v", list, err)
	}
	sa2 := list[0]
	if sa2.State != agent.StateProtected || sa2.PID != sa.PID || sa2.ShimPID != sa.ShimPID || !sa2.Since.Equal(sa.Since) {
		t.Fatalf("after A's agent restart: %+v; before: %+v", sa2, sa)
	}

	// A's host fails: its QEMU is SIGKILLed. B promotes its standby
	// domain.
	before, _ := os.ReadFile(serialOf(hostA))
	if err := syscall.Kill(sa.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	sp := waitStateOf(t, ctx, B.c, "web", agent.StatePromoted)
	t.Logf("promoted on B: %s", sp.Reason)
	if sp.ShimPID != sb.ShimPID || sp.PID != sb.PID {
		t.Errorf("promoted: %+v; want the standby %d in shim %d", sp, sb.PID, sb.ShimPID)
	}
	waitLibvirt(t, ctx, cb, "B's libvirt to show web running", func(s libvirt.State, err error) bool { return err == nil && s.Code == libvirt.StateRunning })
	after := readSerial(t, ctx, serialOf(hostB), func(b []byte) bool { return counterlog.Last(b) >= counterlog.Last(before)+5 })
	vals := counterlog.Values(after)
	if len(vals) == 0 || vals[0] > counterlog.Last(before)+1 {
		t.Fatalf("B resumed at counter %v, but A had only reached %d", vals[:min(5, len(vals))], counterlog.Last(before))
	}
	if _, err := counterlog.Check(vals); err != nil {
		t.Fatalf("B's counter: %v", err)
	}
	waitLibvirt(t, ctx, ca, "A's libvirt to show web shut off", func(s libvirt.State, err error) bool { return err == nil && !s.Active() })
	// libvirt on A reports the stop (the hook would): A's shim ends.
	if err := A.c.DomainStopped(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := A.c.Get(ctx, "web"); !errors.Is(err, agent.ErrNotFound) {
		t.Errorf("A still knows web after DomainStopped: %v", err)
	}
	// The VM is B's: stopping it stops B's libvirt domain and its shim.
	if err := B.c.Stop(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	waitLibvirt(t, ctx, cb, "B's libvirt to show web shut off", func(s libvirt.State, err error) bool { return err == nil && !s.Active() })
	for _, pid := range []int{sa.ShimPID, sb.ShimPID} {
		for !isZombie(pid) {
			select {
			case <-ctx.Done():
				t.Fatalf("shim %d still runs after its domain stopped", pid)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

// TestLibvirtShimDeathLeavesLost: with shims, a libvirt domain's shim
// serves its devices; when that shim dies (kill -9) the agent, which
// still runs, reports the domain lost rather than dropping it, and the
// domain's next start (prepare) gets a new shim. (No libvirtd needed.)
func TestLibvirtShimDeathLeavesLost(t *testing.T) {
	ctx := testenv.Deadline(t, 60*time.Second)
	wca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	cert, key, creds := issueCreds(t, wca, "host-a")
	dir, err := os.MkdirTemp("", "ftlost")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sc := shimConf{Name: "host-a", StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"),
		RAMDir: filepath.Join(dir, "ram"), CA: wca.CertPEM(), Cert: cert, Key: key, Verbose: true}
	a, err := agent.New(agent.Config{Name: sc.Name, StateDir: sc.StateDir, RunDir: sc.RunDir, RAMDir: sc.RAMDir,
		Credentials: creds, Logger: quiet, ShimCommand: shimCommand(t, sc)})
	if err != nil {
		t.Fatal(err)
	}
	actx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(actx) }()
	var shims []int
	t.Cleanup(func() {
		cancel()
		<-done
		a.Close()
		for _, pid := range shims {
			if !isZombie(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	c := agent.NewClient(a.ControlSocket())
	for {
		if _, err := c.List(ctx); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	disk := newDisk(t, filepath.Join(dir, "disk.raw"))
	prepared, _, err := domxml.Prepare(libvirttest.GuestDomain{
		Name: "web", Kernel: "/boot/vmlinuz", Initrd: "/boot/initrd",
		Devices: "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='" + disk + "'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
	}.XML(), domxml.Options{SocketDir: filepath.Join(dir, "sock")})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatal(err)
	}
	s, err := c.Get(ctx, "web")
	if err != nil || s.ShimPID == 0 || s.ShimPID == os.Getpid() || !strings.Contains(s.Reason, "prepared") {
		t.Fatalf("a prepared domain should be served by a shim: %+v, %v", s, err)
	}
	shims = append(shims, s.ShimPID)
	syscall.Kill(s.ShimPID, syscall.SIGKILL)
	for {
		l, err := c.Get(ctx, "web")
		if err == nil && strings.HasPrefix(l.Reason, "lost:") {
			if !strings.Contains(l.Reason, "shim") || l.ShimPID != 0 {
				t.Fatalf("lost domain: %+v", l)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("after its shim died the domain shows %+v, %v; want it lost", l, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := c.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatalf("prepare after the shim died: %v", err)
	}
	s2, err := c.Get(ctx, "web")
	if err != nil || s2.ShimPID == 0 || s2.ShimPID == s.ShimPID || !strings.Contains(s2.Reason, "prepared") {
		t.Fatalf("prepared again: %+v, %v; the dead shim was %d", s2, err, s.ShimPID)
	}
	shims = append(shims, s2.ShimPID)
	if err := c.Stop(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	for !isZombie(s2.ShimPID) {
		select {
		case <-ctx.Done():
			t.Fatalf("shim %d still runs after its prepared domain was stopped", s2.ShimPID)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
