package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/checker"
	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/vm"
)

// ServicePort is the guest's TCP service port (cmd/ftguest, workload tcp).
const ServicePort = 7000

// GuestOptions describe the built-in guest a cluster runs.
type GuestOptions struct {
	// Name of the VM; default "web".
	Name string
	// Image is the built-in guest (guestimage.Default).
	Image guestimage.Image
	// MemoryMiB default 128; DiskMiB default 16.
	MemoryMiB, DiskMiB int
	// Workloads for ftguest.run; default counter, disk and tcp.
	Workloads []string
	// Cmdline holds more ftguest.KEY=VALUE words.
	Cmdline string
	// Accel is auto (default), kvm or tcg.
	Accel string
	// Index is the VM's number on the bed (its address and MAC).
	Index int
}

// VM is a guest of the cluster and where it runs now.
type VM struct {
	Name string
	Addr netip.Addr // on the LAN
	Spec vm.Spec
	// On is the agent running it; Replica says it runs from On's replica
	// directory (it was promoted there).
	On      *Agent
	Replica bool

	c    *Cluster
	disk string // the image it was started on
}

// StartVM writes a fresh disk for the guest and starts it on agent on,
// then waits until its workloads run (the TCP service listens, or the
// counter counts).
func (c *Cluster) StartVM(ctx context.Context, on *Agent, o GuestOptions) (*VM, error) {
	if o.Image.Kernel == "" || o.Image.Initrd == "" {
		return nil, fmt.Errorf("%w: guest image has no kernel or initrd", ErrConfig)
	}
	if o.Name == "" {
		o.Name = "web"
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 128
	}
	if o.DiskMiB == 0 {
		o.DiskMiB = 16
	}
	if len(o.Workloads) == 0 {
		o.Workloads = []string{"counter", "disk", "tcp"}
	}
	if o.MemoryMiB < 64 || o.DiskMiB < 1 {
		return nil, fmt.Errorf("%w: guest memory %d MiB (need 64+), disk %d MiB (need 1+)", ErrConfig, o.MemoryMiB, o.DiskMiB)
	}
	addr, err := c.Bed.VMAddr(o.Index)
	if err != nil {
		return nil, err
	}
	mac, err := c.Bed.VMMAC(o.Index)
	if err != nil {
		return nil, err
	}
	// A new file per start: a VM started again after it was lost begins
	// with an empty disk, as a reinstalled machine would.
	f, err := os.CreateTemp(c.Root, o.Name+"-disk-*.raw")
	if err != nil {
		return nil, err
	}
	disk := f.Name()
	err = f.Truncate(int64(o.DiskMiB) << 20)
	f.Close()
	if err != nil {
		return nil, err
	}
	spec := vm.Spec{Name: o.Name, MemoryMiB: o.MemoryMiB, Kernel: o.Image.Kernel, Initrd: o.Image.Initrd, Accel: o.Accel,
		Cmdline: strings.TrimSpace(o.Image.Cmdline + " ftguest.run=" + strings.Join(o.Workloads, ",") +
			" ftguest.ip=" + addr.String() + " " + o.Cmdline),
		Disks: []vm.Disk{{Path: disk}},
		NICs:  []vm.NIC{{MAC: mac.String()}}}
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	_, err = on.Client().Start(sctx, agent.StartRequest{Spec: spec,
		Probe: agent.ProbeSpec{Addrs: []string{addr.Addr().String()}, TCPPorts: []int{ServicePort}}})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("start %s on %s: %w", o.Name, on.Name, err)
	}
	v := &VM{Name: o.Name, Addr: addr.Addr(), Spec: spec, On: on, c: c, disk: disk}
	ready, what := func(b []byte) bool { return counterlog.Last(b) > 0 }, "counter lines"
	if slices.Contains(o.Workloads, "tcp") {
		ready, what = func(b []byte) bool { return bytes.Contains(b, []byte("ftguest tcp listening")) }, "TCP service"
	}
	if _, err := v.WaitSerial(ctx, 2*time.Minute, what, ready); err != nil {
		return v, err
	}
	return v, nil
}

// ServiceAddr is host:port of the guest's TCP service.
func (v *VM) ServiceAddr() string {
	return netip.AddrPortFrom(v.Addr, ServicePort).String()
}

// Dial opens connections from the bed's client namespace.
func (v *VM) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return v.c.Bed.Client.Dial(ctx, network, addr)
}

// NewChecker makes a pkg/checker client of the guest's service that
// connects from the client namespace; cfg.Addr and cfg.Dial are filled in.
func (v *VM) NewChecker(cfg checker.Config) (*checker.Checker, error) {
	cfg.Addr, cfg.Dial = v.ServiceAddr(), v.Dial
	return checker.New(cfg)
}

// SerialPath is the console log of the copy that runs now.
func (v *VM) SerialPath() string { return v.On.SerialPath(v.Name, v.Replica) }

// Serial reads the console of the copy that runs now.
func (v *VM) Serial() []byte { return v.On.Serial(v.Name, v.Replica) }

// WaitSerial polls the console of the copy that runs now.
func (v *VM) WaitSerial(ctx context.Context, wait time.Duration, what string, ok func([]byte) bool) ([]byte, error) {
	return v.On.WaitSerial(ctx, v.Name, v.Replica, wait, what, ok)
}

// Status is the running host's view of the VM.
func (v *VM) Status(ctx context.Context) (agent.VMStatus, error) { return v.On.Status(ctx, v.Name) }

// Disk is the image the copy that runs now writes to.
func (v *VM) Disk() string {
	if v.Replica {
		return v.On.ReplicaDisk(v.Name)
	}
	return v.disk
}

// StartPair asks the running host to protect the VM on to; it returns
// when the initial sync has begun.
func (v *VM) StartPair(ctx context.Context, to *Agent) error {
	pctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := v.On.Client().Pair(pctx, v.Name, to.Listen); err != nil {
		return fmt.Errorf("pair %s from %s with %s: %w", v.Name, v.On.Name, to.Name, err)
	}
	return nil
}

// Pair protects the VM on to and waits until the running host says
// protected and to holds a standby.
func (v *VM) Pair(ctx context.Context, to *Agent, wait time.Duration) error {
	if err := v.StartPair(ctx, to); err != nil {
		return err
	}
	return v.WaitProtected(ctx, to, wait)
}

// WaitProtected waits for a pairing with to that has begun to finish.
func (v *VM) WaitProtected(ctx context.Context, to *Agent, wait time.Duration) error {
	if _, err := v.On.WaitState(ctx, v.Name, agent.StateProtected, wait, agent.StateDegraded, agent.StateStopped); err != nil {
		return err
	}
	_, err := to.WaitState(ctx, v.Name, agent.StateStandby, 30*time.Second)
	return err
}

// Kill says what KillPrimary kills.
type Kill int

// What a simulated failure kills.
const (
	KillBoth  Kill = iota // the agent, the VM's shim and QEMU: the host died
	KillQEMU              // only QEMU: the VM's process crashed
	KillAgent             // the agent and the VM's shim: QEMU loses its disk and NIC
)

func (k Kill) String() string {
	switch k {
	case KillBoth:
		return "agent+qemu"
	case KillQEMU:
		return "qemu"
	case KillAgent:
		return "agent"
	}
	return "kill(" + strconv.Itoa(int(k)) + ")"
}

// Killed records the primary's last moments.
type Killed struct {
	At     time.Time
	Host   *Agent
	Status agent.VMStatus // just before the kill
	Serial []byte         // its console, read after the kill
	What   Kill
}

// KillPrimary makes the VM's host fail: it isolates the host from every
// network when isolate is set (as a dead host vanishes; without it, the
// killed processes' peers see their connections close), then SIGKILLs
// what k says. st is a status of the VM taken shortly before (its PID is
// the QEMU to kill); the zero status reads one now.
func (v *VM) KillPrimary(ctx context.Context, k Kill, isolate bool, st agent.VMStatus) (Killed, error) {
	p := v.On
	if st.PID == 0 {
		var err error
		if st, err = v.Status(ctx); err != nil {
			return Killed{}, err
		}
	}
	kd := Killed{At: time.Now(), Host: p, Status: st, What: k}
	if isolate {
		if err := v.c.Bed.IsolateHost(p.Host); err != nil {
			return kd, err
		}
	}
	if k != KillQEMU {
		p.Kill()
		// The shim owns the VM's devices and replication; the agent
		// alone can die without harm (its restart reattaches).
		if st.ShimPID > 0 {
			if err := syscall.Kill(st.ShimPID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				return kd, fmt.Errorf("kill shim %d on %s: %w", st.ShimPID, p.Name, err)
			}
			waitGone(st.ShimPID, 5*time.Second)
		}
	}
	if k != KillAgent && st.PID > 0 {
		if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return kd, fmt.Errorf("kill QEMU %d on %s: %w", st.PID, p.Name, err)
		}
		waitGone(st.PID, 5*time.Second)
	}
	kd.Serial = v.Serial()
	return kd, nil
}

// waitGone waits (bounded) until process pid is gone or a zombie.
func waitGone(pid int, wait time.Duration) {
	end := time.Now().Add(wait)
	for time.Now().Before(end) {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
		if err != nil {
			return
		}
		if i := bytes.LastIndexByte(b, ')'); i > 0 && len(b) > i+2 && b[i+2] == 'Z' {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Promotion is what a promoted VM's reason reports.
type Promotion struct {
	Status   agent.VMStatus
	Epoch    uint64        // the epoch it resumed
	Duration time.Duration // decision to running
}

var resumedRE = regexp.MustCompile(`resumed epoch (\d+) in ([0-9.]+[a-zµ]+)`)

// ParsePromotion reads the epoch and time a promoted VM's reason reports.
func ParsePromotion(s agent.VMStatus) (Promotion, error) {
	m := resumedRE.FindStringSubmatch(s.Reason)
	if m == nil {
		return Promotion{Status: s}, fmt.Errorf("%w: promoted VM's reason %q does not say what it resumed", ErrCheck, s.Reason)
	}
	e, _ := strconv.ParseUint(m[1], 10, 64)
	d, err := time.ParseDuration(m[2])
	if err != nil {
		return Promotion{Status: s}, fmt.Errorf("%w: promotion time %q: %v", ErrCheck, m[2], err)
	}
	return Promotion{Status: s, Epoch: e, Duration: d}, nil
}

// AwaitPromotion waits for to to promote the VM and then records that
// it runs there, from its replica directory.
func (v *VM) AwaitPromotion(ctx context.Context, to *Agent, wait time.Duration) (Promotion, error) {
	st, err := to.WaitState(ctx, v.Name, agent.StatePromoted, wait, agent.StateStopped)
	if err != nil {
		return Promotion{Status: st}, err
	}
	v.On, v.Replica = to, true
	return ParsePromotion(st)
}

// CheckResumedCounter checks the counter of a promoted copy against what
// the dead primary had printed: each counts by one, and the copy starts at
// a value the primary reached and followed (no gap, nothing invented). It
// returns how many values the copy printed again: those the primary
// printed after its last committed checkpoint, which the output-commit
// buffer never let out of the primary's host as network traffic.
func CheckResumedCounter(before, after []byte) (repeated uint64, err error) {
	pv, av := counterlog.Values(before), counterlog.Values(after)
	if len(pv) == 0 || len(av) == 0 {
		return 0, fmt.Errorf("%w: counter lines: primary %d, promoted copy %d", ErrCheck, len(pv), len(av))
	}
	if _, err := counterlog.Check(pv); err != nil {
		return 0, fmt.Errorf("%w: primary's counter: %w", ErrCheck, err)
	}
	if _, err := counterlog.Check(av); err != nil {
		return 0, fmt.Errorf("%w: promoted copy's counter: %w", ErrCheck, err)
	}
	first, last := av[0], pv[len(pv)-1]
	if first > last+1 {
		return 0, fmt.Errorf("%w: the promoted copy resumed at counter %d, but the primary had only reached %d: a gap", ErrCheck, first, last)
	}
	if first != pv[0] && !slices.Contains(pv, first-1) {
		return 0, fmt.Errorf("%w: the promoted copy resumed at %d, a value the primary never followed (it printed %d..%d)", ErrCheck, first, pv[0], last)
	}
	return last + 1 - first, nil
}

// DiskReport is what VerifyDisk found.
type DiskReport struct {
	diskrec.Report
	// Reported is the newest record the guest said it had written and
	// synced before the disk was read.
	Reported uint64
}

// VerifyDisk checks the disk of the copy that runs now, while it runs:
// the records form one unbroken chain that holds every record the guest
// reported written. After a failover this proves the disk matched the
// resumed memory: a disk that lost a committed write, or kept one the
// memory did not know of, breaks the chain at the resumed guest's next
// record. The guest may be writing its newest record while it is read, so
// a failure is retried a few times; a real break persists.
func (v *VM) VerifyDisk(ctx context.Context) (DiskReport, error) {
	serial := v.Serial()
	if bytes.Contains(serial, []byte("ftguest disk error")) {
		return DiskReport{}, fmt.Errorf("%w: the guest on %s reported disk errors: %q", ErrCheck, v.On.Name, tail(serial, 600))
	}
	want := counterlog.LastDiskSeq(serial)
	var last error
	for try := 0; try < 5; try++ {
		if try > 0 {
			select {
			case <-ctx.Done():
				return DiskReport{}, ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
		rep, err := verifyFile(v.Disk())
		r := DiskReport{Report: rep, Reported: want}
		switch {
		case err != nil:
			last = fmt.Errorf("%w: disk of %s on %s (%s): %w", ErrCheck, v.Name, v.On.Name, v.Disk(), err)
		case rep.LastSeq < want:
			last = fmt.Errorf("%w: disk of %s on %s ends at record %d, but the guest had written %d", ErrCheck, v.Name, v.On.Name, rep.LastSeq, want)
		default:
			return r, nil
		}
	}
	return DiskReport{Reported: want}, last
}

func verifyFile(path string) (diskrec.Report, error) {
	f, err := os.Open(path)
	if err != nil {
		return diskrec.Report{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return diskrec.Report{}, err
	}
	return diskrec.Verify(f, fi.Size())
}

// Forget drops a VM that was lost with its host (no committed checkpoint
// to resume) from the surviving agent sur, which holds a useless replica
// of it, so it can be started again.
func (v *VM) Forget(ctx context.Context, sur *Agent) error {
	uctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := sur.Client().Unpair(uctx, v.Name); err != nil && !errors.Is(err, agent.ErrNotFound) {
		return fmt.Errorf("remove the replica of lost %s on %s: %w", v.Name, sur.Name, err)
	}
	return nil
}
