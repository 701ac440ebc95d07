package failover

import (
	"context"
	"crypto/sha256"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// hbSample is one configuration's heartbeat figures.
type hbSample struct {
	name                string
	p50, p99, p999, max time.Duration // RTT
	gapP99, gapMax      time.Duration // between consecutive pongs
	interval            time.Duration
	sent, got           uint64
}

// measureHeartbeats runs a client against a server for n pongs at the
// given interval and collects RTTs and inter-arrival gaps.
func measureHeartbeats(b *testing.B, name string, server, client net.PacketConn, interval time.Duration, n int) hbSample {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := NewHeartbeatServer(server, HeartbeatServerConfig{Key: testKey})
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(ctx)
	var mu sync.Mutex
	var rtts, gaps []time.Duration
	var last time.Time
	done := make(chan struct{})
	c, err := NewHeartbeatClient(client, s.Addr(), HeartbeatClientConfig{Key: testKey, Interval: interval, Heard: func(rtt time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		if !last.IsZero() {
			gaps = append(gaps, now.Sub(last))
		}
		last = now
		rtts = append(rtts, rtt)
		if len(rtts) == n {
			close(done)
		}
	}})
	if err != nil {
		b.Fatal(err)
	}
	go c.Run(ctx)
	select {
	case <-done:
	case <-time.After(time.Duration(n)*interval*3 + 10*time.Second):
		b.Fatalf("%s: only %d of %d pongs", name, len(rtts), n)
	}
	cancel()
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(rtts)
	slices.Sort(gaps)
	q := func(v []time.Duration, f float64) time.Duration { return v[min(len(v)-1, int(f*float64(len(v))))] }
	st := c.Stats()
	return hbSample{name: name, interval: interval,
		p50: q(rtts, .5), p99: q(rtts, .99), p999: q(rtts, .999), max: rtts[len(rtts)-1],
		gapP99: q(gaps, .99), gapMax: gaps[len(gaps)-1], sent: st.Sent, got: st.Accepted}
}

// cpuLoad keeps every CPU busy hashing (as the agent's page comparison
// and compression would) until stop is closed.
func cpuLoad(stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			for {
				select {
				case <-stop:
					return
				default:
					sha256.Sum256(buf)
				}
			}
		}()
	}
	return &wg
}

// BenchmarkHeartbeatRTT measures the management heartbeat's RTT and the
// gaps between pongs, over loopback and over a veth pair between two
// namespaces, idle and with every CPU busy in the same process. The
// defaults (DefaultInterval, DefaultTimeout) come from these figures.
// Run with: go test -run - -bench HeartbeatRTT -benchtime 1x ./pkg/failover
func BenchmarkHeartbeatRTT(b *testing.B) {
	const interval, n = 10 * time.Millisecond, 500
	udp := func(ns, addr string) net.PacketConn { return listenUDPIn(b, ns, addr) }
	var out []hbSample
	for _, loaded := range []bool{false, true} {
		var stop chan struct{}
		var wg *sync.WaitGroup
		if loaded {
			stop = make(chan struct{})
			wg = cpuLoad(stop)
		}
		suffix := map[bool]string{false: "idle", true: "cpu-loaded"}[loaded]
		out = append(out, measureHeartbeats(b, "loopback/"+suffix, udp("", "127.0.0.1:0"), udp("", "127.0.0.1:0"), interval, n))
		if l := newLANForBench(b); l != nil {
			out = append(out, measureHeartbeats(b, "veth/"+suffix, udp(l.nsA, lanIPA+":0"), udp(l.nsB, lanIPB+":0"), interval, n))
		}
		if loaded {
			close(stop)
			wg.Wait()
		}
	}
	base := out[0]
	for _, s := range out {
		b.Logf("%-20s rtt p50 %8v p99 %8v p99.9 %8v max %8v | gap p99 %8v max %8v (interval %v) | pongs %d/%d | p99 rtt ×%.1f of loopback/idle",
			s.name, s.p50, s.p99, s.p999, s.max, s.gapP99, s.gapMax, s.interval, s.got, s.sent, float64(s.p99)/float64(base.p99))
		b.ReportMetric(float64(s.p99.Microseconds()), s.name+"-rtt-p99-µs")
		b.ReportMetric(float64((s.gapMax - s.interval).Microseconds()), s.name+"-gap-jitter-max-µs")
	}
	b.ReportMetric(0, "ns/op")
}

func newLANForBench(b *testing.B) *lan {
	if !canNetns() {
		b.Log("skipping the veth measurement: needs root")
		return nil
	}
	return newLAN(b)
}

func canNetns() bool { return os.Geteuid() == 0 }
