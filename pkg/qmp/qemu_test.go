package qmp

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const qemuBinary = "qemu-system-x86_64"

// qemuProc is a QEMU started for one test, with its QMP socket.
type qemuProc struct {
	cmd    *exec.Cmd
	sock   string
	exited chan struct{}
	stderr *bytes.Buffer
}

// startQEMU starts a tiny paused TCG VM (no disk, no NIC, no kernel: the CPU
// would sit in the BIOS) with a QMP socket, and stops it at cleanup.
func startQEMU(t testing.TB, extra ...string) *qemuProc {
	t.Helper()
	bin, err := exec.LookPath(qemuBinary)
	if err != nil {
		t.Skipf("%s not installed: %v", qemuBinary, err)
	}
	// Unix socket paths are limited to 108 bytes, so stay clear of t.TempDir.
	dir, err := os.MkdirTemp("", "qmpt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	args := append([]string{
		"-accel", "tcg", "-machine", "pc", "-nodefaults", "-vga", "none",
		"-m", "64", "-display", "none", "-S",
		"-qmp", "unix:" + sock + ",server=on,wait=off",
	}, extra...)
	cmd := exec.Command(bin, args...)
	p := &qemuProc{cmd: cmd, sock: sock, exited: make(chan struct{}), stderr: new(bytes.Buffer)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() { cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() && p.stderr.Len() > 0 {
			t.Logf("qemu stderr: %s", p.stderr)
		}
	})
	return p
}

// dial connects to the QEMU's QMP socket, retrying while QEMU starts up.
func (p *qemuProc) dial(t testing.TB, opts ...Option) *Client {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	delay := 5 * time.Millisecond
	for {
		c, err := Dial(ctx, "unix", p.sock, opts...)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		select {
		case <-p.exited:
			t.Fatalf("qemu exited during start-up: %v\n%s", p.cmd.ProcessState, p.stderr)
		case <-ctx.Done():
			t.Fatalf("qemu QMP socket never answered: %v", err)
		case <-time.After(delay):
			delay = min(2*delay, 200*time.Millisecond)
		}
	}
}

func TestQEMUStatusEventsAndConcurrentCalls(t *testing.T) {
	p := startQEMU(t)
	c := p.dial(t)
	ctx := ctxT(t, 60*time.Second)

	if g := c.Greeting(); g.Major < 7 {
		t.Errorf("greeting %+v: want QEMU 7 or later", g)
	}
	st, err := c.QueryStatus(ctx)
	if err != nil || st.Running || st.Status != "prelaunch" {
		t.Fatalf("QueryStatus of a -S VM = %+v, %v; want prelaunch", st, err)
	}

	// STOP/RESUME events must arrive, in order, while other goroutines
	// keep the monitor busy with commands.
	events, cancel := c.Subscribe("STOP", "RESUME")
	defer cancel()
	const rounds = 5
	stopBusy := make(chan struct{})
	var busy sync.WaitGroup
	for range 4 {
		busy.Go(func() {
			for {
				select {
				case <-stopBusy:
					return
				default:
				}
				if _, err := c.QueryStatus(ctx); err != nil {
					t.Errorf("concurrent query-status: %v", err)
					return
				}
			}
		})
	}
	for range rounds {
		if err := c.Cont(ctx); err != nil {
			t.Fatalf("cont: %v", err)
		}
		if st, err := c.QueryStatus(ctx); err != nil || !st.Running || st.Status != "running" {
			t.Fatalf("after cont: %+v, %v", st, err)
		}
		if err := c.Stop(ctx); err != nil {
			t.Fatalf("stop: %v", err)
		}
		if st, err := c.QueryStatus(ctx); err != nil || st.Running || st.Status != "paused" {
			t.Fatalf("after stop: %+v, %v", st, err)
		}
	}
	close(stopBusy)
	busy.Wait()
	var got []string
	for len(got) < 2*rounds {
		select {
		case ev := <-events:
			if ev.Timestamp.IsZero() {
				t.Errorf("event %s without timestamp", ev.Name)
			}
			got = append(got, ev.Name)
		case <-ctx.Done():
			t.Fatalf("only %d events arrived: %v", len(got), got)
		}
	}
	want := strings.Repeat("RESUME,STOP,", rounds)
	if strings.Join(got, ",")+"," != want {
		t.Errorf("events %v, want %d RESUME/STOP pairs", got, rounds)
	}
	if c.DroppedEvents() != 0 {
		t.Errorf("%d events dropped", c.DroppedEvents())
	}

	// 50 concurrent callers, each with a question only it knows the answer
	// to: HMP evaluates its own expression.
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			out, err := c.HumanMonitorCommand(ctx, fmt.Sprintf("print /d %d*7+%d", 1000+i, i))
			if err != nil {
				t.Errorf("caller %d: %v", i, err)
				return
			}
			if want := fmt.Sprint((1000+i)*7 + i); strings.TrimSpace(out) != want {
				t.Errorf("caller %d got %q, want %s", i, out, want)
			}
		})
	}
	wg.Wait()

	if err := c.AnnounceSelf(ctx); err != nil {
		t.Errorf("announce-self on a VM without NICs: %v", err)
	}
}

func TestQEMUErrorsKeepClass(t *testing.T) {
	p := startQEMU(t)
	c := p.dial(t)
	ctx := ctxT(t, 30*time.Second)
	var qe *Error
	err := c.Execute(ctx, "no-such-command", nil, nil)
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("unknown command: %v, want CommandNotFound", err)
	}
	err = c.CloseFD(ctx, "never-given")
	if !errors.As(err, &qe) || qe.Class != "GenericError" || qe.Command != "closefd" {
		t.Fatalf("closefd of an unknown name: %v, want GenericError", err)
	}
	// Errors leave the connection usable.
	if _, err := c.QueryStatus(ctx); err != nil {
		t.Fatalf("query-status after error replies: %v", err)
	}
}

// TestQEMUHugeReply dumps 512 KiB of guest memory through HMP: the reply is
// a JSON string of about 2 MiB, far past go-qemu's 64 KB line limit.
func TestQEMUHugeReply(t *testing.T) {
	p := startQEMU(t)
	c := p.dial(t)
	ctx := ctxT(t, 60*time.Second)
	const words = 128 << 10 // 4-byte words, 4 per output line
	out, err := c.HumanMonitorCommand(ctx, fmt.Sprintf("xp /%dx 0", words))
	if err != nil {
		t.Fatal(err)
	}
	if len(out) <= 1<<20 {
		t.Fatalf("reply is %d bytes, want over 1 MiB", len(out))
	}
	lines := strings.Split(strings.TrimRight(out, "\r\n"), "\n")
	if len(lines) != words/4 {
		t.Fatalf("%d lines, want %d", len(lines), words/4)
	}
	last := fmt.Sprintf("%016x:", (words-4)*4)
	if !strings.HasPrefix(lines[len(lines)-1], last) {
		t.Errorf("last line %q does not start with %q", lines[len(lines)-1], last)
	}
	t.Logf("reply: %d bytes", len(out))
	// The same connection serves a normal call afterwards.
	if _, err := c.QueryStatus(ctx); err != nil {
		t.Fatal(err)
	}
}

// readMigrationStream reads an outgoing migration stream until EOF.
func readMigrationStream(f *os.File) <-chan []byte {
	out := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(f)
		out <- b
	}()
	return out
}

// checkMigrationStream checks QEMU's migration stream framing: "QEVM",
// version 3, and at the end QEMU_VM_EOF followed by the
// QEMU_VM_VMDESCRIPTION section (0x06, big-endian length, JSON).
func checkMigrationStream(t *testing.T, b []byte) {
	t.Helper()
	if len(b) < 9 || string(b[:4]) != "QEVM" || binary.BigEndian.Uint32(b[4:8]) != 3 {
		t.Fatalf("migration stream of %d bytes has no QEVM v3 header: % x", len(b), b[:min(len(b), 16)])
	}
	i := bytes.LastIndex(b, []byte{0x00, 0x06}) // the JSON holds no NUL bytes
	if i < 0 || len(b)-i < 6 {
		t.Fatal("migration stream has no QEMU_VM_EOF + VMDESCRIPTION trailer")
	}
	desc := b[i+6:]
	if n := binary.BigEndian.Uint32(b[i+2 : i+6]); int(n) != len(desc) || !json.Valid(desc) ||
		!bytes.Contains(desc, []byte(`"devices"`)) {
		t.Fatalf("bad VMDESCRIPTION: length field %d, %d bytes left, valid JSON %v", n, len(desc), json.Valid(desc))
	}
}

// TestQEMUMigrateThroughPassedFD passes one end of a socketpair to the
// source QEMU (getfd) and the other to a standby QEMU started with
// -incoming defer, migrates over it, and checks both sides finish.
func TestQEMUMigrateThroughPassedFD(t *testing.T) {
	src := startQEMU(t)
	dst := startQEMU(t, "-incoming", "defer")
	cs := src.dial(t)
	cd := dst.dial(t)
	ctx := ctxT(t, 120*time.Second)

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	out, in := os.NewFile(uintptr(fds[0]), "mig-out"), os.NewFile(uintptr(fds[1]), "mig-in")
	defer out.Close()
	defer in.Close()
	if err := cs.GetFD(ctx, "mig", int(out.Fd())); err != nil {
		t.Fatalf("getfd on source: %v", err)
	}
	if err := cd.GetFD(ctx, "mig", int(in.Fd())); err != nil {
		t.Fatalf("getfd on standby: %v", err)
	}
	// QEMU holds its own copies now.
	out.Close()
	in.Close()

	if st, err := cd.QueryStatus(ctx); err != nil || st.Status != "inmigrate" {
		t.Fatalf("standby status %+v, %v; want inmigrate", st, err)
	}
	migEvents, cancel := cs.Subscribe("MIGRATION")
	defer cancel()
	for _, c := range []*Client{cs, cd} {
		if err := c.SetMigrationCapabilities(ctx, map[string]bool{"events": true}); err != nil {
			t.Fatalf("migrate-set-capabilities: %v", err)
		}
	}
	if err := cs.SetMigrationParameters(ctx, map[string]any{"max-bandwidth": int64(1) << 40}); err != nil {
		t.Fatalf("migrate-set-parameters: %v", err)
	}
	if err := cd.MigrateIncoming(ctx, "fd:mig"); err != nil {
		t.Fatalf("migrate-incoming: %v", err)
	}
	if err := cs.Migrate(ctx, "fd:mig"); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	info, err := cs.WaitMigration(ctx)
	if err != nil {
		t.Fatalf("source WaitMigration: %+v, %v", info, err)
	}
	info.Raw = nil
	if info.Status != "completed" || info.TotalBytes < 64<<20 || info.TransferredBytes <= 0 || info.DirtySyncCount < 1 {
		t.Errorf("source info %+v: want completed, 64 MiB RAM, bytes sent, a dirty sync", info)
	}
	dinfo, err := cd.WaitMigration(ctx)
	if err != nil || dinfo.Status != "completed" {
		t.Fatalf("standby WaitMigration: %+v, %v", dinfo, err)
	}
	var statuses []string
	for done := false; !done; {
		select {
		case ev := <-migEvents:
			statuses = append(statuses, string(ev.Data))
			done = strings.Contains(string(ev.Data), `"completed"`)
		case <-ctx.Done():
			t.Fatalf("no MIGRATION completed event; saw %v", statuses)
		}
	}
	if st, err := cs.QueryStatus(ctx); err != nil || st.Status != "postmigrate" {
		t.Errorf("source status %+v, %v; want postmigrate", st, err)
	}
	if st, err := cd.QueryStatus(ctx); err != nil || st.Running {
		t.Errorf("standby status %+v, %v; want not running (source was paused)", st, err)
	}
	t.Logf("migrated in %v, %d bytes of RAM sent; events %v", info.TotalTime, info.TransferredBytes, statuses)
}

// TestQEMUMigrateToFDPolling migrates into a socketpair we read ourselves,
// twice: with MIGRATION events off (WaitMigration must poll), then, after
// cont, with events on, checking the stream both times.
func TestQEMUMigrateToFDPolling(t *testing.T) {
	p := startQEMU(t)
	c := p.dial(t)
	ctx := ctxT(t, 120*time.Second)
	for round, events := range []bool{false, true} {
		if err := c.SetMigrationCapabilities(ctx, map[string]bool{"events": events}); err != nil {
			t.Fatal(err)
		}
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		mine, theirs := os.NewFile(uintptr(fds[0]), "reader"), os.NewFile(uintptr(fds[1]), "qemu")
		stream := readMigrationStream(mine)
		name := fmt.Sprintf("mig%d", round)
		if err := c.GetFD(ctx, name, int(theirs.Fd())); err != nil {
			t.Fatal(err)
		}
		theirs.Close()
		if err := c.Migrate(ctx, "fd:"+name); err != nil {
			t.Fatal(err)
		}
		info, err := c.WaitMigration(ctx)
		if err != nil || info.Status != "completed" {
			t.Fatalf("round %d (events %v): %+v, %v", round, events, info, err)
		}
		b := <-stream
		mine.Close()
		checkMigrationStream(t, b)
		t.Logf("round %d (events %v): %d byte stream in %v", round, events, len(b), info.TotalTime)
		if err := c.Cont(ctx); err != nil {
			t.Fatalf("cont after migration: %v", err)
		}
		if err := c.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

func TestQEMUMigrationFailure(t *testing.T) {
	p := startQEMU(t)
	c := p.dial(t)
	ctx := ctxT(t, 60*time.Second)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "reader"), os.NewFile(uintptr(fds[1]), "qemu")
	if err := c.GetFD(ctx, "broken", int(theirs.Fd())); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	mine.Close() // nobody reads: QEMU's writes fail with EPIPE
	if err := c.Migrate(ctx, "fd:broken"); err != nil {
		t.Fatal(err)
	}
	info, err := c.WaitMigration(ctx)
	if !errors.Is(err, ErrMigrationFailed) || info.Status != "failed" {
		t.Fatalf("WaitMigration into a closed socket: %+v, %v; want ErrMigrationFailed", info, err)
	}
	t.Logf("error: %v", err)
}

func TestQEMUAddFD(t *testing.T) {
	p := startQEMU(t)
	c := p.dial(t)
	ctx := ctxT(t, 30*time.Second)
	var pfd [2]int
	if err := unix.Pipe2(pfd[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pfd[0])
	defer unix.Close(pfd[1])
	info, err := c.AddFD(ctx, -1, pfd[1], "ftctl-test")
	if err != nil {
		t.Fatalf("add-fd: %v", err)
	}
	if info.FD < 0 {
		t.Errorf("add-fd returned fd %d", info.FD)
	}
	sets, err := c.QueryFDSets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range sets {
		for _, f := range s.FDs {
			found = found || (s.ID == info.FDSet && f.FD == info.FD && f.Opaque == "ftctl-test")
		}
	}
	if !found {
		t.Fatalf("fd %+v not in query-fdsets %+v", info, sets)
	}
	// QEMU closes removed fds only while the VM runs (monitor_fdset_cleanup
	// checks runstate_is_running), so let this -S VM run for the removal.
	if err := c.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.RemoveFD(ctx, info.FDSet, info.FD); err != nil {
		t.Fatalf("remove-fd: %v", err)
	}
	sets, err = c.QueryFDSets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sets {
		for _, f := range s.FDs {
			if s.ID == info.FDSet && f.FD == info.FD {
				t.Errorf("fd %+v still listed after remove-fd", info)
			}
		}
	}
}

func TestQEMUQuit(t *testing.T) {
	p := startQEMU(t)
	c := p.dial(t)
	ctx := ctxT(t, 30*time.Second)
	shutdown, cancel := c.Subscribe("SHUTDOWN")
	defer cancel()
	if err := c.Quit(ctx); err != nil {
		t.Fatalf("quit: %v", err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("connection still open after quit")
	}
	if !errors.Is(c.Err(), ErrClosed) || errors.Is(c.Err(), ErrProtocol) {
		t.Errorf("Err after quit = %v, want plain ErrClosed", c.Err())
	}
	if ev, ok := <-shutdown; !ok || ev.Name != "SHUTDOWN" {
		t.Errorf("no SHUTDOWN event before the connection closed (got %+v, %v)", ev, ok)
	}
	select {
	case <-p.exited:
	case <-ctx.Done():
		t.Fatal("qemu did not exit after quit")
	}
	if !p.cmd.ProcessState.Success() {
		t.Errorf("qemu exit status %v", p.cmd.ProcessState)
	}
	if err := c.Stop(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("stop after quit: %v, want ErrClosed", err)
	}
}

// TestQEMUDialErrors checks that bad addresses fail clearly and quickly.
func TestDialErrors(t *testing.T) {
	ctx := ctxT(t, 10*time.Second)
	if _, err := Dial(ctx, "udp", "x"); err == nil || !strings.Contains(err.Error(), "unsupported network") {
		t.Errorf("Dial udp: %v", err)
	}
	missing := filepath.Join(t.TempDir(), "none.sock")
	if _, err := Dial(ctx, "unix", missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("Dial of a missing socket: %v", err)
	}
}
