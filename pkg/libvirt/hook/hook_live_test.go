package hook_test

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/hook"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
)

// asFtctl is the name of a symlink to this test binary; run under that
// name the binary behaves as `ftctl hook`, so libvirtd can run it as its
// hook without the test building cmd/ftctl.
const asFtctl = "ftctl"

func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == asFtctl && len(os.Args) > 1 && os.Args[1] == "hook" {
		os.Exit(fakeFtctlHook(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// fakeFtctlHook mirrors cmd/ftctl's hook command: the same flags, the
// same calls, the same exit status and stderr.
func fakeFtctlHook(args []string) int {
	fs := flag.NewFlagSet("hook", flag.ContinueOnError)
	agentSock := fs.String("agent", "", "")
	log := fs.String("log", "", "")
	timeout := fs.Duration("timeout", 0, "")
	prepTimeout := fs.Duration("prepare-timeout", 0, "")
	worker := fs.String("worker", "", "")
	if err := fs.Parse(args); err != nil {
		return 0
	}
	// Exe: this name, not os.Executable's resolved path, so the worker
	// runs as the hook too.
	h := hook.Hook{Exe: os.Args[0], AgentSocket: *agentSock, Log: *log, Timeout: *timeout, PrepareTimeout: *prepTimeout}
	ag := hook.AgentClient(*agentSock)
	if *worker != "" {
		xml, err := io.ReadAll(os.Stdin)
		if err != nil || h.Work(context.Background(), *worker, xml, ag) != nil {
			return 1
		}
		return 0
	}
	if _, err := h.Handle(context.Background(), fs.Args(), os.Stdin, ag); errors.Is(err, hook.ErrPrepare) {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// fakeAgent serves pkg/agent's control API paths for libvirt domains on
// a unix socket and records each call. Its answers depend on the domain:
// "failprep" gets an error for prepare, "slowprep" no answer to prepare
// until the caller gives up; adopt answers only once release is closed.
type fakeAgent struct {
	mu      sync.Mutex
	calls   []string
	adopted chan string // "name peer" of each adopt request, as it arrives
	release chan struct{}
}

func startFakeAgent(t *testing.T, sock string) *fakeAgent {
	a := &fakeAgent{adopted: make(chan string, 8), release: make(chan struct{})}
	mux := http.NewServeMux()
	type req struct {
		XML  string `json:"xml"`
		Peer string `json:"peer"`
	}
	read := func(r *http.Request) (req, bool) {
		var q req
		err := json.NewDecoder(r.Body).Decode(&q)
		return q, err == nil && strings.Contains(q.XML, "<name>"+r.PathValue("name")+"</name>")
	}
	mux.HandleFunc("POST /v1/domains/{name}/prepare", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		_, ok := read(r)
		a.record(fmt.Sprintf("prepare %s xml=%v", name, ok))
		switch name {
		case "failprep":
			w.WriteHeader(http.StatusInternalServerError)
			w.Write([]byte(`{"error":"open /srv/missing.img: no such file or directory"}`))
			return
		case "slowprep":
			<-r.Context().Done()
			return
		}
		w.Write([]byte(`{}`))
	})
	mux.HandleFunc("POST /v1/domains/{name}/adopt", func(w http.ResponseWriter, r *http.Request) {
		q, ok := read(r)
		s := fmt.Sprintf("adopt %s xml=%v peer=%s", r.PathValue("name"), ok, q.Peer)
		a.record(s)
		a.adopted <- s
		select {
		case <-a.release:
		case <-r.Context().Done():
			return
		}
		w.Write([]byte(`{"name":"` + r.PathValue("name") + `"}`))
	})
	mux.HandleFunc("POST /v1/domains/{name}/stopped", func(w http.ResponseWriter, r *http.Request) {
		a.record("stopped " + r.PathValue("name"))
		w.Write([]byte(`{}`))
	})
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() {
		a.releaseOnce()
		srv.Close()
	})
	return a
}

func (a *fakeAgent) record(s string) {
	a.mu.Lock()
	a.calls = append(a.calls, s)
	a.mu.Unlock()
}

func (a *fakeAgent) Calls() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.calls...)
}

var releaseMu sync.Mutex

func (a *fakeAgent) releaseOnce() {
	releaseMu.Lock()
	defer releaseMu.Unlock()
	select {
	case <-a.release:
	default:
		close(a.release)
	}
}

func waitLog(ctx context.Context, t *testing.T, path, want string) {
	t.Helper()
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("hook log never said %q:\n%s", want, b)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestHookUnderLibvirtd installs the hook into a private libvirtd and
// starts domains under it:
//   - an untagged domain and a standby (role='standby') reach the agent
//     not at all;
//   - a tagged domain: prepare reaches the agent before libvirt's start
//     returns; adopt with the metadata's peer reaches it while the start
//     has already returned (the agent holds its answer until after
//     that); stopped on destroy;
//   - policy manual: prepare, adopt without a peer, stopped;
//   - the agent failing the prepare call, or not answering it within the
//     hook's bound, fails the start with the hook's message, and the
//     domain is not running.
func TestHookUnderLibvirtd(t *testing.T) {
	img := testenv.Guest(t)
	dir, err := os.MkdirTemp("", "fthk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, asFtctl)
	if err := os.Symlink(self, exe); err != nil {
		t.Fatal(err)
	}
	agentSock := filepath.Join(dir, "agent.sock")
	logPath := filepath.Join(dir, "hook.log")
	ag := startFakeAgent(t, agentSock)
	h := hook.Hook{Exe: exe, AgentSocket: agentSock, Log: logPath, Timeout: 30 * time.Second, PrepareTimeout: 2 * time.Second}
	script, err := h.Script()
	if err != nil {
		t.Fatal(err)
	}
	d := libvirttest.Start(t, libvirttest.Options{BeforeStart: func(ldir string) error {
		_, _, err := hook.Install(filepath.Join(ldir, "etc", "hooks"), script)
		return err
	}})
	c := d.Conn(t)
	ctx := testenv.Deadline(t, 100*time.Second)

	define := func(name, attrs string) {
		g := libvirttest.GuestDomain{Name: name, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline}
		x := g.XML()
		if attrs != "" {
			md := "  <metadata>\n    <ftctl:protection xmlns:ftctl='https://github.com/ftctl/ftctl/xmlns/libvirt/1' " + attrs + "/>\n  </metadata>\n"
			x = strings.Replace(x, "  <memoryBacking>", md+"  <memoryBacking>", 1)
		}
		if err := c.Define(ctx, x); err != nil {
			t.Fatal(err)
		}
	}
	define("plain", "")
	define("standby", "role='standby'")
	define("tagged", "peer='127.0.0.1:7480'")
	define("manual", "peer='127.0.0.1:7480' policy='manual'")
	define("failprep", "peer='127.0.0.1:7480'")
	define("slowprep", "peer='127.0.0.1:7480'")

	// Untagged and standby: started and destroyed without the agent.
	for _, name := range []string{"plain", "standby"} {
		if err := c.Start(ctx, name, false); err != nil {
			t.Fatalf("start %s: %v\n%s", name, err, d.LogTail(20))
		}
		if err := c.Destroy(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	if calls := ag.Calls(); len(calls) != 0 {
		t.Fatalf("untagged or standby domains reached the agent: %q", calls)
	}

	if err := c.Start(ctx, "tagged", false); err != nil {
		t.Fatalf("start tagged: %v\n%s", err, d.LogTail(20))
	}
	// prepare ran inside the start: it is recorded by now.
	if calls := ag.Calls(); len(calls) == 0 || calls[0] != "prepare tagged xml=true" {
		t.Fatalf("after start: agent calls %q, want the prepare first", calls)
	}
	// Start has returned; the agent has not answered the adopt (it cannot
	// until release is closed below), so libvirt did not wait for it.
	st, err := c.State(ctx, "tagged")
	if err != nil || st.Code != libvirt.StateRunning {
		t.Fatalf("tagged after start: %v %v", st, err)
	}
	select {
	case s := <-ag.adopted:
		if s != "adopt tagged xml=true peer=127.0.0.1:7480" {
			t.Errorf("adopt request %q", s)
		}
	case <-ctx.Done():
		b, _ := os.ReadFile(logPath)
		t.Fatalf("no adopt request reached the agent; hook log:\n%s\n%s", b, d.LogTail(20))
	}
	ag.releaseOnce()
	waitLog(ctx, t, logPath, "worker: adopt tagged peer 127.0.0.1:7480: done")
	if err := c.Destroy(ctx, "tagged"); err != nil {
		t.Fatal(err)
	}
	waitLog(ctx, t, logPath, "worker: stopped tagged: done")

	// Policy manual: adopted, not paired.
	if err := c.Start(ctx, "manual", false); err != nil {
		t.Fatalf("start manual: %v\n%s", err, d.LogTail(20))
	}
	waitLog(ctx, t, logPath, "worker: adopt manual: done")
	if err := c.Destroy(ctx, "manual"); err != nil {
		t.Fatal(err)
	}
	waitLog(ctx, t, logPath, "worker: stopped manual: done")

	// The agent refuses, or does not answer, the prepare call: libvirt's
	// start fails with the hook's message.
	for _, c2 := range []struct{ name, inErr string }{
		{"failprep", "no such file or directory"},
		{"slowprep", "deadline exceeded"},
	} {
		err := c.Start(ctx, c2.name, false)
		if err == nil {
			t.Fatalf("start %s succeeded", c2.name)
		}
		t.Logf("start %s: %v", c2.name, err)
		for _, want := range []string{c2.inErr, agentSock, "systemctl start ftctl-agent"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("start %s: error lacks %q: %v", c2.name, want, err)
			}
		}
		if st, err := c.State(ctx, c2.name); err != nil || st.Active() {
			t.Errorf("%s after the failed start: %v %v", c2.name, st, err)
		}
	}

	// Every call, in order per domain; releases after the stop may repeat
	// stopped (idempotent for the agent).
	var got []string
	for _, s := range ag.Calls() {
		if len(got) == 0 || got[len(got)-1] != s {
			got = append(got, s)
		}
	}
	want := []string{
		"prepare tagged xml=true", "adopt tagged xml=true peer=127.0.0.1:7480", "stopped tagged",
		"prepare manual xml=true", "adopt manual xml=true peer=", "stopped manual",
		"prepare failprep xml=true", "stopped failprep",
		"prepare slowprep xml=true", "stopped slowprep",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("agent calls:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	b, _ := os.ReadFile(logPath)
	t.Logf("hook log:\n%s", b)
}
