package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
)

// TestLibvirtHook: the libvirt way. Host A's libvirtd runs ftctl's hook
// (installed with `ftctl libvirt install-hook`), both agents run with
// --libvirt. A plain domain prepared with `ftctl libvirt prepare --peer B`
// is started through libvirt: the hook has A's agent open its sockets,
// adopt its QEMU and pair it with B, whose standby is a libvirt domain,
// paused. A's QEMU is SIGKILLed: B promotes, B's libvirt shows the domain
// running, the guest's counter goes on from the last committed
// checkpoint, A's libvirt shows it shut off, and the hook's stop report
// makes A's agent forget it.
func TestLibvirtHook(t *testing.T) {
	lb := newLibvirtBed(t, libvirtOptions{})
	c, ca, cb, vc, sa := lb.c, lb.ca, lb.cb, lb.vc, lb.sa
	ctx := c.ctx
	hookLog, serialA, serialB := lb.hookLog, lb.serialA, lb.serialB

	// A's agent dies (kill -9). The domain lives in its shim (agents run
	// shims by default), which serves its disk and NIC and replicates
	// it: the guest's disk writer and service go on, B keeps committing,
	// and the restarted agent finds the shim.
	if v, set := os.LookupEnv("FTCTL_SHIMS"); set && !parsesTrue(v) {
		t.Log("FTCTL_SHIMS=false: no agent restart step (without shims it cuts the domain's devices)")
	} else {
		if sa.ShimPID == 0 {
			t.Fatalf("A's domain is not served by a shim: %+v", sa)
		}
		sb0, err := c.b.status(vmName)
		if err != nil {
			t.Fatal(err)
		}
		serialBefore, _ := os.ReadFile(serialA)
		c.a.kill()
		for range 3 {
			if _, err := vc.short(ctx, 10*time.Second); err != nil {
				t.Fatalf("the VM's service with A's agent dead: %v", err)
			}
		}
		waitFile(t, ctx, serialA, func(b []byte) bool { return counterlog.LastDiskSeq(b) >= counterlog.LastDiskSeq(serialBefore)+3 })
		for {
			s, err := c.b.status(vmName)
			if err == nil && s.State == agent.StateStandby && s.Epoch > sb0.Epoch+3 {
				t.Logf("A's agent dead: B committed epochs %d..%d", sb0.Epoch, s.Epoch)
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("B stopped committing with A's agent dead: %+v, %v (was epoch %d)", s, err, sb0.Epoch)
			case <-time.After(100 * time.Millisecond):
			}
		}
		c.a.start()
		sa2 := c.a.waitState(vmName, agent.StateProtected, 30*time.Second, agent.StateStopped, agent.StateDegraded)
		if sa2.PID != sa.PID || sa2.ShimPID != sa.ShimPID || !sa2.Since.Equal(sa.Since) {
			t.Fatalf("after A's agent restart: %+v; before: %+v", sa2, sa)
		}
	}

	// Host A's QEMU dies like its host.
	before, _ := os.ReadFile(serialA)
	if err := syscall.Kill(sa.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	sb := c.b.waitState(vmName, agent.StatePromoted, 30*time.Second)
	t.Logf("promoted on B: %s", sb.Reason)
	if m := regexp.MustCompile(`resumed epoch \d+ in (\S+); libvirt shows it running (\S+) after`).FindStringSubmatch(sb.Reason); m != nil {
		t.Logf("promotion: lockstep resume %s, decision → running under libvirt %s", m[1], m[2])
	} else {
		t.Errorf("B's reason does not say when libvirt showed the domain running: %q", sb.Reason)
	}
	if st, err := cb.State(ctx, vmName); err != nil || st.Code != libvirt.StateRunning {
		t.Errorf("B's libvirt: %v %v, want running", st, err)
	}
	if names, err := cb.Running(ctx); err != nil || !slices.Contains(names, vmName) {
		t.Errorf("running on B: %v %v", names, err)
	}
	for {
		st, err := ca.State(ctx, vmName)
		if err == nil && !st.Active() {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("A's libvirt still shows %s: %v %v", vmName, st, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	after := waitFile(t, ctx, serialB, func(b []byte) bool { return counterlog.Last(b) >= counterlog.Last(before)+5 })
	vals := counterlog.Values(after)
	if len(vals) == 0 || vals[0] > counterlog.Last(before)+1 {
		t.Fatalf("B resumed at counter %v, but A had only reached %d", vals[:min(5, len(vals))], counterlog.Last(before))
	}
	if _, err := counterlog.Check(vals); err != nil {
		t.Fatalf("B's counter: %v", err)
	}
	// The same client reaches the VM on B (announce-self moved its MAC).
	if _, d, err := vc.shortUntil(ctx, 60*time.Second); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("the VM's service answers on B %v after the promotion", d.Round(time.Millisecond))
	}
	vc.checkLedger(t)
	// The hook's stop report (a detached worker) makes A's agent forget
	// the VM.
	for {
		_, err := c.a.status(vmName)
		if err != nil && strings.Contains(err.Error(), "no such VM") {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("A's agent still knows %s after libvirt stopped it: %v\nhook log:\n%s", vmName, err, readTail(hookLog, 4000))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// libvirtBed is the libvirt world of a scenario: the cluster, whose
// agents run with --libvirt, a private libvirtd per host (A's runs ftctl's
// hook), and the domain vmName defined on A, prepared with `ftctl libvirt
// prepare --peer B`, started through libvirt and protected by the hook,
// its TCP service answering a LAN client.
type libvirtBed struct {
	c              *cluster
	hostA, hostB   *libvirttest.Daemon
	ca, cb         *libvirt.Conn
	hookLog        string
	serialA        string // the guest's serial log on A's libvirt
	serialB        string // the same on B's (its standby, later the promoted guest)
	addr           netip.Prefix
	vc             *vmClient
	sa             agent.VMStatus // A's status once protected
	prepareSummary string         // the last line prepare printed
}

// libvirtOptions vary a libvirtBed.
type libvirtOptions struct {
	// setup runs on the cluster before the agents start (after the
	// libvirt flags are added).
	setup func(*cluster)
	// probe records the VM's LAN address and service port as the
	// domain's failure probe (prepare --probe-addr --probe-tcp).
	probe bool
}

// vmServicePort is the guest's TCP service (what newVMClient dials).
const vmServicePort = 7000

// newLibvirtBed builds a libvirtBed: it returns once the hook has the
// domain protected on B (B's standby paused in its libvirt) and the
// client was served through A a few times.
func newLibvirtBed(t *testing.T, o libvirtOptions) *libvirtBed {
	t.Helper()
	if why := libvirttest.Requirements(); why != "" {
		t.Skip(why)
	}
	img := testenv.Guest(t)
	lb := &libvirtBed{}
	c := newClusterWith(t, 3*time.Minute, func(c *cluster) {
		lb.hookLog = filepath.Join(c.root, "hook.log")
		lb.hostA = libvirttest.Start(t, libvirttest.Options{BeforeStart: func(dir string) error {
			r := c.cli("libvirt", "install-hook", "--dir", filepath.Join(dir, "etc", "hooks"),
				"--socket", c.a.sock, "--log", lb.hookLog, "--timeout", "90s")
			if r.code != 0 {
				return errors.New(r.String())
			}
			return nil
		}})
		lb.hostB = libvirttest.Start(t, libvirttest.Options{})
		c.a.extra = append(c.a.extra, "--libvirt", lb.hostA.Socket)
		c.b.extra = append(c.b.extra, "--libvirt", lb.hostB.Socket)
		if o.setup != nil {
			o.setup(c)
		}
	})
	lb.c = c
	hostA, hostB, hookLog := lb.hostA, lb.hostB, lb.hookLog
	lb.ca, lb.cb = hostA.Conn(t), hostB.Conn(t)
	ca, cb := lb.ca, lb.cb
	ctx := c.ctx

	// A plain domain with a raw disk, defined on A's libvirt.
	disk := filepath.Join(c.root, "disk.raw")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	addr, err := c.bed.VMAddr(0)
	if err != nil {
		t.Fatal(err)
	}
	lb.addr = addr
	mac, err := c.bed.VMMAC(0)
	if err != nil {
		t.Fatal(err)
	}
	const serialInDaemon = "/var/log/libvirt/qemu/web-serial.log" // each daemon's own
	dom := libvirttest.GuestDomain{
		Name: vmName, Kernel: img.Kernel, Initrd: img.Initrd, Serial: serialInDaemon,
		Cmdline: img.Cmdline + " ftguest.run=counter,disk,tcp ftguest.interval=50ms ftguest.diskinterval=50ms ftguest.ip=" + addr.String(),
		Devices: fmt.Sprintf("    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='%s'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n", disk) +
			fmt.Sprintf("    <interface type='ethernet'>\n      <mac address='%s'/>\n      <model type='virtio'/>\n    </interface>\n", mac),
	}
	if err := ca.Define(ctx, dom.XML()); err != nil {
		t.Fatal(err)
	}
	args := []string{"libvirt", "prepare", "--connect", hostA.URI, "--socket-dir", filepath.Join(c.root, "sa"),
		"--peer", c.b.listen, "--backup-dir", filepath.Join(c.root, "backup")}
	if o.probe {
		args = append(args, "--probe-addr", addr.Addr().String(), "--probe-tcp", strconv.Itoa(vmServicePort))
	}
	r := c.mustCLI(append(args, vmName)...)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	lb.prepareSummary = lines[len(lines)-1]
	t.Logf("prepare: %s", lb.prepareSummary)

	// Starting it through libvirt is all it takes.
	start := time.Now()
	if err := ca.Start(ctx, vmName, false); err != nil {
		t.Fatalf("start on A: %v\n%s\nhook log:\n%s", err, hostA.QEMULog(vmName), readTail(hookLog, 4000))
	}
	sa := c.a.waitState(vmName, agent.StateProtected, 90*time.Second, agent.StateDegraded, agent.StateStopped)
	t.Logf("protected %v after virsh start: %s", time.Since(start).Round(time.Millisecond), sa.Reason)
	c.b.waitState(vmName, agent.StateStandby, 10*time.Second)
	if st, err := cb.State(ctx, vmName); err != nil || st.Code != libvirt.StatePaused {
		t.Fatalf("standby on B's libvirt: %v %v, want paused", st, err)
	}
	if hl := readTail(hookLog, 20000); !strings.Contains(hl, "adopt") || !strings.Contains(hl, "prepare") {
		t.Errorf("the hook log shows no prepare and adopt:\n%s", hl)
	}
	lb.serialA = filepath.Join(hostA.Dir, "log", "qemu", "web-serial.log")
	lb.serialB = filepath.Join(hostB.Dir, "log", "qemu", "web-serial.log")
	waitFile(t, ctx, lb.serialA, func(b []byte) bool {
		return counterlog.LastDiskSeq(b) >= 5 && strings.Contains(string(b), "ftguest tcp listening")
	})
	// A client on the LAN talks to the VM's TCP service through A's
	// output buffer.
	lb.vc = newVMClient(t, c)
	if _, d, err := lb.vc.shortUntil(ctx, 30*time.Second); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("the VM's service answers through A (%v)", d.Round(time.Millisecond))
	}
	for range 3 {
		if _, err := lb.vc.short(ctx, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if sa, err = c.a.status(vmName); err != nil || sa.State != agent.StateProtected || sa.PID == 0 {
		t.Fatalf("A protected: %+v %v", sa, err)
	}
	lb.sa = sa
	return lb
}

// parsesTrue is the agent's reading of FTCTL_SHIMS=v.
func parsesTrue(v string) bool {
	on, err := strconv.ParseBool(v)
	return err == nil && on
}

func waitFile(t *testing.T, ctx context.Context, path string, ok func([]byte) bool) []byte {
	t.Helper()
	for {
		b, _ := os.ReadFile(path)
		if ok(b) {
			return b
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: %v; last %q", path, ctx.Err(), tail(b, 300))
		case <-time.After(50 * time.Millisecond):
		}
	}
}
