// Package libvirttest runs a private libvirtd (with its virtlogd) for a
// test: its own configuration, state, run and log directories, its own
// socket, stopped with everything it started when the test ends. Two
// daemons in one test are two independent "hosts"; a daemon started in a
// network namespace gives its QEMUs that network. It runs
// hack/libvirtd.sh, which does the namespace work, so tests and people at
// a shell start daemons the same way.
package libvirttest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"html"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/libvirt"
)

// Options for Start.
type Options struct {
	// NetNS is a network namespace path (/run/netns/NAME) to run the
	// daemon, and so its QEMUs, in. Empty: the caller's namespace.
	NetNS string
	// StartTimeout bounds the wait for the daemon's socket to answer;
	// libvirtd probes QEMU's capabilities first (seconds under TCG on a
	// loaded machine). Default 90 s.
	StartTimeout time.Duration
	// BeforeStart, when set, runs with the daemon's directory before the
	// daemon starts: the place to put files libvirtd reads only at start,
	// such as a hook script in DIR/etc/hooks (/etc/libvirt/hooks inside).
	BeforeStart func(dir string) error
}

// Daemon is a running private libvirtd.
type Daemon struct {
	// Dir holds everything: run/ (sockets; /run/libvirt inside), lib/
	// (/var/lib/libvirt: domain state, guest RAM files under lib/qemu/ram),
	// etc/ (configuration), log/ (log/qemu/NAME.log), cache/.
	Dir string
	// Socket is the daemon's client socket; pass it to libvirt.Dial.
	Socket string
	// URI is the same socket as a libvirt URI, for virsh -c.
	URI string

	cmd      *exec.Cmd
	log      *os.File
	done     chan struct{}
	waitErr  error
	stopOnce sync.Once
}

// capCache keeps libvirt's QEMU capability probe between daemons of one
// machine, so each daemon after the first starts in about a second
// instead of probing QEMU again. libvirt re-validates the cached files
// (binary times, kernel, host CPU) and re-probes when they are stale.
var capCache = filepath.Join(os.TempDir(), "ftctl-libvirt-capcache")

// Requirements reports why a private libvirtd cannot run here, or "" when
// it can.
func Requirements() string {
	if os.Geteuid() != 0 {
		return "needs root (libvirtd's system instance and its mount namespace)"
	}
	for _, b := range []string{"libvirtd", "virtlogd", "unshare", "qemu-system-x86_64"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Sprintf("needs %s (install with hack/deps.sh): %v", b, err)
		}
	}
	return ""
}

// Start runs a private libvirtd for the test and stops it (destroying its
// running domains first) in t.Cleanup. It skips the test when
// Requirements are not met, and fails it when the daemon does not come up.
func Start(t testing.TB, opts Options) *Daemon {
	t.Helper()
	if why := Requirements(); why != "" {
		t.Skip(why)
	}
	script, err := Script()
	if err != nil {
		t.Fatal(err)
	}
	// A short directory: unix socket paths must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "ftlv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx, cancel := context.WithTimeout(context.Background(), orDefault(opts.StartTimeout, 90*time.Second))
	defer cancel()
	d, err := start(ctx, dir, script, opts)
	if d != nil {
		t.Cleanup(d.Stop)
	}
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Script returns the path of hack/libvirtd.sh, found from the working
// directory upwards (tests run inside the module).
func Script() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		mod, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && bytes.Contains(mod, []byte("module github.com/ftctl/ftctl\n")) {
			return filepath.Join(d, "hack", "libvirtd.sh"), nil
		}
		if filepath.Dir(d) == d {
			return "", errors.New("libvirttest: hack/libvirtd.sh not found: not inside the ftctl module")
		}
	}
}

func start(ctx context.Context, dir, script string, opts Options) (*Daemon, error) {
	d := &Daemon{
		Dir:    dir,
		Socket: filepath.Join(dir, "run", "libvirt-sock"),
		done:   make(chan struct{}),
	}
	d.URI = "qemu:///system?socket=" + d.Socket
	seedCapCache(dir)
	if opts.BeforeStart != nil {
		if err := opts.BeforeStart(dir); err != nil {
			return nil, fmt.Errorf("libvirttest: before start: %w", err)
		}
	}
	logf, err := os.Create(filepath.Join(dir, "daemon.log"))
	if err != nil {
		return nil, err
	}
	d.log = logf
	args := []string{script, dir}
	if opts.NetNS != "" {
		args = append([]string{"nsenter", "--net=" + opts.NetNS}, args...)
	}
	d.cmd = exec.Command(args[0], args[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	// Own process group, so Stop can reach the script's children too; and
	// the script stops its daemons if this test binary dies.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	// Pdeathsig fires when the thread that forked the child exits, not the
	// process, and Go retires any thread whose goroutine locked it and never
	// unlocked (pkg/testbed's namespace helpers do): a daemon forked from
	// such a thread got SIGTERM mid-test. So fork from a goroutine pinned
	// to its thread for the daemon's whole life.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := d.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		d.waitErr = d.cmd.Wait()
		close(d.done)
	}()
	if err := <-started; err != nil {
		logf.Close()
		return nil, fmt.Errorf("libvirttest: start %s: %w", script, err)
	}
	if err := d.waitReady(ctx); err != nil {
		return d, err
	}
	saveCapCache(dir)
	return d, nil
}

func (d *Daemon) waitReady(ctx context.Context) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		select {
		case <-d.done:
			return fmt.Errorf("libvirttest: daemon exited (%v) before answering:\n%s", d.waitErr, d.LogTail(40))
		case <-ctx.Done():
			return fmt.Errorf("libvirttest: daemon not ready: %v (last: %v):\n%s", ctx.Err(), last, d.LogTail(40))
		case <-tick.C:
		}
		if _, err := os.Stat(d.Socket); err != nil {
			last = err
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		c, err := libvirt.Dial(cctx, d.Socket)
		if err == nil {
			_, err = c.Version(cctx)
			c.Close()
		}
		cancel()
		if err == nil {
			return nil
		}
		last = err
	}
}

// Conn connects to the daemon for the test and closes the connection in
// t.Cleanup.
func (d *Daemon) Conn(t testing.TB) *libvirt.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := libvirt.Dial(ctx, d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Stop destroys the daemon's running domains, then stops the daemon and
// virtlogd. It is idempotent and runs in t.Cleanup.
func (d *Daemon) Stop() {
	d.stopOnce.Do(func() {
		defer d.log.Close()
		select {
		case <-d.done:
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if c, err := libvirt.Dial(ctx, d.Socket); err == nil {
			names, _ := c.Running(ctx)
			for _, n := range names {
				_ = c.Destroy(ctx, n)
			}
			c.Close()
		}
		// The script's trap also kills QEMUs libvirtd left, via pid files.
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
			<-d.done
		}
	})
}

// LogTail returns the last n lines of the daemons' log (libvirtd and
// virtlogd warnings and errors).
func (d *Daemon) LogTail(n int) string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "daemon.log"))
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// QEMULog returns the domain's QEMU log (libvirt's command line and QEMU's
// stderr).
func (d *Daemon) QEMULog(name string) string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "log", "qemu", name+".log"))
	return string(b)
}

// RAMFile returns where the running domain's guest RAM file is seen from
// outside the daemon's mount namespace, given the path QEMU reports
// (qom-get mem-path, under /var/lib/libvirt/qemu/ram).
func (d *Daemon) RAMFile(memPath string) string {
	const inside = "/var/lib/libvirt/"
	if rest, ok := strings.CutPrefix(memPath, inside); ok {
		return filepath.Join(d.Dir, "lib", rest)
	}
	return memPath
}

func seedCapCache(dir string) {
	copyXML(capCache, filepath.Join(dir, "cache", "qemu", "capabilities"))
}

func saveCapCache(dir string) {
	copyXML(filepath.Join(dir, "cache", "qemu", "capabilities"), capCache)
}

// copyXML copies *.xml from src to dst, best effort: a missing cache only
// costs a probe.
func copyXML(src, dst string) {
	m, _ := filepath.Glob(filepath.Join(src, "*.xml"))
	if len(m) == 0 {
		return
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return
	}
	for _, f := range m {
		in, err := os.Open(f)
		if err != nil {
			continue
		}
		tmp, err := os.CreateTemp(dst, ".cap*")
		if err == nil {
			_, err = io.Copy(tmp, in)
			tmp.Close()
			if err == nil {
				err = os.Rename(tmp.Name(), filepath.Join(dst, filepath.Base(f)))
			}
			if err != nil {
				os.Remove(tmp.Name())
			}
		}
		in.Close()
	}
}

// GuestDomain describes a TCG domain that runs the built-in guest image
// (internal/testenv.Guest) with file-backed shared RAM, as protection
// needs.
type GuestDomain struct {
	Name      string
	MemoryMiB int // default 128
	Kernel    string
	Initrd    string
	Cmdline   string
	// Serial is a file that receives the guest's console; empty: none.
	Serial string
	// Devices is raw XML added inside <devices> (disks, interfaces).
	Devices string
	// QEMUArgs go into <qemu:commandline>.
	QEMUArgs []string
}

// XML renders the domain definition.
func (g GuestDomain) XML() string {
	mem := g.MemoryMiB
	if mem == 0 {
		mem = 128
	}
	esc := html.EscapeString
	var b strings.Builder
	fmt.Fprintf(&b, "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n")
	fmt.Fprintf(&b, "  <name>%s</name>\n  <memory unit='MiB'>%d</memory>\n  <vcpu>1</vcpu>\n", esc(g.Name), mem)
	b.WriteString("  <memoryBacking>\n    <source type='file'/>\n    <access mode='shared'/>\n  </memoryBacking>\n")
	fmt.Fprintf(&b, "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <kernel>%s</kernel>\n    <initrd>%s</initrd>\n    <cmdline>%s</cmdline>\n  </os>\n",
		esc(g.Kernel), esc(g.Initrd), esc(g.Cmdline))
	// The guest's panic=-1 reboots on panic; a destroyed domain is what a
	// test wants to see then, not a reboot loop.
	b.WriteString("  <on_reboot>destroy</on_reboot>\n  <devices>\n")
	if g.Serial != "" {
		fmt.Fprintf(&b, "    <serial type='file'>\n      <source path='%s'/>\n    </serial>\n", esc(g.Serial))
	}
	b.WriteString("    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n")
	b.WriteString("    <memballoon model='none'/>\n")
	b.WriteString(g.Devices)
	b.WriteString("  </devices>\n")
	if len(g.QEMUArgs) > 0 {
		b.WriteString("  <qemu:commandline>\n")
		for _, a := range g.QEMUArgs {
			fmt.Fprintf(&b, "    <qemu:arg value='%s'/>\n", esc(a))
		}
		b.WriteString("  </qemu:commandline>\n")
	}
	b.WriteString("</domain>\n")
	return b.String()
}
