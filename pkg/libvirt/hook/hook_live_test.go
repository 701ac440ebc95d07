package hook_test

import (
	"context"
	"encoding/json"
	"flag"
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
// same calls.
func fakeFtctlHook(args []string) int {
	fs := flag.NewFlagSet("hook", flag.ContinueOnError)
	agentSock := fs.String("agent", "", "")
	log := fs.String("log", "", "")
	timeout := fs.Duration("timeout", 0, "")
	worker := fs.String("worker", "", "")
	if err := fs.Parse(args); err != nil {
		return 0
	}
	// Exe: this name, not os.Executable's resolved path, so the worker
	// runs as the hook too.
	h := hook.Hook{Exe: os.Args[0], AgentSocket: *agentSock, Log: *log, Timeout: *timeout}
	if *worker != "" {
		if h.Work(context.Background(), *worker, hook.AgentClient(*agentSock)) != nil {
			return 1
		}
		return 0
	}
	_, _ = h.Handle(fs.Args(), os.Stdin)
	return 0
}

// fakeAgent serves pkg/agent's control API paths for pair and unpair on
// a unix socket; pair answers only when release is closed.
type fakeAgent struct {
	mu      sync.Mutex
	calls   []string
	paired  chan string // peer of each pair request, as it arrives
	release chan struct{}
}

func startFakeAgent(t *testing.T, sock string) *fakeAgent {
	a := &fakeAgent{paired: make(chan string, 4), release: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/vms/{name}/pair", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Peer string `json:"peer"`
		}
		_ = json.NewDecoder(r.Body).Decode(&req)
		a.record("pair " + r.PathValue("name") + " " + req.Peer)
		a.paired <- req.Peer
		select {
		case <-a.release:
		case <-r.Context().Done():
			return
		}
		w.Write([]byte(`{"name":"` + r.PathValue("name") + `"}`))
	})
	mux.HandleFunc("POST /v1/vms/{name}/unpair", func(w http.ResponseWriter, r *http.Request) {
		a.record("unpair " + r.PathValue("name"))
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

// TestHookUnderLibvirtd installs the hook into a private libvirtd, starts
// a domain tagged with a peer, and sees the pair request reach the agent
// while libvirt's start has already returned (the agent holds its answer
// until after that), then the unpair when the domain is destroyed; an
// untagged domain's start reaches the agent not at all.
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
	h := hook.Hook{Exe: exe, AgentSocket: agentSock, Log: logPath, Timeout: 30 * time.Second}
	script, err := h.Script()
	if err != nil {
		t.Fatal(err)
	}
	d := libvirttest.Start(t, libvirttest.Options{BeforeStart: func(ldir string) error {
		_, _, err := hook.Install(filepath.Join(ldir, "etc", "hooks"), script)
		return err
	}})
	c := d.Conn(t)
	ctx := testenv.Deadline(t, 90*time.Second)

	define := func(name, metadata string) {
		g := libvirttest.GuestDomain{Name: name, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline}
		x := strings.Replace(g.XML(), "  <memoryBacking>", metadata+"  <memoryBacking>", 1)
		if err := c.Define(ctx, x); err != nil {
			t.Fatal(err)
		}
	}
	define("plain", "")
	define("tagged", "  <metadata>\n    <ftctl:protection xmlns:ftctl='https://github.com/ftctl/ftctl/xmlns/libvirt/1' peer='127.0.0.1:7480'/>\n  </metadata>\n")

	// The untagged domain first: its start must not reach the agent.
	if err := c.Start(ctx, "plain", false); err != nil {
		t.Fatalf("start plain: %v\n%s", err, d.LogTail(20))
	}
	if err := c.Destroy(ctx, "plain"); err != nil {
		t.Fatal(err)
	}

	if err := c.Start(ctx, "tagged", false); err != nil {
		t.Fatalf("start tagged: %v\n%s", err, d.LogTail(20))
	}
	// Start has returned; the agent has not answered the pair (it cannot
	// until release is closed below), so libvirt did not wait for it.
	st, err := c.State(ctx, "tagged")
	if err != nil || st.Code != libvirt.StateRunning {
		t.Fatalf("tagged after start: %v %v", st, err)
	}
	select {
	case peer := <-ag.paired:
		if peer != "127.0.0.1:7480" {
			t.Errorf("pair request's peer %q", peer)
		}
	case <-ctx.Done():
		b, _ := os.ReadFile(logPath)
		t.Fatalf("no pair request reached the agent; hook log:\n%s\n%s", b, d.LogTail(20))
	}
	ag.releaseOnce()
	waitLog(ctx, t, logPath, "worker: pair tagged: done")

	if err := c.Destroy(ctx, "tagged"); err != nil {
		t.Fatal(err)
	}
	waitLog(ctx, t, logPath, "worker: unpair tagged: done")
	calls := ag.Calls()
	if len(calls) < 2 || calls[0] != "pair tagged 127.0.0.1:7480" || calls[1] != "unpair tagged" {
		t.Errorf("agent calls %q", calls)
	}
	for _, c := range calls {
		if strings.Contains(c, "plain") {
			t.Errorf("untagged domain reached the agent: %q", c)
		}
	}
	b, _ := os.ReadFile(logPath)
	t.Logf("hook log:\n%s", b)
}
