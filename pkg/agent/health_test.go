package agent

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/failover"
)

// mgmtServer runs a management heartbeat server on loopback with key.
func mgmtServer(t *testing.T, key []byte) *failover.HeartbeatServer {
	t.Helper()
	s, err := failover.ListenHeartbeat(context.Background(), "127.0.0.1:0", failover.HeartbeatServerConfig{Key: key})
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(context.Background())
	t.Cleanup(func() { s.Close() })
	return s
}

func mgmtAgent(t *testing.T, key []byte, timeout time.Duration) *Agent {
	t.Helper()
	dir := t.TempDir()
	a, err := New(Config{Name: "a", StateDir: dir + "/s", RunDir: dir + "/r", RAMDir: dir + "/m",
		MgmtAddr: "127.0.0.1:1", MgmtKey: key, PeerTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

var testKey = bytes.Repeat([]byte{7}, 32)

// TestPeerHealthAliveAfterLinkEnd: a peer whose agent answers on the
// management path after the link ended is alive; one that stops answering
// (its agent died) is not, and the reason says which path was silent.
func TestPeerHealthAliveAfterLinkEnd(t *testing.T) {
	srv := mgmtServer(t, testKey)
	a := mgmtAgent(t, testKey, 400*time.Millisecond)
	h, err := a.newPeerHealth(srv.Addr().String(), a.cfg.PeerTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	if !h.hasMgmt() {
		t.Fatal("no management path although both sides have one")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The replication link keeps being heard for a while, then "ends".
	for i := 0; i < 5; i++ {
		h.heardRepl()
		time.Sleep(20 * time.Millisecond)
	}
	ended := time.Now()
	alive, why := h.aliveAfter(ctx, ended)
	if !alive || !strings.Contains(why, "management path") {
		t.Fatalf("peer answering on mgmt judged alive=%v: %s", alive, why)
	}
	t.Logf("link ended, peer alive: %s", why)

	// The peer's agent dies: its heartbeat server is gone.
	srv.Close()
	ended = time.Now()
	t0 := time.Now()
	alive, why = h.aliveAfter(ctx, ended)
	if alive {
		t.Fatalf("peer without a heartbeat server judged alive: %s", why)
	}
	if !strings.Contains(why, "mgmt") && !strings.Contains(why, "management") {
		t.Fatalf("reason does not name the management path: %s", why)
	}
	t.Logf("peer dead, decided after %v: %s", time.Since(t0).Round(time.Millisecond), why)
	if st := h.state(); !strings.HasPrefix(st, "lost") && !strings.HasPrefix(st, "suspect") {
		t.Fatalf("status of a silent peer: %q", st)
	}
}

// TestPeerHealthWrongKey: pongs under another key prove nothing.
func TestPeerHealthWrongKey(t *testing.T) {
	srv := mgmtServer(t, bytes.Repeat([]byte{9}, 32))
	a := mgmtAgent(t, testKey, 300*time.Millisecond)
	h, err := a.newPeerHealth(srv.Addr().String(), a.cfg.PeerTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if alive, why := h.aliveAfter(ctx, time.Now()); alive {
		t.Fatalf("a server with another key counted as alive: %s", why)
	}
	if st := srv.Stats(); st.Refused == 0 {
		t.Fatalf("the server refused nothing: %+v", st)
	}
}

// TestPeerHealthWithoutMgmt: with no management address on the peer, only
// the replication link is watched, and aliveAfter answers at once.
func TestPeerHealthWithoutMgmt(t *testing.T) {
	a := mgmtAgent(t, testKey, 300*time.Millisecond)
	h, err := a.newPeerHealth("", a.cfg.PeerTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	if h.hasMgmt() {
		t.Fatal("management path without a peer address")
	}
	if alive, why := h.aliveAfter(context.Background(), time.Now()); alive || why != "no management path" {
		t.Fatalf("aliveAfter without mgmt: %v %q", alive, why)
	}
}

// TestMgmtConfig: a management address must be concrete and come with a key.
func TestMgmtConfig(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		addr string
		key  []byte
		want string
	}{
		{"0.0.0.0:7481", testKey, "this host's own address"},
		{":7481", testKey, "this host's own address"},
		{"127.0.0.1", testKey, "management address"},
		{"127.0.0.1:7481", []byte("short"), "key of at least"},
	} {
		_, err := New(Config{StateDir: dir, RunDir: dir, RAMDir: dir, MgmtAddr: c.addr, MgmtKey: c.key})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("MgmtAddr %q: %v, want an error saying %q", c.addr, err, c.want)
		}
	}
	if k := MgmtKeyFromPSK([]byte("0123456789abcdef")); len(k) < failover.MinKeyLen || bytes.Equal(k, MgmtKeyFromPSK([]byte("0123456789abcdeg"))) {
		t.Fatal("derived keys are short or do not depend on the PSK")
	}
}
