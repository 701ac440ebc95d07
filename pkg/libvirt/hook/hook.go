// Package hook owns `ftctl hook`, the program libvirt runs as
// /etc/libvirt/hooks/qemu: for domains whose XML carries ftctl's
// protection metadata with a peer, it asks the local agent to pair the
// domain when libvirt has started it and to unpair it when libvirt has
// stopped or released it. It also owns installing that hook script.
//
// libvirt waits for a hook to exit, holding the domain's job, so a hook
// that called back into libvirt, or waited for an agent that does, would
// stall or deadlock the very start it reacts to. Handle therefore only
// reads the XML libvirt sends on stdin, decides, and starts a detached
// worker (its own session, stdio on a log file) that makes the agent call
// under a timeout; the hook itself exits at once, with status 0 whatever
// happened, because a failing hook makes libvirt fail the domain's start.
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
)

// Defaults.
const (
	DefaultDir     = "/etc/libvirt/hooks"
	DefaultLog     = "/var/log/ftctl/hook.log"
	DefaultTimeout = 2 * time.Minute
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
	None   Kind = ""
	Pair   Kind = "pair"
	Unpair Kind = "unpair"
)

// Action is the agent call a hook invocation leads to.
type Action struct {
	Kind   Kind   `json:"kind"`
	Domain string `json:"domain"`
	Peer   string `json:"peer,omitempty"`
}

// operation returns what an operation asks for once the domain is
// protected by policy auto; the rest (prepare, start, migrate, restore,
// reconnect, attach) need nothing.
func operation(op string) Kind {
	switch op {
	case "started":
		// QEMU runs and libvirt has resumed its CPUs (or left them paused
		// for --paused); the agent can pair it as soon as libvirt's start
		// job ends.
		return Pair
	case "stopped", "release":
		// stopped: QEMU is gone. release: libvirt has cleaned up, also
		// after a start that failed before "started". Unpair is
		// idempotent for the agent's purposes, so both ask for it.
		return Unpair
	}
	return None
}

// Decide says what the hook does for an invocation given the domain XML
// libvirt passed on stdin. Domains without ftctl metadata, with no peer,
// or with policy manual get None. why explains the decision for the log.
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
	case domxml.EffectivePolicy(prot) != domxml.PolicyAuto:
		return Action{}, "policy " + string(domxml.EffectivePolicy(prot)), nil
	case prot.Peer == "":
		return Action{}, "policy auto but no peer", nil
	}
	if err := domxml.ValidPeer(prot.Peer); err != nil {
		return Action{}, "", fmt.Errorf("hook: ftctl metadata of %s: %w", inv.Domain, err)
	}
	act = Action{Kind: k, Domain: inv.Domain}
	if k == Pair {
		act.Peer = prot.Peer
	}
	return act, "policy auto, peer " + prot.Peer, nil
}

// Encode renders the action as the worker's argument.
func (a Action) Encode() string {
	b, _ := json.Marshal(a)
	return string(b)
}

// DecodeAction reads a worker's argument.
func DecodeAction(s string) (Action, error) {
	var a Action
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		return Action{}, fmt.Errorf("%w: worker action %.80q: %v", ErrUsage, s, err)
	}
	if (a.Kind != Pair && a.Kind != Unpair) || a.Domain == "" || (a.Kind == Pair && a.Peer == "") {
		return Action{}, fmt.Errorf("%w: worker action %.80q is incomplete", ErrUsage, s)
	}
	return a, nil
}

// Agent is the part of the local agent's control API the hook uses.
type Agent interface {
	Pair(ctx context.Context, domain, peer string) error
	Unpair(ctx context.Context, domain string) error
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
	Timeout     time.Duration // default DefaultTimeout
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
	return h, nil
}

// flags are the options every `ftctl hook` command line carries.
func (h Hook) flags() []string {
	f := []string{"hook"}
	if h.AgentSocket != "" {
		f = append(f, "--agent", h.AgentSocket)
	}
	return append(f, "--log", h.Log, "--timeout", h.Timeout.String())
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
// broken pipe), decides, and for an agent call starts the detached worker
// and returns without waiting for it. It appends one line per decision
// about an ftctl domain, and every error, to the log.
func (h Hook) Handle(args []string, stdin io.Reader) (Action, error) {
	h, err := h.withDefaults()
	if err != nil {
		return Action{}, err
	}
	xml, rerr := io.ReadAll(io.LimitReader(stdin, maxXML+1))
	_, _ = io.Copy(io.Discard, stdin)
	act, err := h.handle(args, xml, rerr)
	if err != nil {
		h.logf("%s: %v", strings.Join(args, " "), err)
	}
	return act, err
}

func (h Hook) handle(args []string, xml []byte, rerr error) (Action, error) {
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
	argv, err := h.WorkerArgv(act)
	if err != nil {
		return act, err
	}
	pid, err := Detach(argv, h.Log)
	if err != nil {
		return act, err
	}
	h.logf("%s: %s (%s): worker pid %d", inv, act.Kind, why, pid)
	return act, nil
}

// Work is the detached worker: it makes the agent call of the action
// encoded by WorkerArgv, bounded by the hook's timeout, and logs the
// outcome.
func (h Hook) Work(ctx context.Context, encoded string, a Agent) error {
	h, err := h.withDefaults()
	if err != nil {
		return err
	}
	act, err := DecodeAction(encoded)
	if err != nil {
		h.logf("worker: %v", err)
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, h.Timeout)
	defer cancel()
	start := time.Now()
	switch act.Kind {
	case Pair:
		err = a.Pair(ctx, act.Domain, act.Peer)
	case Unpair:
		err = a.Unpair(ctx, act.Domain)
	}
	if err != nil {
		err = fmt.Errorf("%w: %s %s: %w", ErrAgent, act.Kind, act.Domain, err)
		h.logf("worker: %v (after %v)", err, time.Since(start).Round(time.Millisecond))
		return err
	}
	h.logf("worker: %s %s: done in %v", act.Kind, act.Domain, time.Since(start).Round(time.Millisecond))
	return nil
}

// logf appends a line to the log, best effort: the hook has nowhere else
// to report (libvirt shows a hook's output only when it fails, and this
// hook never fails).
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

// Detach starts argv in a new session with stdin on /dev/null and stdout
// and stderr appended to logPath, and does not wait for it. The caller
// may exit at once: the worker is re-parented to init, holds none of the
// caller's pipes (libvirt waits for EOF on the hook's stdout and stderr,
// so a child keeping them would block libvirt as surely as the hook
// itself), and as a session leader without a terminal no hang-up reaches
// it.
func Detach(argv []string, logPath string) (pid int, err error) {
	if len(argv) == 0 {
		return 0, fmt.Errorf("%w: empty worker command", ErrUsage)
	}
	logf, err := openLog(logPath)
	if err != nil {
		return 0, fmt.Errorf("hook: worker log: %w", err)
	}
	defer logf.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		return 0, err
	}
	defer null.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, logf, logf
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
		"# It returns at once; agent calls happen in a detached worker (see the log).\n" +
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
