package failover

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/failover/fakeclock"
)

func TestHeartbeatCodec(t *testing.T) {
	p := hbPacket{Type: hbPing, Session: 0x1122334455667788, Seq: 42, Nonce: 7}
	b := appendHeartbeat(nil, testKey, p)
	if len(b) != hbLen {
		t.Fatalf("encoded %d bytes", len(b))
	}
	got, err := decodeHeartbeat(testKey, b)
	if err != nil || got != p {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if _, err := decodeHeartbeat([]byte("another key, 16+ bytes"), b); !errors.Is(err, ErrAuth) {
		t.Fatalf("wrong key: %v, want ErrAuth", err)
	}
	for i := range b {
		c := bytes.Clone(b)
		c[i] ^= 0x40
		if _, err := decodeHeartbeat(testKey, c); err == nil {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
	if _, err := decodeHeartbeat(testKey, b[:63]); !errors.Is(err, ErrMalformed) {
		t.Fatalf("short: %v, want ErrMalformed", err)
	}
	zero := appendHeartbeat(nil, testKey, hbPacket{Type: hbPing, Session: 1})
	if _, err := decodeHeartbeat(testKey, zero); !errors.Is(err, ErrMalformed) {
		t.Fatalf("seq 0: %v, want ErrMalformed", err)
	}
}

func TestReplayWindow(t *testing.T) {
	var w replayWindow
	for _, s := range []uint64{1, 3, 2, 70, 7, 100} {
		if !w.accept(s) {
			t.Fatalf("fresh %d refused", s)
		}
	}
	for _, s := range []uint64{1, 3, 70, 7, 100, 36} {
		if w.accept(s) {
			t.Fatalf("seq %d accepted twice or too old (high %d)", s, w.high)
		}
	}
	if !w.accept(37) || !w.accept(99) {
		t.Fatal("unseen numbers inside the window refused")
	}
}

func FuzzDecodeHeartbeat(f *testing.F) {
	f.Add(appendHeartbeat(nil, testKey, hbPacket{Type: hbPing, Session: 1, Seq: 1}))
	f.Add(appendHeartbeat(nil, testKey, hbPacket{Type: hbPong, Session: 9, Seq: 3, Nonce: 5}))
	f.Add(make([]byte, hbLen))
	f.Add([]byte("FTHB"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := decodeHeartbeat(testKey, b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrAuth) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		if again := appendHeartbeat(nil, testKey, p); !bytes.Equal(again, b) {
			t.Fatalf("accepted packet does not re-encode to itself")
		}
	})
}

// rawPeer is a test endpoint speaking the heartbeat protocol by hand.
type rawPeer struct {
	t    *testing.T
	conn net.PacketConn
	to   net.Addr
}

func newRawPeer(t *testing.T, to net.Addr) *rawPeer {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawPeer{t: t, conn: c, to: to}
}

func (r *rawPeer) send(b []byte) {
	if _, err := r.conn.WriteTo(b, r.to); err != nil {
		r.t.Fatal(err)
	}
}

// recv returns the next datagram, or nil if none came within d.
func (r *rawPeer) recv(d time.Duration) ([]byte, net.Addr) {
	r.conn.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 256)
	n, from, err := r.conn.ReadFrom(buf)
	if err != nil {
		return nil, nil
	}
	return buf[:n], from
}

func startServer(t *testing.T, cfg HeartbeatServerConfig) *HeartbeatServer {
	t.Helper()
	s, err := ListenHeartbeat(context.Background(), "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

func TestHeartbeatServerReplayAndKeys(t *testing.T) {
	clk := fakeclock.New(t0)
	var heard atomic.Int64
	s := startServer(t, HeartbeatServerConfig{Key: testKey, Clock: clk, Rotate: 10 * time.Second, Heard: func() { heard.Add(1) }})
	peer := newRawPeer(t, s.Addr())
	const wait = 5 * time.Second

	ping := func(seq, nonce uint64) []byte {
		return appendHeartbeat(nil, testKey, hbPacket{Type: hbPing, Session: 77, Seq: seq, Nonce: nonce})
	}
	pong := func(b []byte, _ net.Addr) hbPacket {
		t.Helper()
		if b == nil {
			t.Fatal("no pong")
		}
		p, err := decodeHeartbeat(testKey, b)
		if err != nil || p.Type != hbPong || p.Session != 77 {
			t.Fatalf("bad pong %+v: %v", p, err)
		}
		return p
	}

	// First contact: answered, not counted (no nonce yet).
	peer.send(ping(1, 0))
	nonce := pong(peer.recv(wait)).Nonce
	if heard.Load() != 0 {
		t.Fatal("ping without the server's nonce counted as a sign of life")
	}
	fresh := ping(2, nonce)
	peer.send(fresh)
	if p := pong(peer.recv(wait)); p.Seq != 2 {
		t.Fatalf("pong seq %d, want 2", p.Seq)
	}
	if heard.Load() != 1 {
		t.Fatalf("heard %d, want 1", heard.Load())
	}
	// The same datagram again: refused, unanswered.
	peer.send(fresh)
	if b, _ := peer.recv(200 * time.Millisecond); b != nil {
		t.Fatal("replayed ping answered")
	}
	// Wrong key: refused, unanswered.
	peer.send(appendHeartbeat(nil, []byte("not the pair key!!"), hbPacket{Type: hbPing, Session: 77, Seq: 3, Nonce: nonce}))
	if b, _ := peer.recv(200 * time.Millisecond); b != nil {
		t.Fatal("ping with a wrong key answered")
	}
	// A pong reflected at the server: refused.
	peer.send(appendHeartbeat(nil, testKey, hbPacket{Type: hbPong, Session: 77, Seq: 4, Nonce: nonce}))
	// Garbage.
	peer.send([]byte("hello"))
	// An older but unseen seq inside the window is fine.
	peer.send(ping(1, nonce))
	pong(peer.recv(wait))
	waitFor(t, wait, "server counters", func() bool {
		st := s.Stats()
		return st.Replayed == 2 && st.Refused == 1 && st.Malformed == 1
	})
	if st := s.Stats(); st.Accepted != 2 || heard.Load() != 2 || st.Unproven != 1 {
		t.Fatalf("stats %+v heard %d, want 2 accepted, 1 unproven", st, heard.Load())
	}

	// After two nonce rotations a recorded ping proves nothing, even one
	// with a seq the server never saw.
	clk.Advance(11 * time.Second)
	peer.send(ping(10, nonce)) // still valid as the previous nonce
	n2 := pong(peer.recv(wait)).Nonce
	if n2 == nonce {
		t.Fatal("nonce did not rotate")
	}
	clk.Advance(11 * time.Second)
	before := heard.Load()
	peer.send(ping(11, nonce))
	pong(peer.recv(wait))
	if heard.Load() != before {
		t.Fatal("ping with a nonce two rotations old counted")
	}
}

func TestHeartbeatClientRefusesForeignPongs(t *testing.T) {
	// A fake server answers the first ping properly, then replays that
	// pong, then sends one for a ping never sent, then one with a bad key.
	fake, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer fake.Close()
	var heard atomic.Int64
	c, err := DialHeartbeat(context.Background(), "127.0.0.1:0", fake.LocalAddr().String(),
		HeartbeatClientConfig{Key: testKey, Interval: 20 * time.Millisecond, Heard: func(time.Duration) { heard.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()

	buf := make([]byte, 128)
	fake.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := fake.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	p, err := decodeHeartbeat(testKey, buf[:n])
	if err != nil || p.Type != hbPing {
		t.Fatalf("client sent %+v, %v", p, err)
	}
	good := appendHeartbeat(nil, testKey, hbPacket{Type: hbPong, Session: p.Session, Seq: p.Seq, Nonce: 99})
	fake.WriteTo(good, from)
	fake.WriteTo(good, from)
	fake.WriteTo(appendHeartbeat(nil, testKey, hbPacket{Type: hbPong, Session: p.Session, Seq: p.Seq + 1000, Nonce: 99}), from)
	fake.WriteTo(appendHeartbeat(nil, testKey, hbPacket{Type: hbPong, Session: p.Session + 1, Seq: p.Seq, Nonce: 99}), from)
	fake.WriteTo(appendHeartbeat(nil, []byte("some other 16B key"), hbPacket{Type: hbPong, Session: p.Session, Seq: p.Seq, Nonce: 99}), from)
	waitFor(t, 5*time.Second, "client counters", func() bool {
		st := c.Stats()
		return st.Accepted == 1 && st.Replayed == 3 && st.Refused == 1
	})
	// The next pings echo the nonce learned from the accepted pong.
	waitFor(t, 5*time.Second, "a ping echoing the nonce", func() bool {
		fake.SetReadDeadline(time.Now().Add(time.Second))
		n, _, err := fake.ReadFrom(buf)
		if err != nil {
			return false
		}
		q, err := decodeHeartbeat(testKey, buf[:n])
		return err == nil && q.Nonce == 99
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if heard.Load() != 1 {
		t.Fatalf("heard %d, want 1", heard.Load())
	}
}

func TestHeartbeatWrongKeyNeverHeard(t *testing.T) {
	var serverHeard atomic.Int64
	s := startServer(t, HeartbeatServerConfig{Key: testKey, Heard: func() { serverHeard.Add(1) }})
	var clientHeard atomic.Int64
	c, err := DialHeartbeat(context.Background(), "", s.Addr().String(),
		HeartbeatClientConfig{Key: []byte("the wrong key, 16+ bytes"), Interval: 10 * time.Millisecond, Heard: func(time.Duration) { clientHeard.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Run(ctx)
	waitFor(t, 5*time.Second, "refusals", func() bool { return s.Stats().Refused >= 5 })
	if serverHeard.Load() != 0 || clientHeard.Load() != 0 || s.Stats().Sent != 0 {
		t.Fatalf("wrong key produced life signs: server %d client %d pongs %d", serverHeard.Load(), clientHeard.Load(), s.Stats().Sent)
	}
}

// lossyRelay forwards datagrams between a client and a server, dropping
// those drop() says to.
type lossyRelay struct {
	conn   net.PacketConn
	server net.Addr
	mu     sync.Mutex
	client net.Addr
	drop   atomic.Pointer[func(n uint64) bool]
	n      [2]atomic.Uint64 // datagrams seen towards the server, towards the client
}

func newLossyRelay(t *testing.T, server net.Addr) *lossyRelay {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &lossyRelay{conn: c, server: server}
	r.setDrop(func(uint64) bool { return false })
	go func() {
		buf := make([]byte, 256)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			to, dir := r.server, 0
			r.mu.Lock()
			if from.String() == server.String() {
				to, dir = r.client, 1
			} else {
				r.client = from
			}
			r.mu.Unlock()
			if (*r.drop.Load())(r.n[dir].Add(1)) {
				continue
			}
			if to != nil {
				c.WriteTo(buf[:n], to)
			}
		}
	}()
	t.Cleanup(func() { c.Close() })
	return r
}

func (r *lossyRelay) setDrop(f func(n uint64) bool) { r.drop.Store(&f) }

func TestHeartbeatLossToleratedUpToTimeout(t *testing.T) {
	det, err := NewDetector(Config{Paths: []Path{PathMgmt}, Interval: 20 * time.Millisecond, Timeout: 600 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := startServer(t, HeartbeatServerConfig{Key: testKey})
	relay := newLossyRelay(t, s.Addr())
	var lastHeard atomic.Int64
	// Deterministic loss: one datagram in two gets through each way, so
	// one ping in four is answered.
	relay.setDrop(func(n uint64) bool { return n%2 != 0 })
	c, err := DialHeartbeat(ctx, "127.0.0.1:0", relay.conn.LocalAddr().String(), HeartbeatClientConfig{
		Key: testKey, Interval: 20 * time.Millisecond, Heard: func(time.Duration) {
			lastHeard.Store(time.Now().UnixNano())
			det.Heard(ctx, PathMgmt)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	go c.Run(ctx)
	events := make(chan Event, 64)
	go func() {
		for ev := range det.Events() {
			events <- ev
		}
	}()
	go det.Run(ctx)

	// Run under loss until 20 pongs came through (well over the timeout).
	waitFor(t, 20*time.Second, "20 pongs under loss", func() bool { return c.Stats().Accepted >= 20 })
	for len(events) > 0 {
		if ev := <-events; ev.State == Lost {
			t.Fatalf("lost under 75%% loss: %v (client %+v)", ev, c.Stats())
		}
	}
	// Total loss: lost after the timeout.
	relay.setDrop(func(uint64) bool { return true })
	ev := awaitState(t, events, Lost, 10*time.Second)
	if gap := ev.At.Sub(time.Unix(0, lastHeard.Load())); gap < 600*time.Millisecond {
		t.Fatalf("lost %v after the last pong, before the 600ms timeout", gap)
	}
	relay.setDrop(func(uint64) bool { return false })
	awaitState(t, events, Alive, 10*time.Second)
	st := c.Stats()
	if st.MinRTT <= 0 || st.MaxRTT < st.MinRTT || st.MeanRTT < st.MinRTT || st.MeanRTT > st.MaxRTT {
		t.Fatalf("RTT stats inconsistent: %+v", st)
	}
}

func awaitState(t *testing.T, events <-chan Event, want State, d time.Duration) Event {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case ev := <-events:
			if ev.State == want {
				return ev
			}
		case <-deadline:
			t.Fatalf("no %v event within %v", want, d)
		}
	}
}

func TestHeartbeatAcrossNamespaces(t *testing.T) {
	l := newLAN(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg := Config{Paths: []Path{PathMgmt}, Interval: 20 * time.Millisecond, Timeout: 400 * time.Millisecond}
	detA, _ := NewDetector(cfg) // on "A", hearing pings
	detB, _ := NewDetector(cfg) // on "B", hearing pongs
	s, err := NewHeartbeatServer(listenUDPIn(t, l.nsA, lanIPA+":0"), HeartbeatServerConfig{
		Key: testKey, Heard: func() { detA.Heard(ctx, PathMgmt) },
	})
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ctx)
	c, err := NewHeartbeatClient(listenUDPIn(t, l.nsB, lanIPB+":0"), s.Addr(), HeartbeatClientConfig{
		Key: testKey, Interval: 20 * time.Millisecond, Heard: func(time.Duration) { detB.Heard(ctx, PathMgmt) },
	})
	if err != nil {
		t.Fatal(err)
	}
	go c.Run(ctx)
	go detA.Run(ctx)
	go detB.Run(ctx)
	waitFor(t, 10*time.Second, "heartbeats across the veth", func() bool {
		return s.Stats().Accepted >= 5 && c.Stats().Accepted >= 5
	})
	setLink(t, l.hA, "fa", false)
	awaitState(t, detA.Events(), Lost, 10*time.Second)
	awaitState(t, detB.Events(), Lost, 10*time.Second)
	setLink(t, l.hA, "fa", true)
	awaitState(t, detA.Events(), Alive, 10*time.Second)
	awaitState(t, detB.Events(), Alive, 10*time.Second)
}
