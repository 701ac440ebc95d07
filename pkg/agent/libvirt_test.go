package agent_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

// serialInDaemon is the guest's serial file as the domain XML names it:
// inside each private libvirtd's own /var/log/libvirt, so the primary and
// the standby (two "hosts" on one machine, one XML) write different files.
const serialInDaemon = "/var/log/libvirt/qemu/web-serial.log"

func serialOf(d *libvirttest.Daemon) string {
	return filepath.Join(d.Dir, "log", "qemu", "web-serial.log")
}

// newLibvirtHost is newHost with a libvirtd of its own ("" for none).
// With FTCTL_SHIMS=true its VMs and replicas live in shims.
func newLibvirtHost(t *testing.T, ca *wire.CA, name, libvirtSock string) *host {
	t.Helper()
	cert, key, creds := issueCreds(t, ca, name)
	dir, err := os.MkdirTemp("", "ftag")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := agent.Config{
		Name: name, StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"), RAMDir: filepath.Join(dir, "ram"),
		PeerAddr: "127.0.0.1:0", Credentials: creds, Arbiter: yesArbiter{}, Logger: quiet, Libvirt: libvirtSock,
		Policy: lockstep.Policy{MaxInterval: 100 * time.Millisecond}, PeerTimeout: 2 * time.Second,
		QMPTimeout: 2 * time.Second,
	}
	if shimsOn() {
		cfg.ShimCommand = shimCommand(t, shimConf{Name: name, StateDir: cfg.StateDir, RunDir: cfg.RunDir, RAMDir: cfg.RAMDir,
			CA: ca.CertPEM(), Cert: cert, Key: key, PeerAddr: cfg.PeerAddr, Arbiter: true, Libvirt: libvirtSock,
			QMPTimeout: cfg.QMPTimeout, Verbose: true})
		t.Cleanup(func() {
			if t.Failed() {
				logs, _ := filepath.Glob(filepath.Join(cfg.RunDir, "vms", "*.shim.log"))
				for _, l := range logs {
					t.Logf("%s's shim log %s:\n%s", name, l, tailN(readFile(l), 6000))
				}
			}
		})
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

// preparedGuest returns the test guest as a libvirt domain with a raw
// disk, prepared for protection with its sockets in sockDir.
func preparedGuest(t *testing.T, sockDir, disk string) string {
	t.Helper()
	img := testenv.Guest(t)
	g := libvirttest.GuestDomain{
		Name: "web", Kernel: img.Kernel, Initrd: img.Initrd, Serial: serialInDaemon,
		Cmdline: img.Cmdline + " ftguest.run=counter,disk ftguest.interval=50ms ftguest.diskinterval=50ms",
		Devices: fmt.Sprintf("    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='%s'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n", disk),
	}
	x, _, err := domxml.Prepare(g.XML(), domxml.Options{SocketDir: sockDir})
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func waitLibvirt(t *testing.T, ctx context.Context, c *libvirt.Conn, what string, ok func(libvirt.State, error) bool) libvirt.State {
	t.Helper()
	for {
		st, err := c.State(ctx, "web")
		if ok(st, err) {
			return st
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: last %v, %v", what, st, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func readSerial(t *testing.T, ctx context.Context, path string, ok func([]byte) bool) []byte {
	t.Helper()
	for {
		b, _ := os.ReadFile(path)
		if ok(b) {
			return b
		}
		select {
		case <-ctx.Done():
			t.Fatalf("serial %s: %v; last %q", path, ctx.Err(), tailOf(b))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestLibvirtDomainFailover: a prepared libvirt domain on host A is
// adopted by A's agent and protected on B, whose standby is a libvirt
// domain started paused; A's QEMU is SIGKILLed; B promotes, its libvirt
// shows the domain running and its counter goes on from the last
// committed checkpoint, A's libvirt shows it shut off, and B's persistent
// definition is the promoted one.
func TestLibvirtDomainFailover(t *testing.T) {
	testenv.Guest(t)
	hostA := libvirttest.Start(t, libvirttest.Options{})
	hostB := libvirttest.Start(t, libvirttest.Options{})
	ca, cb := hostA.Conn(t), hostB.Conn(t)
	ctx := testenv.Deadline(t, 150*time.Second)
	wca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	A := newLibvirtHost(t, wca, "host-a", hostA.Socket)
	B := newLibvirtHost(t, wca, "host-b", hostB.Socket)
	N := newLibvirtHost(t, wca, "host-n", "") // no libvirt

	dir, err := os.MkdirTemp("", "ftlvd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	disk := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	prepared := preparedGuest(t, filepath.Join(dir, "a"), disk)

	// What the agent refuses, each clearly.
	if err := A.c.PrepareDomain(ctx, "web", []byte(strings.Replace(prepared, "<name>web</name>", "<name>other</name>", 1))); !errors.Is(err, agent.ErrBadRequest) {
		t.Fatalf("prepare with the XML of another domain: %v", err)
	}
	standbyXML, err := domxml.Standby(prepared, domxml.StandbyOptions{SocketDir: filepath.Join(dir, "s"), RAMFile: filepath.Join(dir, "s", "r.ram")})
	if err != nil {
		t.Fatal(err)
	}
	if err := A.c.PrepareDomain(ctx, "web", []byte(standbyXML)); !errors.Is(err, agent.ErrBadRequest) || !strings.Contains(err.Error(), "standby") {
		t.Fatalf("prepare of a standby's XML: %v", err)
	}

	if err := ca.Define(ctx, prepared); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := A.c.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatal(err)
	}
	t.Logf("PrepareDomain took %v", time.Since(t0))
	if err := A.c.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatalf("PrepareDomain is not idempotent: %v", err)
	}
	if err := ca.Start(ctx, "web", false); err != nil {
		t.Fatalf("start on A: %v\n%s", err, hostA.QEMULog("web"))
	}
	live, err := ca.XML(ctx, "web", false)
	if err != nil {
		t.Fatal(err)
	}
	readSerial(t, ctx, serialOf(hostA), func(b []byte) bool { return counterlog.LastDiskSeq(b) >= 2 })

	// A peer without libvirt cannot hold a libvirt domain's standby.
	if _, err := A.c.AdoptDomain(ctx, "web", []byte(live), N.a.PeerAddr()); err == nil || !strings.Contains(err.Error(), "--libvirt") {
		t.Fatalf("pairing with an agent without libvirt: %v", err)
	}
	st, err := A.c.AdoptDomain(ctx, "web", []byte(live), B.a.PeerAddr())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("adopted: %+v", st)
	A.waitState(t, ctx, "web", agent.StateProtected)
	B.waitState(t, ctx, "web", agent.StateStandby)
	if s, err := A.c.AdoptDomain(ctx, "web", []byte(live), B.a.PeerAddr()); err != nil || s.State != agent.StateProtected {
		t.Fatalf("AdoptDomain again: %+v, %v; want the same protected VM", s, err)
	}
	if st, err := cb.State(ctx, "web"); err != nil || st.Code != libvirt.StatePaused {
		t.Fatalf("standby on B's libvirt: %v %v, want paused", st, err)
	}
	sb, err := B.c.Get(ctx, "web")
	if err != nil || sb.RunState != "inmigrate" {
		t.Fatalf("standby on B: %+v %v, want QEMU inmigrate", sb, err)
	}
	readSerial(t, ctx, serialOf(hostA), func(b []byte) bool { return counterlog.LastDiskSeq(b) >= 8 })
	sa, err := A.c.Get(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("protected: epoch %d, pause p50 %v, QEMU pid %d", sa.Epoch, sa.PauseP50, sa.PID)

	// Host A's VM dies like its host: SIGKILL.
	before, _ := os.ReadFile(serialOf(hostA))
	if err := syscall.Kill(sa.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	sb = B.waitState(t, ctx, "web", agent.StatePromoted)
	t.Logf("promoted on B: %s", sb.Reason)
	waitLibvirt(t, ctx, cb, "B's libvirt to show web running", func(s libvirt.State, err error) bool { return err == nil && s.Code == libvirt.StateRunning })
	waitLibvirt(t, ctx, ca, "A's libvirt to show web shut off", func(s libvirt.State, err error) bool { return err == nil && !s.Active() })
	after := readSerial(t, ctx, serialOf(hostB), func(b []byte) bool { return counterlog.Last(b) >= counterlog.Last(before)+5 })
	vals := counterlog.Values(after)
	if len(vals) == 0 || vals[0] > counterlog.Last(before)+1 {
		t.Fatalf("B resumed at counter %v, but A had only reached %d", vals[:min(5, len(vals))], counterlog.Last(before))
	}
	if _, err := counterlog.Check(vals); err != nil {
		t.Fatalf("B's counter: %v", err)
	}
	if strings.Contains(string(after), "Linux version") {
		t.Error("B's guest booted afresh instead of resuming")
	}
	if names, err := cb.Running(ctx); err != nil || !slices.Contains(names, "web") {
		t.Errorf("running on B: %v %v", names, err)
	}
	if b, err := B.a.Serial("web"); err != nil || counterlog.Last(b) < counterlog.Last(before)+5 {
		t.Errorf("B's agent reads the promoted domain's serial: %d bytes, %v", len(b), err)
	}
	persistent, err := cb.XML(ctx, "web", true)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(persistent, "'defer'") || strings.Contains(persistent, `"defer"`) || strings.Contains(persistent, "role=") {
		t.Errorf("B's persistent definition is still the standby's:\n%s", persistent)
	}

	// libvirt on A reports the domain stopped (the hook would): A lets go.
	if err := A.c.DomainStopped(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := A.c.Get(ctx, "web"); !errors.Is(err, agent.ErrNotFound) {
		t.Errorf("A still knows web after DomainStopped: %v", err)
	}
	if err := A.c.DomainStopped(ctx, "web"); err != nil {
		t.Errorf("DomainStopped of an unknown domain: %v", err)
	}
}

// protectedDomain is the setup most libvirt tests share: two private
// libvirtds, an agent for each, and the prepared test guest started under
// A's libvirt through PrepareDomain and AdoptDomain, protected on B.
type protectedDomain struct {
	ctx          context.Context
	hostA, hostB *libvirttest.Daemon
	ca, cb       *libvirt.Conn
	A, B         *host
}

func newProtectedDomain(t *testing.T, deadline time.Duration) *protectedDomain {
	t.Helper()
	testenv.Guest(t)
	p := &protectedDomain{
		hostA: libvirttest.Start(t, libvirttest.Options{}),
		hostB: libvirttest.Start(t, libvirttest.Options{}),
		ctx:   testenv.Deadline(t, deadline),
	}
	p.ca, p.cb = p.hostA.Conn(t), p.hostB.Conn(t)
	wca, err := wire.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	p.A = newLibvirtHost(t, wca, "host-a", p.hostA.Socket)
	p.B = newLibvirtHost(t, wca, "host-b", p.hostB.Socket)
	dir, err := os.MkdirTemp("", "ftlvd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	disk := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	prepared := preparedGuest(t, filepath.Join(dir, "a"), disk)
	ctx := p.ctx
	if err := p.ca.Define(ctx, prepared); err != nil {
		t.Fatal(err)
	}
	if err := p.A.c.PrepareDomain(ctx, "web", []byte(prepared)); err != nil {
		t.Fatal(err)
	}
	if err := p.ca.Start(ctx, "web", false); err != nil {
		t.Fatalf("start on A: %v\n%s", err, p.hostA.QEMULog("web"))
	}
	live, err := p.ca.XML(ctx, "web", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.A.c.AdoptDomain(ctx, "web", []byte(live), p.B.a.PeerAddr()); err != nil {
		t.Fatal(err)
	}
	p.A.waitState(t, ctx, "web", agent.StateProtected)
	p.B.waitState(t, ctx, "web", agent.StateStandby)
	return p
}

// TestLibvirtDomainShutdown: a protected libvirt domain shut down through
// libvirt (virsh destroy: QEMU announces SHUTDOWN) is not failed over: B
// drops its standby domain, and A forgets the VM once libvirt says so.
func TestLibvirtDomainShutdown(t *testing.T) {
	p := newProtectedDomain(t, 120*time.Second)
	ctx, A, B, ca, cb := p.ctx, p.A, p.B, p.ca, p.cb
	if err := ca.Destroy(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	// B drops the replica and its standby domain.
	for {
		_, err := B.c.Get(ctx, "web")
		_, lerr := cb.State(ctx, "web")
		if errors.Is(err, agent.ErrNotFound) && errors.Is(lerr, libvirt.ErrNoDomain) {
			break
		}
		if s, err := B.c.Get(ctx, "web"); err == nil && s.State == agent.StatePromoted {
			t.Fatalf("B promoted after a clean shutdown on A: %s", s.Reason)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("B keeps the replica after A's domain was destroyed: %v / libvirt %v", err, lerr)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := A.c.DomainStopped(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := A.c.Get(ctx, "web"); !errors.Is(err, agent.ErrNotFound) {
		t.Errorf("A still knows web after DomainStopped: %v", err)
	}
}

// TestLibvirtDomainSwitchover: a planned failover of a protected libvirt
// domain: B's standby domain takes over with no gap in the counter, A's
// agent stops A's domain through A's libvirt, and stopping the VM on B
// stops B's libvirt domain.
func TestLibvirtDomainSwitchover(t *testing.T) {
	p := newProtectedDomain(t, 120*time.Second)
	ctx, A, B, ca, cb, hostA := p.ctx, p.A, p.B, p.ca, p.cb, p.hostA
	readSerial(t, ctx, serialOf(hostA), func(b []byte) bool { return counterlog.Last(b) >= 10 })

	res, err := A.c.Failover(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	atHandover, _ := os.ReadFile(serialOf(hostA))
	sb := B.waitState(t, ctx, "web", agent.StatePromoted)
	t.Logf("handed over at epoch %d; B: %s", res.Epoch, sb.Reason)
	waitLibvirt(t, ctx, ca, "A's libvirt to show web shut off", func(s libvirt.State, err error) bool { return err == nil && !s.Active() })
	if st, err := cb.State(ctx, "web"); err != nil || st.Code != libvirt.StateRunning {
		t.Fatalf("B's libvirt after the switchover: %v %v", st, err)
	}
	after := readSerial(t, ctx, serialOf(p.hostB), func(b []byte) bool { return counterlog.Last(b) >= counterlog.Last(atHandover)+5 })
	if _, err := counterlog.Check(counterlog.Values(counterlog.Stitch(atHandover, after))); err != nil {
		t.Fatalf("counter across the switchover: %v", err)
	}
	if err := A.c.DomainStopped(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := A.c.Get(ctx, "web"); !errors.Is(err, agent.ErrNotFound) {
		t.Errorf("A still knows web after DomainStopped: %v", err)
	}

	// The VM is B's now: stopping it stops B's libvirt domain, which
	// stays defined (promoted) for its next start.
	if err := B.c.Stop(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	waitLibvirt(t, ctx, cb, "B's libvirt to show web shut off", func(s libvirt.State, err error) bool { return err == nil && !s.Active() })
	if x, err := cb.XML(ctx, "web", true); err != nil || strings.Contains(x, "role=") {
		t.Errorf("B's definition after stop: %v\n%s", err, x)
	}
}
