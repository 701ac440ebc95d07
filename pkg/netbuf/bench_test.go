package netbuf

import (
	"bufio"
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// benchPath is one way for guest frames to reach the host port.
type benchPath struct {
	q      net.Conn // the fake QEMU's end
	world  Port     // where frames come out
	before func()   // per frame, after sending: the coordinator's part
	close  func()
}

// rawPath is the baseline: one goroutine reads QEMU's stream and writes each
// frame straight to the host port, with no buffer in between.
func rawPath(b *testing.B) *benchPath {
	qEnd, agentEnd := unixPair(b)
	host, world := Pipe()
	go func() {
		br := bufio.NewReaderSize(agentEnd, guestReadBuffer)
		var hdr [HeaderSize]byte
		for {
			f, err := readStreamFrame(br, &hdr)
			if err != nil {
				return
			}
			if host.WriteFrame(context.Background(), f) != nil {
				return
			}
		}
	}()
	return &benchPath{q: qEnd, world: world, close: func() {
		qEnd.Close()
		agentEnd.Close()
		host.Close()
		world.Close()
	}}
}

// bufferPath runs frames through a Buffer, in passthrough or held mode.
func bufferPath(b *testing.B, passthrough bool) *benchPath {
	host, world := Pipe()
	buf, err := New(filepath.Join(b.TempDir(), "bench.sock"), host, Options{})
	if err != nil {
		b.Fatal(err)
	}
	go buf.Serve(context.Background())
	buf.SetPassthrough(passthrough)
	q, err := net.Dial("unix", buf.Addr())
	if err != nil {
		b.Fatal(err)
	}
	p := &benchPath{q: q, world: world, close: func() {
		q.Close()
		buf.Close()
		host.Close()
		world.Close()
	}}
	if !passthrough {
		var epoch uint64
		p.before = func() {
			// The coordinator's part: on the trigger, seal and release.
			<-buf.Outbound()
			epoch++
			buf.Seal(epoch)
			buf.Release(epoch)
		}
	}
	return p
}

func unixPair(b *testing.B) (net.Conn, net.Conn) {
	ln, err := net.Listen("unix", filepath.Join(b.TempDir(), "pair.sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	rc := make(chan res, 1)
	go func() { c, err := ln.Accept(); rc <- res{c, err} }()
	c1, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	r := <-rc
	if r.err != nil {
		b.Fatal(r.err)
	}
	return c1, r.c
}

// latency sends n frames one at a time, each after the previous one came
// out, and returns the mean time per frame.
func (p *benchPath) latency(b *testing.B, n int, size int) time.Duration {
	wire := appendStreamFrame(nil, mkFrame(1, size))
	buf := make([]byte, MaxFrameSize)
	ctx := context.Background()
	start := time.Now()
	for i := 0; i < n; i++ {
		if _, err := p.q.Write(wire); err != nil {
			b.Fatal(err)
		}
		if p.before != nil {
			p.before()
		}
		if _, err := p.world.ReadFrame(ctx, buf); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start) / time.Duration(n)
}

// throughput streams n frames and returns bytes per second.
func (p *benchPath) throughput(b *testing.B, n int, size int) float64 {
	wire := appendStreamFrame(nil, mkFrame(1, size))
	go func() {
		for i := 0; i < n; i++ {
			if _, err := p.q.Write(wire); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, MaxFrameSize)
	ctx := context.Background()
	start := time.Now()
	for i := 0; i < n; i++ {
		if _, err := p.world.ReadFrame(ctx, buf); err != nil {
			b.Fatal(err)
		}
	}
	return float64(n*size) / time.Since(start).Seconds()
}

// BenchmarkFrameLatency reports the time one 1514-byte guest frame takes
// from QEMU's socket to the host port: raw copy (baseline), through the
// buffer in passthrough, and held with a Seal+Release per frame; with the
// ratios to the baseline measured in the same run.
func BenchmarkFrameLatency(b *testing.B) {
	const size = 1514
	raw, pass, held := rawPath(b), bufferPath(b, true), bufferPath(b, false)
	defer raw.close()
	defer pass.close()
	defer held.close()
	// Warm up every path once.
	raw.latency(b, 10, size)
	pass.latency(b, 10, size)
	held.latency(b, 10, size)
	b.ResetTimer()
	var tr, tp, th time.Duration
	for b.Loop() {
		tr += raw.latency(b, 1, size)
		tp += pass.latency(b, 1, size)
		th += held.latency(b, 1, size)
	}
	n := time.Duration(max(b.N, 1))
	b.ReportMetric(float64(tr/n), "raw-ns/frame")
	b.ReportMetric(float64(tp/n), "pass-ns/frame")
	b.ReportMetric(float64(th/n), "held-ns/frame")
	b.ReportMetric(float64(tp)/float64(tr), "pass/raw")
	b.ReportMetric(float64(th)/float64(tr), "held/raw")
}

// BenchmarkThroughput streams 1514-byte frames: raw copy versus the buffer
// in passthrough, as a ratio in the same run.
func BenchmarkThroughput(b *testing.B) {
	const size = 1514
	const perRound = 2000
	var rawBps, passBps float64
	for b.Loop() {
		raw := rawPath(b)
		rawBps += raw.throughput(b, perRound, size)
		raw.close()
		pass := bufferPath(b, true)
		passBps += pass.throughput(b, perRound, size)
		pass.close()
	}
	n := float64(max(b.N, 1))
	b.ReportMetric(rawBps/n/1e6, "raw-MB/s")
	b.ReportMetric(passBps/n/1e6, "pass-MB/s")
	b.ReportMetric(passBps/rawBps, "pass/raw")
}
