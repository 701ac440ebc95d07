package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// rawClient is the baseline: the least a synchronous QMP client must do per
// command (encode, write, read a line, decode), with no ids to match, no
// reader goroutine and no events.
type rawClient struct {
	conn net.Conn
	r    *bufio.Reader
}

func (r *rawClient) call(command string) error {
	b, _ := json.Marshal(map[string]any{"execute": command})
	if _, err := r.conn.Write(append(b, '\n')); err != nil {
		return err
	}
	for {
		line, err := r.r.ReadBytes('\n')
		if err != nil {
			return err
		}
		var m struct {
			Return json.RawMessage `json:"return"`
			Event  string          `json:"event"`
		}
		if err := json.Unmarshal(line, &m); err != nil {
			return err
		}
		if m.Event == "" {
			return nil
		}
	}
}

// echoServe answers every request on conn with an empty return and its id.
func echoServe(conn net.Conn) {
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var req struct {
			ID json.RawMessage `json:"id"`
		}
		json.Unmarshal(line, &req)
		reply := `{"return": {}}`
		if len(req.ID) > 0 {
			reply = `{"return": {}, "id": ` + string(req.ID) + `}`
		}
		if _, err := conn.Write([]byte(reply + "\r\n")); err != nil {
			return
		}
	}
}

// measureRatio runs raw and client round trips alternately b.N times and
// reports each one's mean and the client's cost relative to the baseline.
func measureRatio(b *testing.B, raw func() error, client func() error) {
	var rawT, cliT time.Duration
	b.ResetTimer()
	for b.Loop() {
		t0 := time.Now()
		if err := raw(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := client(); err != nil {
			b.Fatal(err)
		}
		rawT += t1.Sub(t0)
		cliT += time.Since(t1)
	}
	n := float64(b.N)
	b.ReportMetric(float64(rawT.Nanoseconds())/n, "raw-ns/op")
	b.ReportMetric(float64(cliT.Nanoseconds())/n, "client-ns/op")
	b.ReportMetric(float64(cliT)/float64(rawT), "client/raw")
}

// BenchmarkRoundTripFake compares one command round trip through Client with
// the raw baseline, both against the same echo server over unix sockets.
func BenchmarkRoundTripFake(b *testing.B) {
	rc, rs := unixPair(b)
	go echoServe(rs)
	raw := &rawClient{conn: rc, r: bufio.NewReader(rc)}

	cc, cs := unixPair(b)
	go func() {
		cs.Write([]byte(testGreeting + "\r\n"))
		echoServe(cs)
	}()
	c, err := New(ctxT(b, 10*time.Second), cc)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	measureRatio(b, func() error { return raw.call("x") },
		func() error { return c.Execute(ctx, "x", nil, nil) })
}

// BenchmarkParallelFake measures Client throughput with concurrent callers
// on one connection (the raw baseline cannot do this at all).
func BenchmarkParallelFake(b *testing.B) {
	cc, cs := unixPair(b)
	go func() {
		cs.Write([]byte(testGreeting + "\r\n"))
		echoServe(cs)
	}()
	c, err := New(ctxT(b, 10*time.Second), cc)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			if err := c.Execute(ctx, "x", nil, nil); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkQueryStatusQEMU compares query-status through Client with the raw
// baseline on a second monitor of the same QEMU.
func BenchmarkQueryStatusQEMU(b *testing.B) {
	dir := b.TempDir()
	sock2 := filepath.Join(dir, "raw.sock")
	if len(sock2) > 100 {
		b.Skip("temp dir path too long for a unix socket")
	}
	p := startQEMU(b, "-qmp", "unix:"+sock2+",server=on,wait=off")
	c := p.dial(b)
	conn, err := net.Dial("unix", sock2)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	raw := &rawClient{conn: conn, r: bufio.NewReader(conn)}
	if _, err := raw.r.ReadBytes('\n'); err != nil { // greeting
		b.Fatal(err)
	}
	if err := raw.call("qmp_capabilities"); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	var out json.RawMessage
	measureRatio(b, func() error { return raw.call("query-status") },
		func() error { return c.Execute(ctx, "query-status", nil, &out) })
	if len(out) == 0 {
		b.Fatal("no reply decoded")
	}
}
