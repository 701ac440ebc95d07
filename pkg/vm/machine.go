package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/pkg/qmp"
)

// ErrExited is returned by calls on a Machine whose QEMU process has ended.
var ErrExited = errors.New("qemu exited")

// Options are the per-run choices for Start.
type Options struct {
	// RunDir holds the QMP socket and the serial log. Default: a new
	// directory under os.TempDir(), removed by Close.
	RunDir string
	// RAMDir is where the guest-RAM file is created. Default /dev/shm (so
	// guest RAM is not written back to a disk), else RunDir.
	RAMDir string
	// Standby starts QEMU with -incoming defer and -S, mapping ReplicaRAM as
	// guest RAM instead of a fresh file. The Machine does not own (and never
	// removes) ReplicaRAM.
	Standby    bool
	ReplicaRAM string
	// StartTimeout bounds process start until QMP answers. Default 30s.
	StartTimeout time.Duration
	Logger       *slog.Logger
}

// Machine is one running QEMU process.
type Machine struct {
	spec    Spec
	accel   string
	argv    []string
	cmd     *exec.Cmd
	qmp     *qmp.Client
	runDir  string
	ownDir  bool
	ramFile string
	ownRAM  bool
	serial  string
	log     *slog.Logger
	stderr  *tailBuffer
	exited  chan struct{}
	exitErr error

	closeOnce sync.Once
}

// Start validates spec, resolves the accelerator, and starts QEMU with its
// QMP socket connected and capabilities negotiated.
func Start(ctx context.Context, spec Spec, o Options) (*Machine, error) {
	spec = spec.WithDefaults()
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if o.Standby {
		if o.ReplicaRAM == "" {
			return nil, fmt.Errorf("%w: standby needs a replica RAM file", ErrInvalidSpec)
		}
		fi, err := os.Stat(o.ReplicaRAM)
		if err != nil {
			return nil, fmt.Errorf("%w: replica RAM: %v", ErrInvalidSpec, err)
		}
		if fi.Size() != int64(spec.MemoryMiB)<<20 {
			return nil, fmt.Errorf("%w: replica RAM %s is %d bytes, memory_mib %d needs %d",
				ErrInvalidSpec, o.ReplicaRAM, fi.Size(), spec.MemoryMiB, int64(spec.MemoryMiB)<<20)
		}
	}
	if _, err := exec.LookPath(spec.QEMU); err != nil {
		return nil, fmt.Errorf("%w: qemu: %v (install qemu-system-x86: hack/deps.sh)", ErrInvalidSpec, err)
	}
	accel, err := ResolveAccel(ctx, spec.Accel, spec.QEMU)
	if err != nil {
		return nil, err
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Machine{spec: spec, accel: accel, log: log.With("vm", spec.Name), exited: make(chan struct{}), stderr: &tailBuffer{max: 8 << 10}}
	started := false
	defer func() {
		if !started {
			m.Close()
		}
	}()
	if o.RunDir == "" {
		d, err := os.MkdirTemp("", "ftctl-"+spec.Name+"-")
		if err != nil {
			return nil, err
		}
		m.runDir, m.ownDir = d, true
	} else {
		if err := os.MkdirAll(o.RunDir, 0o700); err != nil {
			return nil, err
		}
		m.runDir = o.RunDir
	}
	m.serial = filepath.Join(m.runDir, "serial.log")
	if o.Standby {
		m.ramFile = o.ReplicaRAM
	} else {
		dir := o.RAMDir
		if dir == "" {
			dir = m.runDir
			if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
				dir = "/dev/shm"
			}
		}
		f, err := os.CreateTemp(dir, "ftctl-"+spec.Name+"-*.ram")
		if err != nil {
			return nil, fmt.Errorf("create guest RAM file: %w", err)
		}
		m.ramFile, m.ownRAM = f.Name(), true
		f.Close()
	}

	// QEMU inherits an already listening socket, so there is no window in
	// which we poll for a path to appear, and a QEMU that dies at start-up
	// resets our connection instead of leaving us waiting.
	sock := filepath.Join(m.runDir, "qmp.sock")
	os.Remove(sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("qmp listener: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	lf, err := ln.File()
	ln.Close()
	if err != nil {
		return nil, err
	}
	m.argv = spec.argv(argvOptions{accel: accel, ramFile: m.ramFile, serialLog: m.serial, qmpFD: 3, standby: o.Standby})
	cmd := exec.Command(spec.QEMU, m.argv...)
	cmd.ExtraFiles = []*os.File{lf}
	cmd.Stderr = m.stderr
	cmd.Stdout = m.stderr
	// Own process group: a terminal's Ctrl-C goes to ftctl, which decides
	// what happens to the guest.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	m.log.Debug("starting qemu", "argv", m.argv)
	err = cmd.Start()
	lf.Close()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.QEMU, err)
	}
	m.cmd = cmd
	go func() {
		werr := cmd.Wait()
		m.exitErr = werr
		close(m.exited)
	}()

	timeout := o.StartTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	go func() {
		select {
		case <-m.exited:
			cancel()
		case <-dctx.Done():
		}
	}()
	c, err := qmp.Dial(dctx, "unix", sock)
	if err != nil {
		// A reset connection usually means QEMU is exiting: give it a
		// moment so the error carries QEMU's own reason.
		select {
		case <-m.exited:
			return nil, m.exitError()
		case <-time.After(2 * time.Second):
		}
		return nil, fmt.Errorf("connect QMP of %s: %w", spec.Name, err)
	}
	m.qmp = c
	m.log.Info("qemu started", "pid", cmd.Process.Pid, "accel", accel, "standby", o.Standby)
	started = true
	return m, nil
}

func (m *Machine) exitError() error {
	<-m.exited
	msg := bytes.TrimSpace(m.stderr.Bytes())
	if len(msg) > 0 {
		return fmt.Errorf("%w (%v): %s", ErrExited, m.exitErr, msg)
	}
	return fmt.Errorf("%w (%v)", ErrExited, m.exitErr)
}

// Spec returns the defaulted spec the machine runs.
func (m *Machine) Spec() Spec { return m.spec }

// Accel is the accelerator in use (kvm or tcg).
func (m *Machine) Accel() string { return m.accel }

// Argv is QEMU's command line, without the binary.
func (m *Machine) Argv() []string { return append([]string(nil), m.argv...) }

// QMP is the machine's monitor connection.
func (m *Machine) QMP() *qmp.Client { return m.qmp }

// PID of the QEMU process.
func (m *Machine) PID() int { return m.cmd.Process.Pid }

// RAMFile is the path of the guest-RAM file.
func (m *Machine) RAMFile() string { return m.ramFile }

// SerialPath is the file that receives the guest's serial console.
func (m *Machine) SerialPath() string { return m.serial }

// Serial returns everything the guest wrote to its serial console so far.
func (m *Machine) Serial() ([]byte, error) { return os.ReadFile(m.serial) }

// Exited is closed when the QEMU process has ended.
func (m *Machine) Exited() <-chan struct{} { return m.exited }

// Stderr returns the tail of QEMU's own diagnostics.
func (m *Machine) Stderr() string { return m.stderr.String() }

// WaitSerial polls the serial log until match returns true for its contents,
// the context ends, or QEMU exits.
func (m *Machine) WaitSerial(ctx context.Context, match func([]byte) bool) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		b, _ := m.Serial()
		if match(b) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for serial output of %s: %w (last output: %q)", m.spec.Name, ctx.Err(), tail(b, 200))
		case <-m.exited:
			b, _ := m.Serial()
			if match(b) {
				return nil
			}
			return fmt.Errorf("waiting for serial output: %w", m.exitError())
		case <-t.C:
		}
	}
}

// Stop asks QEMU to quit and waits for it; if ctx ends first the process is
// killed.
func (m *Machine) Stop(ctx context.Context) error {
	select {
	case <-m.exited:
		return nil
	default:
	}
	if m.qmp != nil {
		if err := m.qmp.Quit(ctx); err != nil {
			m.log.Warn("qmp quit failed, killing", "err", err)
			return m.Kill()
		}
	}
	select {
	case <-m.exited:
		return nil
	case <-ctx.Done():
		return m.Kill()
	}
}

// Kill sends SIGKILL to QEMU and waits for it to be gone: the way a host
// failure looks to the guest.
func (m *Machine) Kill() error {
	if m.cmd == nil || m.cmd.Process == nil {
		return nil
	}
	select {
	case <-m.exited:
		return nil
	default:
	}
	if err := m.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	<-m.exited
	return nil
}

// Close kills QEMU if it still runs, closes QMP, and removes the RAM file
// and run directory the machine owns.
func (m *Machine) Close() error {
	var err error
	m.closeOnce.Do(func() {
		if m.cmd != nil {
			err = m.Kill()
		}
		if m.qmp != nil {
			m.qmp.Close()
		}
		if m.ownRAM && m.ramFile != "" {
			os.Remove(m.ramFile)
		}
		if m.ownDir {
			os.RemoveAll(m.runDir)
		}
	})
	return err
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

var _ io.Writer = (*tailBuffer)(nil)

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append([]byte(nil), t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.buf...)
}

func (t *tailBuffer) String() string { return string(t.Bytes()) }
