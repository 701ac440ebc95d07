package failover

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/failover/fakeclock"
)

func startWitness(t *testing.T, cfg WitnessConfig) *WitnessServer {
	t.Helper()
	if cfg.Key == nil {
		cfg.Key = testKey
	}
	s, err := ListenWitness(context.Background(), "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("witness Serve: %v", err)
		}
	})
	return s
}

func witnessClient(t *testing.T, addr, node string) *WitnessClient {
	t.Helper()
	c, err := NewWitnessClient(WitnessClientConfig{Addr: addr, Key: testKey, Node: node, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestWitnessLeaseRules(t *testing.T) {
	clk := fakeclock.New(t0)
	s := startWitness(t, WitnessConfig{Clock: clk, LeaseTTL: 2 * time.Second})
	a, b := witnessClient(t, s.Addr().String(), "host-a"), witnessClient(t, s.Addr().String(), "host-b")
	ctx := context.Background()
	must := func(l Lease, err error) Lease {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return l
	}

	// Grace after start: a fresh claim is refused, a renewal is granted.
	if l := must(b.Acquire(ctx, "vm1", false)); l.Granted || l.Holder != "" {
		t.Fatalf("claim during grace: %+v, want refused with no holder", l)
	}
	if d, err := (WitnessArbiter{Lease: b}).Decide(ctx, Evidence{VM: "vm1"}); d != Unknown || err != nil {
		t.Fatalf("arbiter during grace: %v, %v; want unknown", d, err)
	}
	if l := must(a.Acquire(ctx, "vm1", true)); !l.Granted || l.Holder != "host-a" || l.TTL != 2*time.Second {
		t.Fatalf("renewal during grace: %+v, want granted for 2s", l)
	}
	clk.Advance(3 * time.Second) // past grace, and past a's lease
	if l := must(b.Acquire(ctx, "vm2", false)); !l.Granted {
		t.Fatalf("free lease after grace: %+v", l)
	}
	if l := must(a.Acquire(ctx, "vm1", true)); !l.Granted {
		t.Fatalf("renew after expiry with nobody else: %+v", l)
	}
	// Held: another node is refused and told who holds it.
	clk.Advance(1500 * time.Millisecond)
	if l := must(b.Acquire(ctx, "vm1", false)); l.Granted || l.Holder != "host-a" || l.TTL != 500*time.Millisecond {
		t.Fatalf("claim of a held lease: %+v, want held by host-a for 500ms", l)
	}
	if d, err := (WitnessArbiter{Lease: b}).Decide(ctx, Evidence{VM: "vm1"}); d != DoNotPromote || err != nil {
		t.Fatalf("arbiter while the primary renews: %v, %v", d, err)
	}
	// Expired: the first to ask wins; the old holder's renewal is refused.
	clk.Advance(500 * time.Millisecond)
	if d, err := (WitnessArbiter{Lease: b}).Decide(ctx, Evidence{VM: "vm1"}); d != Promote || err != nil {
		t.Fatalf("arbiter after expiry: %v, %v", d, err)
	}
	if l := must(a.Acquire(ctx, "vm1", true)); l.Granted || l.Holder != "host-b" {
		t.Fatalf("old holder renewing after losing: %+v", l)
	}
	if h, _ := s.Holder("vm1"); h != "host-b" {
		t.Fatalf("holder %q", h)
	}
	// Release: only by the holder.
	if err := a.Release(ctx, "vm1"); !errors.Is(err, ErrUnsafe) {
		t.Fatalf("release by non-holder: %v, want ErrUnsafe", err)
	}
	if err := b.Release(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if h, _ := s.Holder("vm1"); h != "" {
		t.Fatalf("holder %q after release", h)
	}
	if l := must(a.Acquire(ctx, "vm1", false)); !l.Granted {
		t.Fatalf("claim after release: %+v", l)
	}
	if _, err := a.Acquire(ctx, "bad name", false); !errors.Is(err, ErrConfig) {
		t.Fatalf("vm name with a space: %v, want ErrConfig", err)
	}
}

func TestWitnessRaceOneWinner(t *testing.T) {
	s := startWitness(t, WitnessConfig{LeaseTTL: time.Minute, Grace: time.Nanosecond})
	time.Sleep(time.Millisecond) // past the grace period
	const rounds, racers = 20, 4
	clients := make([]*WitnessClient, racers)
	for i := range clients {
		clients[i] = witnessClient(t, s.Addr().String(), fmt.Sprintf("host-%d", i))
	}
	for round := range rounds {
		vm := fmt.Sprintf("vm-%d", round)
		var wins atomic.Int32
		var winner atomic.Value
		start := make(chan struct{})
		var wg sync.WaitGroup
		for _, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				d, err := (WitnessArbiter{Lease: c}).Decide(context.Background(), Evidence{VM: vm})
				if err != nil {
					t.Error(err)
					return
				}
				if d == Promote {
					wins.Add(1)
					winner.Store(c.Node())
				} else if d != DoNotPromote {
					t.Errorf("racer got %v", d)
				}
			}()
		}
		close(start)
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("round %d: %d winners", round, wins.Load())
		}
		if h, _ := s.Holder(vm); h != winner.Load() {
			t.Fatalf("round %d: witness says %q holds it, winner was %v", round, h, winner.Load())
		}
	}
}

func TestWitnessRefusesBadClients(t *testing.T) {
	s := startWitness(t, WitnessConfig{})
	wrong, err := NewWitnessClient(WitnessClientConfig{Addr: s.Addr().String(), Key: []byte("a different key!!"), Node: "x"})
	if err != nil {
		t.Fatal(err)
	}
	defer wrong.Close()
	if _, err := wrong.Acquire(context.Background(), "vm1", true); err == nil {
		t.Fatal("wrong key granted")
	}
	if h, _ := s.Holder("vm1"); h != "" {
		t.Fatalf("wrong key made %q the holder", h)
	}

	// Record a valid exchange, then replay the request on a new connection.
	conn, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	hello := make([]byte, 21)
	io.ReadFull(conn, hello)
	var chal [wChalLen]byte
	copy(chal[:], hello[5:])
	req := encodeWRequest(testKey, chal, wRequest{Op: wOpAcquire, Flags: flagRenew, VM: "vm2", Node: "host-a"})
	writeFrame(conn, req)
	b, err := readFrame(conn)
	if err != nil {
		t.Fatal(err)
	}
	if r, err := decodeWResponse(testKey, chal, b); err != nil || r.Status != wGranted {
		t.Fatalf("recorded exchange: %+v, %v", r, err)
	}
	// The same request again on this connection: the challenge moved on.
	writeFrame(conn, req)
	if _, err := readFrame(conn); err == nil {
		t.Fatal("replayed request answered on the same connection")
	}
	conn.Close()
	conn2, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	io.ReadFull(conn2, hello)
	writeFrame(conn2, req)
	if _, err := readFrame(conn2); err == nil {
		t.Fatal("replayed request answered on a new connection")
	}
	// Oversized frame.
	conn3, _ := net.Dial("tcp", s.Addr().String())
	defer conn3.Close()
	io.ReadFull(conn3, hello)
	conn3.Write([]byte{0xff, 0xff})
	if _, err := readFrame(conn3); err == nil {
		t.Fatal("oversized frame answered")
	}
	waitFor(t, 5*time.Second, "refusals counted", func() bool { return s.Refused() >= 4 })
}

func TestWitnessClientRefusesForgedResponse(t *testing.T) {
	// A fake witness answers with a response bound to another challenge
	// (a recorded one): the client must refuse it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		chal := newChallenge()
		c.Write(append(append([]byte(wMagic), wVersion), chal[:]...))
		readFrame(c)
		other := newChallenge()
		writeFrame(c, encodeWResponse(testKey, other, wResponse{Status: wGranted, Holder: "host-b", TTL: time.Hour}))
		io.Copy(io.Discard, c)
	}()
	c := witnessClient(t, ln.Addr().String(), "host-b")
	if _, err := c.Acquire(context.Background(), "vm1", false); !errors.Is(err, ErrAuth) {
		t.Fatalf("forged response: %v, want ErrAuth", err)
	}
}

func TestWitnessClientReconnects(t *testing.T) {
	s := startWitness(t, WitnessConfig{Grace: time.Nanosecond})
	c := witnessClient(t, s.Addr().String(), "host-a")
	ctx := context.Background()
	if _, err := c.Acquire(ctx, "vm1", true); err != nil {
		t.Fatal(err)
	}
	// The server drops every connection (as on an idle timeout).
	s.mu.Lock()
	for conn := range s.conns {
		conn.Close()
	}
	s.mu.Unlock()
	if l, err := c.Acquire(ctx, "vm1", true); err != nil || !l.Granted {
		t.Fatalf("after the server dropped the connection: %+v, %v", l, err)
	}
	// Unreachable witness.
	dead := witnessClient(t, "127.0.0.1:1", "host-a")
	if _, err := dead.Acquire(ctx, "vm1", true); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("closed port: %v, want ErrUnreachable", err)
	}
}

func FuzzDecodeWitnessRequest(f *testing.F) {
	var chal [wChalLen]byte
	f.Add(encodeWRequest(testKey, chal, wRequest{Op: wOpAcquire, VM: "vm1", Node: "a"}))
	f.Add(encodeWRequest(testKey, chal, wRequest{Op: wOpRelease, Flags: flagRenew, VM: "v", Node: "node-b"}))
	f.Add([]byte{1, 0, 200})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeWRequest(testKey, chal, b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrAuth) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		if again := encodeWRequest(testKey, chal, r); !bytes.Equal(again, b) {
			t.Fatal("accepted request does not re-encode to itself")
		}
	})
}
