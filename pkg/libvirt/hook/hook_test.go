package hook

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const taggedXML = `<domain type='qemu'>
  <name>web</name>
  <metadata>
    <ftctl:protection xmlns:ftctl='https://github.com/ftctl/ftctl/xmlns/libvirt/1' peer='host-b:7480'%s>
      <ftctl:qmp socket='/run/ftctl/vms/web/qmp.sock'/>
    </ftctl:protection>
  </metadata>
</domain>`

func tagged(policy string) []byte {
	p := ""
	if policy != "" {
		p = " policy='" + policy + "'"
	}
	return []byte(strings.Replace(taggedXML, "%s", p, 1))
}

func TestParseArgs(t *testing.T) {
	inv, err := ParseArgs([]string{"web", "started", "begin", "-"})
	if err != nil || inv != (Invocation{"web", "started", "begin", "-"}) {
		t.Fatalf("%+v %v", inv, err)
	}
	for _, bad := range [][]string{nil, {"web"}, {"web", "started", "begin"}, {"web", "started", "begin", "-", "x"}, {"", "started", "begin", "-"}, {"web", "", "begin", "-"}} {
		if _, err := ParseArgs(bad); !errors.Is(err, ErrUsage) {
			t.Errorf("%q: %v, want ErrUsage", bad, err)
		}
	}
}

func TestDecide(t *testing.T) {
	untagged := []byte("<domain type='qemu'><name>web</name></domain>")
	standby := []byte(strings.Replace(string(tagged("")), " peer='host-b:7480'", " role='standby'", 1))
	noPeer := []byte(strings.Replace(string(tagged("")), " peer='host-b:7480'", "", 1))
	cases := []struct {
		op   string
		xml  []byte
		want Action
	}{
		{"prepare", tagged(""), Action{Prepare, "web", ""}},
		{"prepare", tagged("manual"), Action{Prepare, "web", ""}},
		{"prepare", noPeer, Action{Prepare, "web", ""}},
		{"started", tagged(""), Action{Adopt, "web", "host-b:7480"}},
		{"started", tagged("auto"), Action{Adopt, "web", "host-b:7480"}},
		{"started", tagged("manual"), Action{Adopt, "web", ""}},
		{"started", noPeer, Action{Adopt, "web", ""}},
		{"stopped", tagged(""), Action{Stopped, "web", ""}},
		{"release", tagged(""), Action{Stopped, "web", ""}},
		{"stopped", tagged("manual"), Action{Stopped, "web", ""}},
		{"start", tagged(""), Action{}},
		{"migrate", tagged(""), Action{}},
		{"reconnect", tagged(""), Action{}},
		{"restore", tagged(""), Action{}},
		{"prepare", untagged, Action{}},
		{"started", untagged, Action{}},
		{"stopped", untagged, Action{}},
		// A standby belongs to the agent that defined it.
		{"prepare", standby, Action{}},
		{"started", standby, Action{}},
		{"stopped", standby, Action{}},
	}
	for _, c := range cases {
		got, why, err := Decide(Invocation{"web", c.op, "begin", "-"}, c.xml)
		if err != nil || got != c.want || why == "" {
			t.Errorf("%s %.60q: got %+v (%q, %v), want %+v", c.op, c.xml, got, why, err, c.want)
		}
	}
	// Operations that need nothing do not even read the XML.
	if _, _, err := Decide(Invocation{"web", "start", "begin", "-"}, []byte("junk")); err != nil {
		t.Errorf("start with junk XML: %v", err)
	}
	for name, x := range map[string][]byte{
		"junk":         []byte("junk"),
		"other name":   []byte(strings.Replace(string(tagged("")), "<name>web<", "<name>db<", 1)),
		"bad peer":     []byte(strings.Replace(string(tagged("")), "host-b:7480", "host-b;rm:1", 1)),
		"unknown role": []byte(strings.Replace(string(tagged("")), " peer='host-b:7480'", " role='tertiary'", 1)),
	} {
		if _, _, err := Decide(Invocation{"web", "started", "begin", "-"}, x); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestActionEncoding(t *testing.T) {
	for _, a := range []Action{{Adopt, "web", "[fd00::1]:7480"}, {Adopt, "web", ""}, {Stopped, "web", ""}} {
		got, err := DecodeAction(a.Encode())
		if err != nil || got != a {
			t.Fatalf("round trip of %+v: %+v %v", a, got, err)
		}
	}
	for _, bad := range []string{"", "{", `{"kind":"reboot","domain":"web"}`, `{"kind":"prepare","domain":"web"}`,
		`{"kind":"stopped"}`, `{"kind":"stopped","domain":"web","x":1}`, `{"kind":"stopped","domain":"web","peer":"a:1"}`,
		`{"kind":"adopt","domain":"web","peer":"a b:1"}`} {
		if _, err := DecodeAction(bad); !errors.Is(err, ErrUsage) {
			t.Errorf("%q: %v, want ErrUsage", bad, err)
		}
	}
}

// recAgent records calls and can fail or stall them.
type recAgent struct {
	mu    sync.Mutex
	calls []string
	err   error
	stall bool
}

func (r *recAgent) rec(s string) error {
	r.mu.Lock()
	r.calls = append(r.calls, s)
	r.mu.Unlock()
	return r.err
}

func (r *recAgent) PrepareDomain(ctx context.Context, d string, x []byte) error {
	err := r.rec(fmt.Sprintf("prepare %s %d", d, len(x)))
	if r.stall {
		<-ctx.Done()
		return ctx.Err()
	}
	return err
}

func (r *recAgent) AdoptDomain(ctx context.Context, d string, x []byte, p string) error {
	err := r.rec(fmt.Sprintf("adopt %s %d %s", d, len(x), p))
	if r.stall {
		<-ctx.Done()
		return ctx.Err()
	}
	return err
}

func (r *recAgent) DomainStopped(ctx context.Context, d string) error {
	return r.rec("stopped " + d)
}

func (r *recAgent) Calls() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.calls, ",")
}

func TestWork(t *testing.T) {
	log := filepath.Join(t.TempDir(), "log", "hook.log")
	h := Hook{Exe: "/bin/false", Log: log, Timeout: 50 * time.Millisecond}
	ctx := context.Background()
	a := &recAgent{}
	if err := h.Work(ctx, Action{Adopt, "web", "b:1"}.Encode(), []byte("<domain/>"), a); err != nil {
		t.Fatal(err)
	}
	if err := h.Work(ctx, Action{Adopt, "web", ""}.Encode(), []byte("<domain/>"), a); err != nil {
		t.Fatal(err)
	}
	if err := h.Work(ctx, Action{Stopped, "web", ""}.Encode(), nil, a); err != nil {
		t.Fatal(err)
	}
	if got := a.Calls(); got != "adopt web 9 b:1,adopt web 9 ,stopped web" {
		t.Errorf("calls %q", got)
	}
	if err := h.Work(ctx, Action{Adopt, "web", ""}.Encode(), nil, a); !errors.Is(err, ErrUsage) {
		t.Errorf("adopt without XML: %v", err)
	}
	a = &recAgent{err: errors.New("no agent")}
	if err := h.Work(ctx, Action{Stopped, "web", ""}.Encode(), nil, a); !errors.Is(err, ErrAgent) || !strings.Contains(err.Error(), "no agent") {
		t.Errorf("failing agent: %v", err)
	}
	a = &recAgent{stall: true}
	if err := h.Work(ctx, Action{Adopt, "web", "b:1"}.Encode(), []byte("<domain/>"), a); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("stalled agent: %v, want the timeout", err)
	}
	if err := h.Work(ctx, "nonsense", nil, a); !errors.Is(err, ErrUsage) {
		t.Errorf("bad action: %v", err)
	}
	b, _ := os.ReadFile(log)
	for _, want := range []string{"adopt web peer b:1: done", "stopped web: done", "no agent", "deadline exceeded", "worker action"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("log lacks %q:\n%s", want, b)
		}
	}
}

// TestHandlePrepare: the prepare call is made by the hook itself, with
// the XML libvirt sent, within PrepareTimeout; its failure is an
// ErrPrepare whose one-line message names the agent socket and the fix.
func TestHandlePrepare(t *testing.T) {
	dir := t.TempDir()
	h := Hook{Exe: "/bin/false", AgentSocket: "/x/agent.sock", Log: filepath.Join(dir, "hook.log"), PrepareTimeout: 100 * time.Millisecond}
	args := []string{"web", "prepare", "begin", "-"}
	ctx := context.Background()
	a := &recAgent{}
	act, err := h.Handle(ctx, args, strings.NewReader(string(tagged("manual"))), a)
	if err != nil || act.Kind != Prepare {
		t.Fatalf("%+v %v", act, err)
	}
	if got, want := a.Calls(), fmt.Sprintf("prepare web %d", len(tagged("manual"))); got != want {
		t.Errorf("calls %q, want %q", got, want)
	}
	a = &recAgent{err: errors.New("dial unix /x/agent.sock: connect: no such file\nor directory")}
	_, err = h.Handle(ctx, args, strings.NewReader(string(tagged(""))), a)
	if !errors.Is(err, ErrPrepare) {
		t.Fatalf("failing agent: %v, want ErrPrepare", err)
	}
	for _, want := range []string{"web", "/x/agent.sock", "systemctl start ftctl-agent", "no such file or directory"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("message is not one line: %q", err)
	}
	a = &recAgent{stall: true}
	if _, err = h.Handle(ctx, args, strings.NewReader(string(tagged(""))), a); !errors.Is(err, ErrPrepare) || !strings.Contains(err.Error(), "deadline exceeded") {
		t.Errorf("stalled agent: %v", err)
	}
	// Domains that are not ftctl's, or are a standby, reach no agent.
	a = &recAgent{err: errors.New("must not be called")}
	for _, x := range []string{"<domain><name>web</name></domain>", strings.Replace(string(tagged("")), "peer=", "role='standby' x=", 1), "junk"} {
		if act, err := h.Handle(ctx, args, strings.NewReader(x), a); errors.Is(err, ErrPrepare) || act.Kind != None {
			t.Errorf("%.40q: %+v %v", x, act, err)
		}
	}
	if a.Calls() != "" {
		t.Errorf("calls %q", a.Calls())
	}
}

// TestHandleDetachesWorker: adopt and stopped run in a detached worker
// that gets the action, the hook's settings, and (for adopt) the domain
// XML on stdin; Handle does not wait for it.
func TestHandleDetachesWorker(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "hook.log")
	out := filepath.Join(dir, "argv")
	// A stand-in worker that records its arguments and stdin.
	exe := filepath.Join(dir, "fake-ftctl")
	script := "#!/bin/sh\nsleep 0.2\n{ echo \"$@\"; cat; } > " + out + ".tmp && mv " + out + ".tmp " + out + "\n"
	if err := os.WriteFile(exe, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	h := Hook{Exe: exe, AgentSocket: "/x/agent.sock", Log: log, Timeout: time.Second}
	a := &recAgent{err: errors.New("the hook itself must not call the agent")}
	run := func(op string, wantKind Kind, wantStdin string) {
		t.Helper()
		os.Remove(out)
		act, err := h.Handle(context.Background(), []string{"web", op, "begin", "-"}, strings.NewReader(string(tagged(""))), a)
		if err != nil || act.Kind != wantKind {
			t.Fatalf("%s: %+v %v", op, act, err)
		}
		if _, err := os.Stat(out); err == nil {
			t.Error("Handle waited for the worker")
		}
		deadline := time.Now().Add(20 * time.Second)
		var got []byte
		for time.Now().Before(deadline) {
			if got, err = os.ReadFile(out); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		want := "hook --agent /x/agent.sock --log " + log + " --timeout 1s --prepare-timeout 10s --worker " + act.Encode() + "\n" + wantStdin
		if string(got) != want {
			t.Errorf("worker argv and stdin\n got %q\nwant %q", got, want)
		}
	}
	run("started", Adopt, string(tagged("")))
	run("stopped", Stopped, "")
	if a.Calls() != "" {
		t.Errorf("hook called the agent: %s", a.Calls())
	}
	// No temporary file is left behind.
	if m, _ := filepath.Glob(filepath.Join(os.TempDir(), "ftctl-hook-*")); len(m) > 0 {
		t.Errorf("leftover input files: %v", m)
	}
	// Untagged and irrelevant invocations start nothing and log errors.
	if act, err := h.Handle(context.Background(), []string{"web", "started", "begin", "-"}, strings.NewReader("<domain><name>web</name></domain>"), a); err != nil || act.Kind != None {
		t.Errorf("untagged: %+v %v", act, err)
	}
	if _, err := h.Handle(context.Background(), []string{"web"}, strings.NewReader(""), a); !errors.Is(err, ErrUsage) {
		t.Errorf("bad args: %v", err)
	}
	b, _ := os.ReadFile(log)
	if !strings.Contains(string(b), "web started begin -: adopt") || !strings.Contains(string(b), "bad invocation") {
		t.Errorf("log:\n%s", b)
	}
}

func TestInstall(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "hooks")
	h := Hook{Exe: "/usr/local/bin/ft'ctl", AgentSocket: "/run/ftctl/agent.sock", Log: "/var/log/ftctl/hook.log", Timeout: time.Minute}
	script, err := h.Script()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(script, `exec '/usr/local/bin/ft'\''ctl' 'hook' '--agent' '/run/ftctl/agent.sock'`) || !strings.HasSuffix(script, "-- \"$@\"\n") {
		t.Errorf("script:\n%s", script)
	}
	path, changed, err := Install(dir, script)
	if err != nil || !changed || path != filepath.Join(dir, "qemu") {
		t.Fatalf("first install: %s %v %v", path, changed, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("installed file: %v %v", fi, err)
	}
	if _, changed, err = Install(dir, script); err != nil || changed {
		t.Errorf("second install: changed %v, %v", changed, err)
	}
	h.Timeout = time.Hour
	script2, _ := h.Script()
	if _, changed, err = Install(dir, script2); err != nil || !changed {
		t.Errorf("updating our hook: changed %v, %v", changed, err)
	}
	if b, _ := os.ReadFile(path); string(b) != script2 {
		t.Error("hook not updated")
	}
	foreign := "#!/bin/sh\n/usr/local/bin/other-tool \"$@\"\n"
	if err := os.WriteFile(path, []byte(foreign), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, _, err = Install(dir, script); !errors.Is(err, ErrForeignHook) {
		t.Errorf("foreign hook: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != foreign {
		t.Error("foreign hook clobbered")
	}
	os.Remove(path)
	if err := os.Symlink("/nonexistent", path); err != nil {
		t.Fatal(err)
	}
	if _, _, err = Install(dir, script); !errors.Is(err, ErrForeignHook) {
		t.Errorf("dangling symlink: %v", err)
	}
	if _, _, err = Install(dir, "#!/bin/sh\n"); !errors.Is(err, ErrUsage) {
		t.Errorf("script without marker: %v", err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("leftover files in hooks dir: %v", ents)
	}
}
