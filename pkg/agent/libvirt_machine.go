package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/qmp"
)

// libvirtMachine is a QEMU that libvirt started, reached over the
// domain's dedicated QMP socket (the one domxml.Prepare or domxml.Standby
// added): the agent checkpoints through its own QMP client there, not
// through libvirt's pass-through, which costs a libvirtd RPC and a job
// lock per command (see package libvirt). QEMU is not the agent's child,
// so its end is seen as the monitor closing, and its pid comes from the
// socket's peer credentials.
type libvirtMachine struct {
	domain  string
	qmp     *qmp.Client
	pid     int
	ramFile string
	serial  string // the serial file as QEMU sees it ("" for none)
	accel   string
	// lv, if set, connects to the libvirtd that runs the domain: Stop
	// asks it, and an owned domain (a standby this agent defined) is
	// destroyed and undefined by Close.
	lv    func(context.Context) (*libvirt.Conn, error)
	owned atomic.Bool

	exited   chan struct{}
	shutdown atomic.Bool // QEMU announced SHUTDOWN before its monitor closed
	closing  atomic.Bool // Close let go of a QEMU that runs on
	once     sync.Once
}

// dialLibvirtMachine connects the dedicated QMP socket of a running
// domain.
func dialLibvirtMachine(ctx context.Context, domain, qmpSocket, ramFile, serial, accel string, lv func(context.Context) (*libvirt.Conn, error)) (*libvirtMachine, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", qmpSocket)
	if err != nil {
		return nil, fmt.Errorf("%w: QMP socket of domain %s: %w", ErrState, domain, err)
	}
	pid, err := peerPID(c)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("QMP socket of domain %s: %w", domain, err)
	}
	q, err := qmp.New(ctx, c)
	if err != nil {
		return nil, fmt.Errorf("QMP of domain %s: %w", domain, err)
	}
	m := &libvirtMachine{domain: domain, qmp: q, pid: pid, ramFile: ramFile, serial: serial, accel: accel, lv: lv, exited: make(chan struct{})}
	// SHUTDOWN comes for every orderly end (guest poweroff, quit, and the
	// SIGTERM of virsh shutdown/destroy), never for a crash or SIGKILL:
	// it tells a stop from a failure. Events arrive before the monitor
	// closes, and the subscription is drained before exited closes, so
	// shutdown is settled by then.
	events, _ := q.Subscribe("SHUTDOWN")
	go func() {
		for range events {
			m.shutdown.Store(true)
		}
		m.settle()
		close(m.exited)
	}()
	return m, nil
}

// settle runs once the monitor has closed: normally because QEMU exited.
// A QEMU that outlives its monitor (a broken socket, not our own Close)
// is killed, so that "exited" is true when the agent acts on it: a
// secondary told to take over must never run next to a QEMU still alive
// here.
func (m *libvirtMachine) settle() {
	if m.closing.Load() {
		return
	}
	for range 200 { // 2s for an exiting QEMU to be gone
		if !processAlive(m.pid) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	syscall.Kill(m.pid, syscall.SIGKILL)
	for range 500 {
		if !processAlive(m.pid) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// processAlive says whether pid exists and has not exited (a zombie has:
// libvirtd, its parent, reaps it in its own time).
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// peerPID is the pid of the process at the other end of a unix socket.
func peerPID(c net.Conn) (int, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, fmt.Errorf("not a unix socket: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return int(cred.Pid), nil
}

func (m *libvirtMachine) QMP() *qmp.Client        { return m.qmp }
func (m *libvirtMachine) PID() int                { return m.pid }
func (m *libvirtMachine) RAMFile() string         { return m.ramFile }
func (m *libvirtMachine) Exited() <-chan struct{} { return m.exited }
func (m *libvirtMachine) Accel() string           { return m.accel }

// Stderr: QEMU's stderr goes to libvirt's domain log, which the agent
// does not read; say where it is.
func (m *libvirtMachine) Stderr() string {
	return "see libvirt's log of domain " + m.domain + " (/var/log/libvirt/qemu/" + m.domain + ".log)"
}

// cleanShutdown reports whether QEMU announced an orderly shutdown before
// its monitor closed (meaningful once Exited is closed).
func (m *libvirtMachine) cleanShutdown() bool { return m.shutdown.Load() }

// Serial reads the domain's serial file. libvirtd may run in a mount
// namespace of its own (a private /var/log/libvirt, as in tests), so the
// file is read through QEMU's view of the filesystem while QEMU runs.
func (m *libvirtMachine) Serial() ([]byte, error) {
	if m.serial == "" {
		return nil, fmt.Errorf("%w: domain %s has no serial file", ErrNotFound, m.domain)
	}
	select {
	case <-m.exited:
	default:
		if b, err := os.ReadFile(filepath.Join(fmt.Sprintf("/proc/%d/root", m.pid), m.serial)); err == nil {
			return b, nil
		}
	}
	return os.ReadFile(m.serial)
}

// Stop ends QEMU in order: through libvirt when the agent has a
// connection to it (destroy: SIGTERM first, so QEMU still announces
// SHUTDOWN), else with QMP quit. If ctx ends first QEMU is killed.
func (m *libvirtMachine) Stop(ctx context.Context) error {
	select {
	case <-m.exited:
		return nil
	default:
	}
	var err error
	if m.lv == nil {
		err = m.qmp.Quit(ctx)
	} else {
		var c *libvirt.Conn
		if c, err = m.lv(ctx); err == nil {
			err = c.Destroy(ctx, m.domain)
		}
	}
	if err != nil && !errors.Is(err, libvirt.ErrNoDomain) {
		return errors.Join(err, m.Kill())
	}
	select {
	case <-m.exited:
		return nil
	case <-ctx.Done():
		return m.Kill()
	}
}

// Kill sends SIGKILL to QEMU (libvirt notices and cleans up) and waits
// for the monitor to close.
func (m *libvirtMachine) Kill() error {
	select {
	case <-m.exited:
		return nil
	default:
	}
	if err := syscall.Kill(m.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill QEMU of domain %s: %w", m.domain, err)
	}
	select {
	case <-m.exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("QEMU of domain %s (pid %d) still answers QMP 10s after SIGKILL", m.domain, m.pid)
	}
}

// Close drops the monitor connection; a domain the agent owns (a standby
// it defined) is destroyed and undefined too. A domain libvirt owns keeps
// running: the agent only lets go of it.
func (m *libvirtMachine) Close() error {
	var err error
	m.once.Do(func() {
		if m.owned.Load() && m.lv != nil {
			err = m.dropDomain()
		}
		m.closing.Store(true)
		m.qmp.Close()
	})
	return err
}

// dropDomain destroys and undefines the domain (a standby this agent
// defined and no longer needs).
func (m *libvirtMachine) dropDomain() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := m.lv(ctx)
	if err != nil {
		return err
	}
	if derr := c.Destroy(ctx, m.domain); derr != nil && !errors.Is(derr, libvirt.ErrNoDomain) && !errors.Is(derr, libvirt.ErrNotReady) {
		err = derr
	}
	if uerr := c.Undefine(ctx, m.domain); uerr != nil && !errors.Is(uerr, libvirt.ErrNoDomain) {
		err = errors.Join(err, uerr)
	}
	return err
}
