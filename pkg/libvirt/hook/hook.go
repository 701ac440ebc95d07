// Package hook owns `ftctl hook`, the program libvirt runs as
// /etc/libvirt/hooks/qemu, and installing that hook script. For domains
// whose XML carries ftctl's protection metadata (and that are not a
// standby an agent made, role='standby'), it tells the local agent about
// each step of the domain's life:
//
//   - prepare begin (QEMU is about to start): PrepareDomain, synchronously,
//     so the agent opens the sockets the prepared domain's QEMU connects
//     to (NBD disks, NIC streams, the RAM file's directory). QEMU cannot
//     start without them, so when the call fails the hook exits non-zero
//     with a one-line message, which libvirt shows as the reason the
//     start failed. This holds whatever the policy.
//   - started begin (QEMU runs): AdoptDomain in a detached worker, with the
//     metadata's peer when the policy is auto (the agent starts pairing)
//     and no peer when it is manual.
//   - stopped end, release end (QEMU is gone, libvirt cleaned up):
//     DomainStopped in a detached worker; the agent tells a clean stop
//     from a crash (a crash must not unpair: the peer is promoting).
//
// libvirt waits for a hook to exit, holding the domain's job, so a hook
// that called back into libvirt, or waited for an agent that does, would
// stall or deadlock the very start it reacts to. The prepare call is
// safe to make in the hook because the agent only opens sockets for it
// (no libvirt call, no QEMU), and it is bounded (DefaultPrepareTimeout).
// Adopt and stop may take long (pairing, unpairing the peer), so the hook
// only starts a detached worker for them (its own session, stdio on a
// log file, the domain XML on an unlinked temporary file as stdin) and
// exits 0 at once, whatever happens to the worker.
package hook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
)

// Sentinel errors.
var (
	// ErrUsage: libvirt (or a person) called the hook with arguments it
	// does not understand.
	ErrUsage = errors.New("hook: bad invocation")
	// ErrForeignHook: a hook script that ftctl did not install is in the
	// way; Install refuses to replace it.
	ErrForeignHook = errors.New("hook: another program's hook is installed")
	// ErrAgent: the agent call failed.
	ErrAgent = errors.New("hook: agent call failed")
	// ErrPrepare: the agent did not prepare the domain's devices, so
	// QEMU cannot start; the hook must fail libvirt's start with the
	// error's message.
	ErrPrepare = errors.New("ftctl agent did not prepare the domain")
)

// Defaults.
const (
	DefaultDir     = "/etc/libvirt/hooks"
	DefaultLog     = "/var/log/ftctl/hook.log"
	DefaultTimeout = 2 * time.Minute
	// DefaultPrepareTimeout bounds the synchronous prepare call, which
	// libvirt's start waits for: the agent only opens sockets for it.
	DefaultPrepareTimeout = 10 * time.Second
	// maxXML bounds what is read from stdin: libvirt's domain XML is a few
	// KiB; anything far bigger is not a domain definition.
	maxXML = 16 << 20
)

// Invocation is one call of the hook by libvirt:
// /etc/libvirt/hooks/qemu DOMAIN OPERATION SUB-OPERATION EXTRA.
type Invocation struct {
	Domain, Op, SubOp, Extra string
}

// ParseArgs reads libvirt's arguments. libvirt always passes four; the
// last may be "-".
func ParseArgs(args []string) (Invocation, error) {
	if len(args) != 4 {
		return Invocation{}, fmt.Errorf("%w: want DOMAIN OPERATION SUB-OPERATION EXTRA (4 arguments), got %d: %q", ErrUsage, len(args), args)
	}
	inv := Invocation{Domain: args[0], Op: args[1], SubOp: args[2], Extra: args[3]}
	if inv.Domain == "" || inv.Op == "" {
		return Invocation{}, fmt.Errorf("%w: empty domain or operation in %q", ErrUsage, args)
	}
	return inv, nil
}

func (i Invocation) String() string {
	return fmt.Sprintf("%s %s %s %s", i.Domain, i.Op, i.SubOp, i.Extra)
}

// Kind is what the hook asks of the agent.
type Kind string

// Kinds.
const (
	None Kind = ""
	// Prepare: PrepareDomain, made by the hook itself before QEMU starts.
	Prepare Kind = "prepare"
	// Adopt: AdoptDomain, made by a detached worker once QEMU runs.
	Adopt Kind = "adopt"
	// Stopped: DomainStopped, made by a detached worker once QEMU is gone.
	Stopped Kind = "stopped"
)

// Action is the agent call a hook invocation leads to.
type Action struct {
	Kind   Kind   `json:"kind"`
	Domain string `json:"domain"`
	// Peer is the peer an Adopt pairs with; "" adopts without pairing.
	Peer string `json:"peer,omitempty"`
}

// operation returns what an operation asks of the agent for an ftctl
// domain; the rest (start, migrate, restore, reconnect, attach) need
// nothing.
func operation(op string) Kind {
	switch op {
	case "prepare":
		// Before libvirt builds QEMU's command line: the last moment to
		// have the sockets QEMU connects to.
		return Prepare
	case "started":
		// QEMU runs and libvirt has resumed its CPUs (or left them paused
		// for --paused); the agent takes it once libvirt's job ends.
		return Adopt
	case "stopped", "release":
		// stopped: QEMU is gone. release: libvirt has cleaned up, also
		// after a start that failed before "started". DomainStopped is
		// idempotent (an unknown domain is fine), so both ask for it.
		return Stopped
	}
	return None
}

// Decide says what the hook does for an invocation given the domain XML
// libvirt passed on stdin. Domains without ftctl metadata, and standbys
// an agent defined (role='standby'), get None; a prepared domain gets
// its call whatever the policy, the policy deciding only whether Adopt
// pairs. why explains the decision for the log.
func Decide(inv Invocation, domainXML []byte) (act Action, why string, err error) {
	k := operation(inv.Op)
	if k == None {
		return Action{}, "operation " + inv.Op + " needs nothing", nil
	}
	d, err := domxml.ParseDomain(domainXML)
	if err != nil {
		return Action{}, "", fmt.Errorf("hook: domain XML on stdin: %w", err)
	}
	if d.Name != inv.Domain {
		return Action{}, "", fmt.Errorf("%w: XML on stdin is domain %q, arguments name %q", ErrUsage, d.Name, inv.Domain)
	}
	var prot *domxml.Protection
	if d.Metadata != nil {
		prot = d.Metadata.Protection
	}
	switch {
	case prot == nil:
		return Action{}, "no ftctl metadata", nil
	case prot.Role == domxml.RoleStandby:
		return Action{}, "a standby, owned by the agent that defined it", nil
	case prot.Role != "":
		return Action{}, "", fmt.Errorf("hook: ftctl metadata of %s: unknown role %q", inv.Domain, prot.Role)
	}
	act = Action{Kind: k, Domain: inv.Domain}
	if k != Adopt {
		return act, "ftctl domain", nil
	}
	pol := domxml.EffectivePolicy(prot)
	switch {
	case pol != domxml.PolicyAuto:
		return act, "policy " + string(pol) + ": adopt without pairing", nil
	case prot.Peer == "":
		return act, "policy auto but no peer: adopt without pairing", nil
	}
	if err := domxml.ValidPeer(prot.Peer); err != nil {
		return Action{}, "", fmt.Errorf("hook: ftctl metadata of %s: %w", inv.Domain, err)
	}
	act.Peer = prot.Peer
	return act, "policy auto, peer " + prot.Peer, nil
}

// Encode renders the action as the worker's argument.
func (a Action) Encode() string {
	b, _ := json.Marshal(a)
	return string(b)
}

// DecodeAction reads a worker's argument: an Adopt or a Stopped.
func DecodeAction(s string) (Action, error) {
	var a Action
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		return Action{}, fmt.Errorf("%w: worker action %.80q: %v", ErrUsage, s, err)
	}
	if (a.Kind != Adopt && a.Kind != Stopped) || a.Domain == "" || (a.Kind == Stopped && a.Peer != "") {
		return Action{}, fmt.Errorf("%w: worker action %.80q is not an adopt or stopped call", ErrUsage, s)
	}
	if a.Peer != "" {
		if err := domxml.ValidPeer(a.Peer); err != nil {
			return Action{}, fmt.Errorf("%w: worker action: %w", ErrUsage, err)
		}
	}
	return a, nil
}

// Agent is the part of the local agent's control API the hook uses
// (pkg/agent's Client, through AgentClient).
type Agent interface {
	// PrepareDomain opens the devices the domain's metadata names.
	PrepareDomain(ctx context.Context, domain string, domainXML []byte) error
	// AdoptDomain takes the running domain as a primary VM, pairing it
	// with peer unless peer is "".
	AdoptDomain(ctx context.Context, domain string, domainXML []byte, peer string) error
	// DomainStopped says libvirt has stopped or released the domain.
	DomainStopped(ctx context.Context, domain string) error
}

// Hook is how `ftctl hook` runs: the command that starts ftctl, the
// agent's control socket, the log file, and the agent call's timeout.
// The same settings are written into the hook script and passed on to the
// worker.
type Hook struct {
	// Exe is the ftctl binary. Default: this process's executable.
	Exe         string
	AgentSocket string
	Log         string        // default DefaultLog
	Timeout     time.Duration // worker's agent call; default DefaultTimeout
	// PrepareTimeout bounds the prepare call libvirt's start waits for;
	// default DefaultPrepareTimeout.
	PrepareTimeout time.Duration
}

func (h Hook) withDefaults() (Hook, error) {
	if h.Exe == "" {
		exe, err := os.Executable()
		if err != nil {
			return h, fmt.Errorf("hook: find ftctl's executable: %w", err)
		}
		h.Exe = exe
	}
	if h.Log == "" {
		h.Log = DefaultLog
	}
	if h.Timeout <= 0 {
		h.Timeout = DefaultTimeout
	}
	if h.PrepareTimeout <= 0 {
		h.PrepareTimeout = DefaultPrepareTimeout
	}
	return h, nil
}

// flags are the options every `ftctl hook` command line carries.
func (h Hook) flags() []string {
	f := []string{"hook"}
	if h.AgentSocket != "" {
		f = append(f, "--agent", h.AgentSocket)
	}
	return append(f, "--log", h.Log, "--timeout", h.Timeout.String(), "--prepare-timeout", h.PrepareTimeout.String())
}

// WorkerArgv is the detached worker's command line:
// EXE hook [--agent S] --log L --timeout T --worker ACTION.
func (h Hook) WorkerArgv(a Action) ([]string, error) {
	h, err := h.withDefaults()
	if err != nil {
		return nil, err
	}
	return append(append([]string{h.Exe}, h.flags()...), "--worker", a.Encode()), nil
}

// Handle is the hook proper: it parses libvirt's arguments, reads the
// domain XML from stdin (all of it, so libvirt's writer never sees a
// broken pipe), decides, and then either makes the prepare call itself
// (bounded by PrepareTimeout) or starts the detached worker for an adopt
// or stopped call and returns without waiting for it. It appends one
// line per decision about an ftctl domain, and every error, to the log.
// An error wrapping ErrPrepare means QEMU cannot start: the caller must
// fail the hook with that message; any other error must not fail it.
func (h Hook) Handle(ctx context.Context, args []string, stdin io.Reader, a Agent) (Action, error) {
	h, err := h.withDefaults()
	if err != nil {
		return Action{}, err
	}
	xml, rerr := io.ReadAll(io.LimitReader(stdin, maxXML+1))
	_, _ = io.Copy(io.Discard, stdin)
	act, err := h.handle(ctx, args, xml, rerr, a)
	if err != nil {
		h.logf("%s: %v", strings.Join(args, " "), err)
	}
	return act, err
}

func (h Hook) handle(ctx context.Context, args []string, xml []byte, rerr error, a Agent) (Action, error) {
	inv, err := ParseArgs(args)
	if err != nil {
		return Action{}, err
	}
	if operation(inv.Op) == None {
		return Action{}, nil
	}
	if rerr != nil {
		return Action{}, fmt.Errorf("hook: read domain XML: %w", rerr)
	}
	if len(xml) > maxXML {
		return Action{}, fmt.Errorf("%w: more than %d bytes on stdin", ErrUsage, maxXML)
	}
	act, why, err := Decide(inv, xml)
	if err != nil || act.Kind == None {
		if err == nil && !strings.HasPrefix(why, "no ftctl") {
			h.logf("%s: nothing to do: %s", inv, why)
		}
		return act, err
	}
	if act.Kind == Prepare {
		return act, h.prepare(ctx, inv, xml, a)
	}
	argv, err := h.WorkerArgv(act)
	if err != nil {
		return act, err
	}
	var input []byte
	if act.Kind == Adopt {
		input = xml
	}
	pid, err := Detach(argv, h.Log, input)
	if err != nil {
		return act, err
	}
	h.logf("%s: %s (%s): worker pid %d", inv, act.Kind, why, pid)
	return act, nil
}

// prepare makes the synchronous prepare call. Its error is one line, for
// libvirt to show: what failed, the agent's socket, and what to do.
func (h Hook) prepare(ctx context.Context, inv Invocation, xml []byte, a Agent) error {
	ctx, cancel := context.WithTimeout(ctx, h.PrepareTimeout)
	defer cancel()
	start := time.Now()
	if err := a.PrepareDomain(ctx, inv.Domain, xml); err != nil {
		sock := h.AgentSocket
		if sock == "" {
			sock = "the default socket"
		}
		msg := strings.Join(strings.Fields(err.Error()), " ")
		return fmt.Errorf("%w %s (agent %s: %s); QEMU needs the agent's sockets: start the agent (systemctl start ftctl-agent) and start the domain again",
			ErrPrepare, inv.Domain, sock, msg)
	}
	h.logf("%s: prepare: done in %v", inv, time.Since(start).Round(time.Millisecond))
	return nil
}

// Work is the detached worker: it makes the agent call of the action
// encoded by WorkerArgv (for Adopt, with the domain XML the hook handed
// it), bounded by the hook's timeout, and logs the outcome.
func (h Hook) Work(ctx context.Context, encoded string, domainXML []byte, a Agent) error {
	h, err := h.withDefaults()
	if err != nil {
		return err
	}
	act, err := DecodeAction(encoded)
	if err == nil && act.Kind == Adopt && len(domainXML) == 0 {
		err = fmt.Errorf("%w: adopt %s without the domain XML on stdin", ErrUsage, act.Domain)
	}
	if err != nil {
		h.logf("worker: %v", err)
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, h.Timeout)
	defer cancel()
	start := time.Now()
	switch act.Kind {
	case Adopt:
		err = a.AdoptDomain(ctx, act.Domain, domainXML, act.Peer)
	case Stopped:
		err = a.DomainStopped(ctx, act.Domain)
	}
	what := string(act.Kind) + " " + act.Domain
	if act.Peer != "" {
		what += " peer " + act.Peer
	}
	if err != nil {
		err = fmt.Errorf("%w: %s: %w", ErrAgent, what, err)
		h.logf("worker: %v (after %v)", err, time.Since(start).Round(time.Millisecond))
		return err
	}
	h.logf("worker: %s: done in %v", what, time.Since(start).Round(time.Millisecond))
	return nil
}

// logf appends a line to the log, best effort: the hook has nowhere else
// to report (libvirt shows a hook's output only when it fails, which
// this hook does only when the prepare call fails).
func (h Hook) logf(format string, args ...any) {
	f, err := openLog(h.Log)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s ftctl hook[%d]: %s\n", time.Now().Format(time.RFC3339Nano), os.Getpid(), fmt.Sprintf(format, args...))
}

func openLog(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
}

// Detach starts argv in a new session with stdout and stderr appended to
// logPath and input as its stdin, and does not wait for it. The caller
// may exit at once: the worker is re-parented to init, holds none of the
// caller's pipes (libvirt waits for EOF on the hook's stdout and stderr,
// so a child keeping them would block libvirt as surely as the hook
// itself), and as a session leader without a terminal no hang-up reaches
// it. input goes in a temporary file unlinked before the worker starts,
// so neither a pipe the hook would have to feed nor a file the worker
// might leave behind exists.
func Detach(argv []string, logPath string, input []byte) (pid int, err error) {
	if len(argv) == 0 {
		return 0, fmt.Errorf("%w: empty worker command", ErrUsage)
	}
	logf, err := openLog(logPath)
	if err != nil {
		return 0, fmt.Errorf("hook: worker log: %w", err)
	}
	defer logf.Close()
	in, err := inputFile(input)
	if err != nil {
		return 0, fmt.Errorf("hook: worker input: %w", err)
	}
	defer in.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = in, logf, logf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("hook: start worker: %w", err)
	}
	pid = cmd.Process.Pid
	// Reap it if this process lives long enough to see it end (tests);
	// otherwise init does.
	go func() { _ = cmd.Wait() }()
	return pid, nil
}

// inputFile returns /dev/null for no input, else an unlinked temporary
// file holding input, positioned at its start.
func inputFile(input []byte) (*os.File, error) {
	if len(input) == 0 {
		return os.Open(os.DevNull)
	}
	f, err := os.CreateTemp("", "ftctl-hook-*.xml")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	if _, err := f.Write(input); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// marker identifies a hook script ftctl installed.
const marker = "# ftctl-hook: installed by `ftctl libvirt install-hook`"

// Script is the hook script for /etc/libvirt/hooks/qemu: it runs
// `EXE hook FLAGS -- DOMAIN OPERATION SUB-OPERATION EXTRA` with libvirt's
// stdin.
func (h Hook) Script() (string, error) {
	h, err := h.withDefaults()
	if err != nil {
		return "", err
	}
	words := append([]string{h.Exe}, h.flags()...)
	for i, w := range words {
		words[i] = shellQuote(w)
	}
	return "#!/bin/sh\n" + marker + "\n" +
		"# libvirt runs it as: qemu DOMAIN OPERATION SUB-OPERATION EXTRA, domain XML on stdin.\n" +
		"# It waits only for the agent's prepare call (bounded); the other agent calls\n" +
		"# happen in a detached worker (see the log).\n" +
		"exec " + strings.Join(words, " ") + " -- \"$@\"\n", nil
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Install writes the hook script as dir/qemu (mode 0755). An existing
// script ftctl installed is replaced when it differs; any other file
// there is left alone and ErrForeignHook returned. changed says whether
// the file was written. libvirtd looks for hook scripts when it starts,
// so a newly installed hook takes effect at libvirtd's next restart.
func Install(dir, script string) (path string, changed bool, err error) {
	if !strings.Contains(script, marker) {
		return "", false, fmt.Errorf("%w: script lacks ftctl's marker line", ErrUsage)
	}
	path = filepath.Join(dir, "qemu")
	old, err := os.ReadFile(path)
	switch {
	case err == nil:
		if fi, lerr := os.Lstat(path); lerr != nil || !fi.Mode().IsRegular() || !bytes.Contains(old, []byte(marker)) {
			return path, false, fmt.Errorf("%w: %s (move it away, or chain it from a script of your own)", ErrForeignHook, path)
		}
		if string(old) == script {
			return path, false, nil
		}
	case errors.Is(err, os.ErrNotExist):
		if fi, lerr := os.Lstat(path); lerr == nil {
			return path, false, fmt.Errorf("%w: %s is a %v", ErrForeignHook, path, fi.Mode().Type())
		}
	default:
		return path, false, fmt.Errorf("hook: read %s: %w", path, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return path, false, fmt.Errorf("hook: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".qemu.ftctl-*")
	if err != nil {
		return path, false, fmt.Errorf("hook: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.WriteString(script)
	if err == nil {
		err = tmp.Chmod(0o755)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return path, false, fmt.Errorf("hook: write %s: %w", path, err)
	}
	return path, true, nil
}
