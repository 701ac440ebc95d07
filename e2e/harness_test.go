package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/counterlog"
	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/agent"
	"github.com/ftctl/ftctl/pkg/testbed"
	"github.com/ftctl/ftctl/pkg/vm"
)

// vmName is the protected VM of every scenario.
const vmName = "web"

// peerPort is where each agent accepts replication links.
const peerPort = "7480"

// mgmtPort is where each agent answers management heartbeats.
const mgmtPort = "7481"

var quiet = slog.New(slog.DiscardHandler)

var (
	binOnce sync.Once
	binPath string
	binErr  error
	binDir  string
)

// TestMain removes the ftctl binary built for the run.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// ftctlBinary builds cmd/ftctl once per test run: the scenarios run the
// real binary, so the CLI and the agent's flags are tested too.
func ftctlBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "ftctl-e2e-bin-")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "ftctl")
		cmd := exec.Command("go", "build", "-o", binPath, "github.com/ftctl/ftctl/cmd/ftctl")
		out, err := cmd.CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build ./cmd/ftctl: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// cluster is one scenario's world: the bed, credentials, the two agents,
// the guest image.
type cluster struct {
	t    *testing.T
	ctx  context.Context
	bin  string
	root string // every file of the scenario; QEMU processes are found by it
	bed  *testbed.Bed
	a, b *agentProc
	// more agents a scenario started besides a and b
	more []*agentProc
	cert string // directory of ca.pem and the hosts' key pairs
	// mgmtKey is the key file of the agents' management heartbeats.
	mgmtKey string
}

// agentProc is one `ftctl agent` process inside a host's namespace.
type agentProc struct {
	c      *cluster
	name   string
	host   *testbed.Host
	dir    string
	sock   string
	log    string // stderr of every run, appended
	listen string // host:port of the peer listener
	pki    string // directory of ca.pem, NAME.pem and NAME-key.pem
	// mgmt is the management heartbeat address (host:port on the bed's
	// management network); empty runs the agent without the second path.
	mgmt   string
	extra  []string
	cmd    *exec.Cmd
	exited chan struct{}
}

func requireEnv(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireQEMU(t)
	for _, p := range []string{"nsenter", "go"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s: %v", p, err)
		}
	}
}

// newCluster builds the bed, issues credentials with the CLI and starts
// both agents. Everything is removed when the test ends, failed or not.
func newCluster(t *testing.T, timeout time.Duration) *cluster {
	t.Helper()
	return newClusterWith(t, timeout, nil)
}

// newClusterWith is newCluster with setup run on the agents (and the bed)
// before they start: flags, a third host.
func newClusterWith(t *testing.T, timeout time.Duration, setup func(c *cluster)) *cluster {
	t.Helper()
	return newClusterHosts(t, timeout, 2, setup)
}

// newClusterHosts is newClusterWith on a bed of hosts KVM hosts (the
// agents run on the first two; a third can run a witness).
func newClusterHosts(t *testing.T, timeout time.Duration, hosts int, setup func(c *cluster)) *cluster {
	t.Helper()
	requireEnv(t)
	ctx := testenv.Deadline(t, timeout)
	c := &cluster{t: t, ctx: ctx, bin: ftctlBinary(t)}
	var err error
	// A short root keeps unix socket paths under the kernel's limit.
	if c.root, err = os.MkdirTemp("", "fte-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(c.root) })
	c.bed, err = testbed.New(ctx, testbed.Options{Prefix: "fte", Hosts: hosts, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.bed.Close(); err != nil {
			t.Errorf("close testbed: %v", err)
		}
	})
	// Runs before the bed is removed (cleanups are last in, first out):
	// agents first, then any QEMU they left (they outlive their agent on
	// purpose), found by the scenario's root in their command line.
	t.Cleanup(c.shutdown)

	c.cert = filepath.Join(c.root, "pki")
	c.mustCLI("cert", "init", "--dir", c.cert)
	c.mustCLI("cert", "issue", "--dir", c.cert, "host-a", "--host", c.bed.A.ReplAddr.String())
	c.mustCLI("cert", "issue", "--dir", c.cert, "host-b", "--host", c.bed.B.ReplAddr.String())
	c.mgmtKey = filepath.Join(c.root, "mgmt.key")
	c.mustCLI("cert", "psk", c.mgmtKey)
	c.a = c.newAgent("host-a", c.bed.A)
	c.b = c.newAgent("host-b", c.bed.B)
	if setup != nil {
		setup(c)
	}
	c.a.start()
	c.b.start()
	return c
}

func (c *cluster) newAgent(name string, h *testbed.Host) *agentProc {
	return c.newAgentIn(name, name, h)
}

// newAgentIn prepares an agent whose files live in root/dir.
func (c *cluster) newAgentIn(dir, name string, h *testbed.Host) *agentProc {
	dir = filepath.Join(c.root, dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		c.t.Fatal(err)
	}
	return &agentProc{c: c, name: name, host: h, dir: dir, sock: filepath.Join(dir, "agent.sock"),
		log: filepath.Join(dir, "agent.log"), listen: h.ReplAddr.String() + ":" + peerPort, pki: c.cert,
		mgmt: h.MgmtAddr.String() + ":" + mgmtPort}
}

// start runs the agent (again) with its directories and waits until its
// control socket answers.
func (p *agentProc) start() {
	c := p.c
	c.t.Helper()
	args := []string{"agent", "--name", p.name, "--listen", p.listen,
		"--ca", filepath.Join(p.pki, "ca.pem"),
		"--cert", filepath.Join(p.pki, p.name+".pem"), "--key", filepath.Join(p.pki, p.name+"-key.pem"),
		"--bridge", testbed.BridgeName,
		"--state-dir", filepath.Join(p.dir, "state"), "--run-dir", filepath.Join(p.dir, "run"),
		"--ram-dir", filepath.Join(p.dir, "ram"), "--socket", p.sock,
		"--arbiter", "probe", "--peer-timeout", "1s"}
	if p.mgmt != "" {
		args = append(args, "--mgmt-listen", p.mgmt, "--mgmt-key-file", c.mgmtKey)
	}
	args = append(args, p.extra...)
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		c.t.Fatal(err)
	}
	fmt.Fprintf(logf, "==== %s: ftctl %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(args, " "))
	cmd := p.host.Command(context.Background(), c.bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group, so a terminal's signals reach only the test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		c.t.Fatalf("start agent %s: %v", p.name, err)
	}
	logf.Close()
	p.cmd, p.exited = cmd, make(chan struct{})
	go func(ch chan struct{}) { cmd.Wait(); close(ch) }(p.exited)
	cl := agent.NewClient(p.sock)
	for {
		ctx, cancel := context.WithTimeout(c.ctx, time.Second)
		_, err := cl.List(ctx)
		cancel()
		if err == nil {
			return
		}
		select {
		case <-p.exited:
			c.t.Fatalf("agent %s exited at start: %v\n%s", p.name, cmd.ProcessState, readTail(p.log, 4000))
		case <-c.ctx.Done():
			c.t.Fatalf("agent %s never answered on %s: %v", p.name, p.sock, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// kill SIGKILLs the agent process, like its host dying.
func (p *agentProc) kill() {
	if p.cmd == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// killShim SIGKILLs the shim that runs the VM whose status is st (the
// agent's death alone leaves it running, by design).
func (p *agentProc) killShim(st agent.VMStatus) {
	if st.ShimPID <= 0 {
		return
	}
	syscall.Kill(st.ShimPID, syscall.SIGKILL)
	for i := 0; i < 250 && processLives(st.ShimPID); i++ {
		time.Sleep(20 * time.Millisecond)
	}
}

// processLives says whether pid exists and is not a zombie.
func processLives(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// shimLog is the log of the shim of VM name on p.
func (p *agentProc) shimLog(name string) string {
	return agent.ShimLog(filepath.Join(p.dir, "run"), name)
}

// terminate stops the agent with SIGTERM (what systemd does), SIGKILL after
// a grace period.
func (p *agentProc) terminate() {
	if p.cmd == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

func (c *cluster) shutdown() {
	for _, p := range append([]*agentProc{c.a, c.b}, c.more...) {
		if p == nil || p.cmd == nil {
			continue
		}
		select {
		case <-p.exited:
			continue
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		cl := agent.NewClient(p.sock)
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
		p.terminate()
	}
	killUnder(c.t, c.root)
	if c.t.Failed() {
		for _, p := range append([]*agentProc{c.a, c.b}, c.more...) {
			if p != nil {
				c.t.Logf("---- log of agent %s ----\n%s", p.name, readTail(p.log, 20000))
				logs, _ := filepath.Glob(agent.ShimLog(filepath.Join(p.dir, "run"), "*"))
				for _, l := range logs {
					c.t.Logf("---- %s ----\n%s", l, readTail(l, 10000))
				}
			}
		}
	}
}

// killUnder SIGKILLs every process whose command line mentions root: the
// QEMUs of this scenario (they survive their agent by design).
func killUnder(t *testing.T, root string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(root+"/")) {
			continue
		}
		t.Logf("killing leftover process %d: %s", pid, bytes.ReplaceAll(b[:min(len(b), 120)], []byte{0}, []byte{' '}))
		syscall.Kill(pid, syscall.SIGKILL)
		for i := 0; i < 100; i++ {
			if _, err := os.Stat(filepath.Join("/proc", e.Name())); err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func readTail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// cliResult is one run of the ftctl CLI.
type cliResult struct {
	args           []string
	stdout, stderr string
	code           int
}

func (r cliResult) String() string {
	return fmt.Sprintf("ftctl %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(r.args, " "), r.code, r.stdout, r.stderr)
}

// cli runs the ftctl binary in the test's own namespace (the agents'
// sockets are files, reachable from here).
func (c *cluster) cli(args ...string) cliResult {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := cliResult{args: args, stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		c.t.Fatalf("run ftctl %v: %v", args, err)
	}
	return r
}

func (c *cluster) mustCLI(args ...string) cliResult {
	c.t.Helper()
	r := c.cli(args...)
	if r.code != 0 {
		c.t.Fatalf("%v", r)
	}
	return r
}

// on runs a CLI command against agent p.
func (p *agentProc) cli(args ...string) cliResult {
	p.c.t.Helper()
	return p.c.cli(append([]string{args[0], "--socket", p.sock}, args[1:]...)...)
}

func (p *agentProc) mustCLI(args ...string) cliResult {
	p.c.t.Helper()
	r := p.cli(args...)
	if r.code != 0 {
		p.c.t.Fatalf("on %s: %v", p.name, r)
	}
	return r
}

// status is `ftctl status VM --json` on p.
func (p *agentProc) status(name string) (agent.VMStatus, error) {
	r := p.c.cli("status", "--socket", p.sock, "--json", name)
	if r.code != 0 {
		return agent.VMStatus{}, fmt.Errorf("%s", strings.TrimSpace(r.stderr))
	}
	var list []agent.VMStatus
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil || len(list) != 1 {
		return agent.VMStatus{}, fmt.Errorf("status --json printed %q: %v", r.stdout, err)
	}
	return list[0], nil
}

// waitState polls p until VM name is in state want; other states in
// fatal end the wait at once.
func (p *agentProc) waitState(name string, want agent.State, wait time.Duration, fatal ...agent.State) agent.VMStatus {
	t := p.c.t
	t.Helper()
	ctx, cancel := context.WithTimeout(p.c.ctx, wait)
	defer cancel()
	var last agent.VMStatus
	var err error
	for {
		last, err = p.status(name)
		if err == nil {
			if last.State == want {
				return last
			}
			for _, f := range fatal {
				if last.State == f {
					t.Fatalf("%s on %s is %s, want %s: %s", name, p.name, last.State, want, last.Reason)
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s on %s never became %s within %v: last %s %q (%v)", name, p.name, want, wait, last.State, last.Reason, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// serialPath is the serial log of VM name on p: as a primary it started,
// or as a replica (its standby, later the promoted guest).
func (p *agentProc) serialPath(name string, replica bool) string {
	kind := "vms"
	if replica {
		kind = "replicas"
	}
	return filepath.Join(p.dir, "run", kind, name, "qemu", "serial.log")
}

func (p *agentProc) serial(name string, replica bool) []byte {
	b, _ := os.ReadFile(p.serialPath(name, replica))
	return b
}

// waitSerial polls a serial log until ok accepts it.
func (p *agentProc) waitSerial(name string, replica bool, wait time.Duration, what string, ok func([]byte) bool) []byte {
	t := p.c.t
	t.Helper()
	ctx, cancel := context.WithTimeout(p.c.ctx, wait)
	defer cancel()
	for {
		b := p.serial(name, replica)
		if ok(b) {
			return b
		}
		select {
		case <-ctx.Done():
			t.Fatalf("serial of %s on %s: no %s within %v; last %q", name, p.name, what, wait, tail(b, 400))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// startVM writes the guest's spec and starts it on p with `ftctl start`:
// counter on the serial console, a disk writer, and the TCP service on the
// bed's VM address 0.
func (c *cluster) startVM(p *agentProc) {
	t := c.t
	t.Helper()
	img := testenv.Guest(t)
	addr, err := c.bed.VMAddr(0)
	if err != nil {
		t.Fatal(err)
	}
	mac, err := c.bed.VMMAC(0)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(c.root, "disk.raw")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	spec := vm.Spec{Name: vmName, MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd, Accel: vm.AccelTCG,
		Cmdline: img.Cmdline + " ftguest.run=counter,disk,tcp ftguest.ip=" + addr.String(),
		Disks:   []vm.Disk{{Path: disk}},
		NICs:    []vm.NIC{{MAC: mac.String()}}}
	b, err := json.MarshalIndent(spec, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	specFile := filepath.Join(c.root, "web.json")
	if err := os.WriteFile(specFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	p.mustCLI("start", "--spec", specFile, "--probe-addr", addr.Addr().String(), "--probe-port", "7000")
	p.waitSerial(vmName, false, 90*time.Second, "TCP service", func(b []byte) bool {
		return bytes.Contains(b, []byte("ftguest tcp listening"))
	})
}

// pair protects the VM of from on to, with the CLI, and waits for both
// sides to settle.
func (c *cluster) pair(from, to *agentProc, fromReplica bool) {
	c.t.Helper()
	r := from.mustCLI("pair", "--wait", vmName, to.listen)
	if !strings.Contains(r.stdout, "with "+to.listen) {
		c.t.Fatalf("pair printed %q", r.stdout)
	}
	from.waitState(vmName, agent.StateProtected, 2*time.Minute, agent.StateDegraded, agent.StateStopped)
	to.waitState(vmName, agent.StateStandby, 30*time.Second)
}

// repair brings a degraded VM on from back to protected on to: the agent's
// automatic re-pairing may be at it already; if not, `ftctl pair` does it.
func (c *cluster) repair(from, to *agentProc) {
	c.t.Helper()
	if s, err := from.status(vmName); err == nil && s.State == agent.StateDegraded {
		if r := from.cli("pair", vmName, to.listen); r.code != 0 && !strings.Contains(r.stderr, "unpair it first") {
			c.t.Fatalf("%v", r)
		}
	}
	from.waitState(vmName, agent.StateProtected, 2*time.Minute, agent.StateStopped)
	to.waitState(vmName, agent.StateStandby, 30*time.Second)
}

var resumedRE = regexp.MustCompile(`resumed epoch (\d+) in ([0-9.]+[a-zµ]+)`)

// promotion reads the epoch and duration a promoted VM's reason reports.
func promotion(t *testing.T, s agent.VMStatus) (uint64, time.Duration) {
	t.Helper()
	m := resumedRE.FindStringSubmatch(s.Reason)
	if m == nil {
		t.Fatalf("promoted VM's reason %q does not say what it resumed", s.Reason)
	}
	e, _ := strconv.ParseUint(m[1], 10, 64)
	d, err := time.ParseDuration(m[2])
	if err != nil {
		t.Fatalf("promotion time %q: %v", m[2], err)
	}
	return e, d
}

// logTime finds the time of the first line of an agent log (slog text)
// after since that contains every one of words.
func logTime(path string, since time.Time, words ...string) (time.Time, bool) {
	b, _ := os.ReadFile(path)
	for _, line := range strings.Split(string(b), "\n") {
		ok := true
		for _, w := range words {
			if !strings.Contains(line, w) {
				ok = false
				break
			}
		}
		if !ok || !strings.HasPrefix(line, "time=") {
			continue
		}
		f := strings.Fields(line)[0]
		ts, err := time.Parse(time.RFC3339Nano, strings.TrimPrefix(f, "time="))
		if err == nil && !ts.Before(since) {
			return ts, true
		}
	}
	return time.Time{}, false
}

// waitReason polls p until VM name's reason contains word.
func (p *agentProc) waitReason(name, word string, wait time.Duration) agent.VMStatus {
	t := p.c.t
	t.Helper()
	ctx, cancel := context.WithTimeout(p.c.ctx, wait)
	defer cancel()
	var last agent.VMStatus
	var err error
	for {
		if last, err = p.status(name); err == nil && strings.Contains(last.Reason, word) {
			return last
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s on %s: no %q in its reason within %v: last %s %q (%v)", name, p.name, word, wait, last.State, last.Reason, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stopAndVerifyDisk shuts the VM down on p with `ftctl stop` and checks the
// disk it ran on: the guest's records form one unbroken chain that holds
// every record the guest reported written. A replica disk that had a write
// the resumed memory did not know of, or lacked one it did, breaks the
// chain as soon as the resumed guest writes its next record.
func (p *agentProc) stopAndVerifyDisk(image string, replica bool) {
	t := p.c.t
	t.Helper()
	p.waitSerial(vmName, replica, 30*time.Second, "disk records", func(b []byte) bool { return counterlog.LastDiskSeq(b) > 0 })
	p.mustCLI("stop", vmName)
	serial := p.serial(vmName, replica)
	if bytes.Contains(serial, []byte("ftguest disk error")) {
		t.Fatalf("the guest on %s reported disk errors: %q", p.name, tail(serial, 600))
	}
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	rep, err := diskrec.Verify(f, fi.Size())
	if err != nil {
		t.Fatalf("disk of %s on %s (%s): %v (report %+v)", vmName, p.name, image, err, rep)
	}
	if want := counterlog.LastDiskSeq(serial); rep.LastSeq < want {
		t.Fatalf("disk on %s ends at record %d, but the guest had written %d", p.name, rep.LastSeq, want)
	}
	t.Logf("disk on %s: %d records, chain intact up to seq %d", p.name, rep.Records, rep.LastSeq)
}

// replicaDisk is the disk image a host keeps for VM name as its replica
// (and runs it on once promoted there).
func (p *agentProc) replicaDisk() string {
	return filepath.Join(p.dir, "state", "replicas", vmName, "disk0.raw")
}
