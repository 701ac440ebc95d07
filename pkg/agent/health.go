package agent

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftctl/ftctl/pkg/failover"
)

// The management path is the second way two paired agents hear each
// other (issue 6: "heartbeats over the replication link and a separate
// path"). Every agent started with a management address runs one
// failover.HeartbeatServer there; each side of a pairing pings the other's
// server with a failover.HeartbeatClient, and a failover.Detector watches
// both paths: every frame on the replication link is Heard(PathRepl), every
// authentic pong Heard(PathMgmt).
//
// What the paths say when the replication link ends:
//
//   - a pong for a ping sent after the link ended: the peer agent is alive
//     and only the replication link failed. A secondary then must not
//     promote, and does not even probe the LAN. A primary goes on degraded
//     (it does so in every case).
//   - both paths silent: the peer is lost (Detector state Lost), and a
//     secondary asks its arbiter.
//
// The rule is "a pong for a ping sent after the link ended", not "the
// management path is fresh": when a peer's agent is killed its link breaks
// at once (the kernel resets the connection) while its last pongs are only
// a few milliseconds old.

// MgmtKeyFromPSK derives the management heartbeat key from the pair's
// pre-shared key, so a PSK pair needs no second secret. The derivation is
// one-way: a captured heartbeat key does not reveal the replication key.
func MgmtKeyFromPSK(psk []byte) []byte {
	m := hmac.New(sha256.New, psk)
	m.Write([]byte("ftctl management heartbeat key v1"))
	return m.Sum(nil)
}

// peerHealth watches one peer over the replication link and, if both
// agents have one, the management path.
type peerHealth struct {
	det    *failover.Detector
	hb     *failover.HeartbeatClient // nil without a management path
	cancel context.CancelFunc
	done   chan struct{}
	// lastPing is when the ping answered by the newest pong was sent
	// (unix ns): the latest moment the peer is known to have been alive.
	lastPing atomic.Int64
	mu       sync.Mutex
	last     failover.Event // the detector's latest judgement
}

// newPeerHealth starts watching a peer whose management heartbeat server
// is at peerMgmt ("" when either side has none), declaring it dead after
// timeout of silence.
func (a *Agent) newPeerHealth(peerMgmt string, timeout time.Duration) (*peerHealth, error) {
	paths := []failover.Path{failover.PathRepl}
	useMgmt := peerMgmt != "" && a.cfg.MgmtAddr != ""
	if useMgmt {
		paths = append(paths, failover.PathMgmt)
	}
	det, err := failover.NewDetector(failover.Config{Timeout: timeout, Interval: detectorInterval(timeout), Paths: paths})
	if err != nil {
		return nil, fmt.Errorf("%w: peer detector: %w", ErrBadRequest, err)
	}
	h := &peerHealth{det: det, done: make(chan struct{}), last: det.State()}
	if useMgmt {
		h.hb, err = failover.DialHeartbeat(context.Background(), "", peerMgmt, failover.HeartbeatClientConfig{
			Key: a.cfg.MgmtKey, Interval: detectorInterval(timeout),
			Heard: func(rtt time.Duration) {
				h.lastPing.Store(time.Now().Add(-rtt).UnixNano())
				det.Heard(context.Background(), failover.PathMgmt)
			},
		})
		if err != nil {
			return nil, fmt.Errorf("management heartbeats to %s: %w", peerMgmt, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); det.Run(ctx) }()
	go func() {
		defer wg.Done()
		for ev := range det.Events() {
			h.mu.Lock()
			h.last = ev
			h.mu.Unlock()
			a.log.Debug("peer health", "state", ev.State, "reason", ev.Reason)
		}
	}()
	if h.hb != nil {
		wg.Add(1)
		go func() { defer wg.Done(); h.hb.Run(ctx) }()
	}
	go func() { wg.Wait(); close(h.done) }()
	return h, nil
}

// detectorInterval is the heartbeat and evaluation period for a timeout:
// the measured default, but at least ten beats per timeout.
func detectorInterval(timeout time.Duration) time.Duration {
	return min(failover.DefaultInterval, timeout/10)
}

// heardRepl is the replication link's sign of life.
func (h *peerHealth) heardRepl() {
	if h != nil {
		h.det.Heard(context.Background(), failover.PathRepl)
	}
}

// hasMgmt says whether the management path is watched.
func (h *peerHealth) hasMgmt() bool { return h != nil && h.hb != nil }

// state describes the detector's judgement for status.
func (h *peerHealth) state() string {
	if h == nil {
		return ""
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.last.State == failover.Alive {
		return "alive"
	}
	return fmt.Sprintf("%s: %s", h.last.State, h.last.Reason)
}

// aliveAfter waits until the peer proves it lived after t (a pong to a
// ping sent later) or the detector declares it Lost, or the timeout and
// two heartbeat periods pass. It returns whether the peer proved alive,
// with the evidence in words.
func (h *peerHealth) aliveAfter(ctx context.Context, t time.Time) (bool, string) {
	if !h.hasMgmt() {
		return false, "no management path"
	}
	cfg := h.det.Config()
	deadline := time.NewTimer(cfg.Timeout + 2*cfg.Interval)
	defer deadline.Stop()
	tick := time.NewTicker(cfg.Interval / 4)
	defer tick.Stop()
	for {
		if p := h.lastPing.Load(); p > t.UnixNano() {
			return true, fmt.Sprintf("it answered on the management path %v after the link ended", time.Unix(0, p).Sub(t).Round(time.Millisecond))
		}
		if ev := h.det.State(); ev.State == failover.Lost {
			return false, ev.Reason
		}
		select {
		case <-ctx.Done():
			return false, "gave up waiting for the management path: " + ctx.Err().Error()
		case <-deadline.C:
			return false, fmt.Sprintf("no answer on the management path for %v after the link ended", cfg.Timeout+2*cfg.Interval)
		case <-tick.C:
		}
	}
}

// close stops the heartbeats and the detector.
func (h *peerHealth) close() {
	if h == nil {
		return
	}
	h.cancel()
	if h.hb != nil {
		h.hb.Close()
	}
	<-h.done
}
