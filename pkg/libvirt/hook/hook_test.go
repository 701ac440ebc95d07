package hook

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
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
	cases := []struct {
		op   string
		xml  []byte
		want Action
	}{
		{"started", tagged(""), Action{Pair, "web", "host-b:7480"}},
		{"started", tagged("auto"), Action{Pair, "web", "host-b:7480"}},
		{"stopped", tagged(""), Action{Unpair, "web", ""}},
		{"release", tagged(""), Action{Unpair, "web", ""}},
		{"prepare", tagged(""), Action{}},
		{"start", tagged(""), Action{}},
		{"migrate", tagged(""), Action{}},
		{"reconnect", tagged(""), Action{}},
		{"started", tagged("manual"), Action{}},
		{"stopped", tagged("manual"), Action{}},
		{"started", untagged, Action{}},
		{"started", []byte(strings.Replace(string(tagged("")), " peer='host-b:7480'", "", 1)), Action{}},
	}
	for _, c := range cases {
		got, why, err := Decide(Invocation{"web", c.op, "begin", "-"}, c.xml)
		if err != nil || got != c.want || why == "" {
			t.Errorf("%s: got %+v (%q, %v), want %+v", c.op, got, why, err, c.want)
		}
	}
	// Operations that need nothing do not even read the XML.
	if _, _, err := Decide(Invocation{"web", "prepare", "begin", "-"}, []byte("junk")); err != nil {
		t.Errorf("prepare with junk XML: %v", err)
	}
	for name, x := range map[string][]byte{
		"junk":       []byte("junk"),
		"other name": []byte(strings.Replace(string(tagged("")), "<name>web<", "<name>db<", 1)),
		"bad peer":   []byte(strings.Replace(string(tagged("")), "host-b:7480", "host-b;rm:1", 1)),
	} {
		if _, _, err := Decide(Invocation{"web", "started", "begin", "-"}, x); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestActionEncoding(t *testing.T) {
	a := Action{Pair, "web", "[fd00::1]:7480"}
	got, err := DecodeAction(a.Encode())
	if err != nil || got != a {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for _, bad := range []string{"", "{", `{"kind":"reboot","domain":"web"}`, `{"kind":"pair","domain":"web"}`,
		`{"kind":"unpair"}`, `{"kind":"unpair","domain":"web","x":1}`} {
		if _, err := DecodeAction(bad); !errors.Is(err, ErrUsage) {
			t.Errorf("%q: %v, want ErrUsage", bad, err)
		}
	}
}

// recAgent records calls and can fail or stall them.
type recAgent struct {
	calls []string
	err   error
	stall bool
}

func (r *recAgent) Pair(ctx context.Context, d, p string) error {
	r.calls = append(r.calls, "pair "+d+" "+p)
	if r.stall {
		<-ctx.Done()
		return ctx.Err()
	}
	return r.err
}

func (r *recAgent) Unpair(ctx context.Context, d string) error {
	r.calls = append(r.calls, "unpair "+d)
	return r.err
}

func TestWork(t *testing.T) {
	log := filepath.Join(t.TempDir(), "log", "hook.log")
	h := Hook{Exe: "/bin/false", Log: log, Timeout: 50 * time.Millisecond}
	a := &recAgent{}
	if err := h.Work(context.Background(), Action{Pair, "web", "b:1"}.Encode(), a); err != nil {
		t.Fatal(err)
	}
	if err := h.Work(context.Background(), Action{Unpair, "web", ""}.Encode(), a); err != nil {
		t.Fatal(err)
	}
	if strings.Join(a.calls, ",") != "pair web b:1,unpair web" {
		t.Errorf("calls %q", a.calls)
	}
	a = &recAgent{err: errors.New("no agent")}
	if err := h.Work(context.Background(), Action{Unpair, "web", ""}.Encode(), a); !errors.Is(err, ErrAgent) || !strings.Contains(err.Error(), "no agent") {
		t.Errorf("failing agent: %v", err)
	}
	a = &recAgent{stall: true}
	if err := h.Work(context.Background(), Action{Pair, "web", "b:1"}.Encode(), a); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("stalled agent: %v, want the timeout", err)
	}
	if err := h.Work(context.Background(), "nonsense", a); !errors.Is(err, ErrUsage) {
		t.Errorf("bad action: %v", err)
	}
	b, _ := os.ReadFile(log)
	for _, want := range []string{"pair web: done", "no agent", "deadline exceeded", "worker action"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("log lacks %q:\n%s", want, b)
		}
	}
}

func TestHandleDetachesWorker(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "hook.log")
	out := filepath.Join(dir, "argv")
	// A stand-in worker that records its arguments: Handle must start it
	// with the action and the hook's settings, and not wait for it.
	exe := filepath.Join(dir, "fake-ftctl")
	script := "#!/bin/sh\nsleep 0.2\necho \"$@\" > " + out + ".tmp && mv " + out + ".tmp " + out + "\n"
	if err := os.WriteFile(exe, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	h := Hook{Exe: exe, AgentSocket: "/x/agent.sock", Log: log, Timeout: time.Second}
	act, err := h.Handle([]string{"web", "started", "begin", "-"}, strings.NewReader(string(tagged(""))))
	if err != nil || act.Kind != Pair {
		t.Fatalf("%+v %v", act, err)
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
	want := "hook --agent /x/agent.sock --log " + log + " --timeout 1s --worker " + act.Encode() + "\n"
	if string(got) != want {
		t.Errorf("worker argv\n got %q\nwant %q", got, want)
	}
	// Untagged and irrelevant invocations start nothing and log errors.
	if act, err := h.Handle([]string{"web", "started", "begin", "-"}, strings.NewReader("<domain><name>web</name></domain>")); err != nil || act.Kind != None {
		t.Errorf("untagged: %+v %v", act, err)
	}
	if _, err := h.Handle([]string{"web"}, strings.NewReader("")); !errors.Is(err, ErrUsage) {
		t.Errorf("bad args: %v", err)
	}
	b, _ := os.ReadFile(log)
	if !strings.Contains(string(b), "web started begin -: pair") || !strings.Contains(string(b), "bad invocation") {
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
