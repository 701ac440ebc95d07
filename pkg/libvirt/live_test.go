package libvirt_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
	"github.com/ftctl/ftctl/pkg/qmp"
)

// waitFor polls cond until it holds or ctx ends.
func waitFor(ctx context.Context, t testing.TB, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// nextEvent returns the next lifecycle event of the wanted type.
func nextEvent(ctx context.Context, t *testing.T, ch <-chan libvirt.LifecycleEvent, want libvirt.EventType) libvirt.LifecycleEvent {
	t.Helper()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("lifecycle stream closed waiting for %s", want)
			}
			t.Logf("lifecycle event %s", ev)
			if ev.Type == want {
				return ev
			}
		case <-ctx.Done():
			t.Fatalf("no %s event", want)
		}
	}
}

func nextQMPEvent(ctx context.Context, t *testing.T, ch <-chan qmp.Event, want string) qmp.Event {
	t.Helper()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("QMP event stream closed waiting for %s", want)
			}
			if ev.Name == want {
				return ev
			}
		case <-ctx.Done():
			t.Fatalf("no QMP event %s", want)
		}
	}
}

func queryStatus(ctx context.Context, t *testing.T, c *libvirt.Conn, name string) string {
	t.Helper()
	ret, err := c.QMP(ctx, name, []byte(`{"execute":"query-status"}`))
	if err != nil {
		t.Fatalf("query-status: %v", err)
	}
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := json.Unmarshal(ret, &st); err != nil {
		t.Fatalf("query-status reply %s: %v", ret, err)
	}
	return st.Status
}

func TestLiveDomainThroughLibvirt(t *testing.T) {
	img := testenv.Guest(t)
	d := libvirttest.Start(t, libvirttest.Options{})
	ctx := testenv.Deadline(t, 3*time.Minute)
	c := d.Conn(t)

	v, err := c.Version(ctx)
	if err != nil || v < 9_000_000 {
		t.Fatalf("libvirt version %d, %v", v, err)
	}
	serial := filepath.Join(t.TempDir(), "serial.log")
	dom := libvirttest.GuestDomain{Name: "lv1", Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline, Serial: serial}
	if err := c.Define(ctx, dom.XML()); err != nil {
		t.Fatal(err)
	}
	if st, err := c.State(ctx, "lv1"); err != nil || st.Code != libvirt.StateShutoff {
		t.Fatalf("defined domain state %v, %v", st, err)
	}
	if _, err := c.QMP(ctx, "lv1", []byte(`{"execute":"query-status"}`)); !errors.Is(err, libvirt.ErrNotReady) {
		t.Errorf("QMP to a shut-off domain: %v, want ErrNotReady", err)
	}
	if _, err := c.XML(ctx, "nosuch", false); !errors.Is(err, libvirt.ErrNoDomain) {
		t.Errorf("XML of a missing domain: %v, want ErrNoDomain", err)
	}

	evCtx, stopEvents := context.WithCancel(ctx)
	defer stopEvents()
	life, err := c.Lifecycle(evCtx, "lv1")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, "lv1", false); err != nil {
		t.Fatalf("start: %v\n%s", err, d.QEMULog("lv1"))
	}
	if ev := nextEvent(ctx, t, life, libvirt.EventStarted); ev.Domain != "lv1" || ev.DetailString() != "booted" {
		t.Errorf("start event %s", ev)
	}
	qev, err := c.QMPEvents(evCtx, "lv1")
	if err != nil {
		t.Fatal(err)
	}

	// The live XML shows the file-backed shared memory protection needs.
	x, err := c.XML(ctx, "lv1", false)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"<source type='file'/>", "<access mode='shared'/>", "<name>lv1</name>"} {
		if !strings.Contains(x, s) {
			t.Errorf("live XML lacks %s:\n%s", s, x)
		}
	}
	if st, err := c.State(ctx, "lv1"); err != nil || st.Code != libvirt.StateRunning || st.ReasonString() != "booted" {
		t.Fatalf("state after start: %v, %v", st, err)
	}
	if s := queryStatus(ctx, t, c, "lv1"); s != "running" {
		t.Fatalf("query-status %q, want running", s)
	}

	// The guest really runs: its console counts.
	waitFor(ctx, t, "guest console output", func() bool {
		b, _ := os.ReadFile(serial)
		return strings.Contains(string(b), "counter=")
	})

	// Guest RAM is a file the agent can map, reachable from outside the
	// daemon's mount namespace.
	ret, err := c.QMP(ctx, "lv1", []byte(`{"execute":"qom-get","arguments":{"path":"/objects/pc.ram","property":"mem-path"}}`))
	if err != nil {
		t.Fatal(err)
	}
	var memPath string
	if err := json.Unmarshal(ret, &memPath); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(d.RAMFile(memPath))
	if err != nil || fi.Size() != 128<<20 {
		t.Errorf("guest RAM file %s (%s): %v, size %d", memPath, d.RAMFile(memPath), err, sizeOf(fi))
	}

	// A QMP error comes back as a *qmp.Error.
	_, err = c.QMP(ctx, "lv1", []byte(`{"execute":"no-such-command"}`))
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("bad command: %v, want a CommandNotFound *qmp.Error", err)
	}
	if _, err := c.QMP(ctx, "lv1", []byte(`not json`)); err == nil {
		t.Errorf("a malformed command was sent")
	}

	// stop and cont through the monitor: libvirt's state follows, and
	// both event streams see it.
	if _, err := c.QMP(ctx, "lv1", []byte(`{"execute":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	nextQMPEvent(ctx, t, qev, "STOP")
	if ev := nextEvent(ctx, t, life, libvirt.EventSuspended); ev.Detail != libvirt.SuspendedPaused {
		t.Errorf("suspend event %s", ev)
	}
	if st, _ := c.State(ctx, "lv1"); st.Code != libvirt.StatePaused {
		t.Errorf("state after stop: %v", st)
	}
	if _, err := c.QMP(ctx, "lv1", []byte(`{"execute":"cont"}`)); err != nil {
		t.Fatal(err)
	}
	resume := nextQMPEvent(ctx, t, qev, "RESUME")
	if resume.Timestamp.IsZero() {
		t.Errorf("RESUME event without a timestamp")
	}
	nextEvent(ctx, t, life, libvirt.EventResumed)
	if st, _ := c.State(ctx, "lv1"); st.Code != libvirt.StateRunning || st.ReasonString() != "unpaused" {
		t.Errorf("state after cont: %v", st)
	}

	// go-qemu's Monitor interface over the pass-through.
	m := &libvirt.GoQEMUMonitor{Conn: c, Domain: "lv1", Timeout: 30 * time.Second}
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	raw, err := m.Run([]byte(`{"execute":"query-name"}`))
	if err != nil || !strings.Contains(string(raw), `"name":"lv1"`) {
		t.Errorf("go-qemu Run: %s, %v", raw, err)
	}

	if err := c.Destroy(ctx, "lv1"); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(ctx, t, life, libvirt.EventStopped); ev.Detail != libvirt.StoppedDestroyed {
		t.Errorf("stop event %s, want destroyed", ev)
	}
	if st, _ := c.State(ctx, "lv1"); st.Code != libvirt.StateShutoff || st.ReasonString() != "destroyed" {
		t.Errorf("state after destroy: %v", st)
	}
	// The QMP event stream ends with the domain's monitor.
	stopEvents()
	for range qev {
	}
	if err := c.Undefine(ctx, "lv1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.State(ctx, "lv1"); !errors.Is(err, libvirt.ErrNoDomain) {
		t.Errorf("state of an undefined domain: %v", err)
	}
}

func sizeOf(fi os.FileInfo) int64 {
	if fi == nil {
		return -1
	}
	return fi.Size()
}

func TestDialErrors(t *testing.T) {
	ctx := testenv.Deadline(t, 10*time.Second)
	if _, err := libvirt.Dial(ctx, filepath.Join(t.TempDir(), "nothing")); !errors.Is(err, libvirt.ErrConnect) {
		t.Errorf("missing socket: %v, want ErrConnect", err)
	}
	for _, uri := range []string{"xen:///system", "qemu+carrier-pigeon://h/system", "qemu+tcp:///system", "qemu+unix://host/system", "%zz"} {
		if _, err := libvirt.Dial(ctx, uri); !errors.Is(err, libvirt.ErrBadURI) {
			t.Errorf("Dial(%q): %v, want ErrBadURI", uri, err)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := libvirt.Dial(cctx, "/nonexistent"); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled dial: %v", err)
	}
}
