package agent

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestProtectPeerTimeout: a secondary waits for the longer of its own and
// its primary's link timeout, and refuses a primary's timeout it cannot
// honour, naming it.
func TestProtectPeerTimeout(t *testing.T) {
	if got := replicaTimeout(time.Second, 2500*time.Millisecond); got != 2500*time.Millisecond {
		t.Errorf("primary's longer timeout: secondary waits %v", got)
	}
	if got := replicaTimeout(2*time.Second, time.Second); got != 2*time.Second {
		t.Errorf("secondary's longer timeout: waits %v", got)
	}
	if got := replicaTimeout(time.Second, 0); got != time.Second {
		t.Errorf("a primary that sent none: waits %v", got)
	}
	for _, js := range []string{`{"op":"protect","peer_timeout":-1}`, `{"op":"protect","peer_timeout":3600000000000}`} {
		_, err := decodeMsg([]byte(js))
		if !errors.Is(err, ErrPeer) || !strings.Contains(err.Error(), "peer timeout") {
			t.Errorf("%s: %v, want a bad peer timeout named", js, err)
		}
	}
	m, err := decodeMsg([]byte(`{"op":"protect","peer_timeout":2500000000}`))
	if err != nil || m.PeerTimeout != 2500*time.Millisecond {
		t.Errorf("a valid peer timeout: %+v, %v", m, err)
	}
}

// TestLibvirtUnreachableIsUnavailable: an agent whose libvirtd does not
// answer says so, as ErrUnavailable (HTTP 503 on the control API, so a
// client and a refusing peer can tell it from a VM in the wrong state).
func TestLibvirtUnreachableIsUnavailable(t *testing.T) {
	a := &Agent{cfg: Config{Libvirt: "/nonexistent/libvirt-sock"}}
	_, err := a.libvirtConn(t.Context())
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrState) || !strings.Contains(err.Error(), "libvirtd") {
		t.Fatalf("libvirtd unreachable: %v, want ErrUnavailable saying to check libvirtd", err)
	}
	rec := httptest.NewRecorder()
	writeErr(rec, err)
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), `"kind":"unavailable"`) {
		t.Fatalf("control API answers %d %s", rec.Code, rec.Body)
	}
}
