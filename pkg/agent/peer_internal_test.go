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

// TestTooLate: the primary may release held output until the secondary's
// timeout plus its probe window, less the slack, after it last heard it;
// a secondary that never promotes on silence alone sets no limit.
func TestTooLate(t *testing.T) {
	last := time.Unix(1000, 0)
	p := &protection{peerTimeout: time.Second, probeWindow: 500 * time.Millisecond}
	limit := time.Second + 500*time.Millisecond - releaseSlack
	if late, _ := p.tooLate(last, last.Add(limit)); late {
		t.Errorf("at the limit: late")
	}
	if late, by := p.tooLate(last, last.Add(limit+time.Millisecond)); !late || by != time.Millisecond {
		t.Errorf("1 ms past the limit: late %v by %v", late, by)
	}
	p.probeWindow = 0
	if late, _ := p.tooLate(last, last.Add(time.Hour)); late {
		t.Errorf("no probe window: late")
	}
}
