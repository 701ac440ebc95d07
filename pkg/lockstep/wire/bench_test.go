package wire

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"
)

// benchEpoch is one 4 MiB epoch: a manifest, dirty pages in several frames,
// a device state like QEMU's (~360 KiB), and block events streamed out of
// band before it.
func benchEpoch() (types []Type, payloads [][]byte, total int) {
	add := func(t Type, n int) {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i*7 + n)
		}
		types, payloads, total = append(types, t), append(payloads, p), total+n
	}
	for range 4 {
		add(TypeBlock, 64<<10)
	}
	add(TypeManifest, 64)
	add(TypeDevState, 360<<10)
	for range 8 {
		add(TypeMemory, (4<<20-616<<10-64)/8)
	}
	return types, payloads, total
}

// runEpochs sends b.N epochs from a to b with at most two unacknowledged,
// as the coordinator does, and checks each arrives whole.
func runEpochs(b *testing.B, a, c Conn) {
	types, payloads, total := benchEpoch()
	b.SetBytes(int64(total))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	window := make(chan struct{}, 2)
	recvErr := make(chan error, 1)
	go func() {
		r := NewEpochReceiver(c)
		for range b.N {
			ep, oob, err := r.Next(ctx)
			for err == nil && oob != nil {
				ep, oob, err = r.Next(ctx)
			}
			if err == nil && len(ep.Frames) != len(types)-4 {
				err = fmt.Errorf("epoch %d has %d frames", ep.N, len(ep.Frames))
			}
			if err == nil {
				err = c.Send(ctx, Frame{Type: TypeAck, Epoch: ep.N})
			}
			if err != nil {
				recvErr <- err
				return
			}
		}
		recvErr <- nil
	}()
	ackErr := make(chan error, 1)
	go func() {
		for range b.N {
			if _, err := a.Recv(ctx); err != nil {
				ackErr <- err
				return
			}
			<-window
		}
		ackErr <- nil
	}()
	s := NewEpochSender(a)
	b.ResetTimer()
	for n := range b.N {
		window <- struct{}{}
		if err := s.Begin(uint64(n + 1)); err != nil {
			b.Fatal(err)
		}
		for i, t := range types {
			var err error
			if t.InEpoch() {
				err = s.Send(ctx, t, payloads[i])
			} else {
				err = a.Send(ctx, Frame{Type: t, Epoch: uint64(n + 1), Payload: payloads[i]})
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		if err := s.End(ctx); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-recvErr; err != nil {
		b.Fatal(err)
	}
	if err := <-ackErr; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
}

func rawTCPPair(b *testing.B) (Conn, Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	dialed := make(chan net.Conn, 1)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Error(err)
		}
		dialed <- c
	}()
	s, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	d := <-dialed
	if d == nil {
		b.FailNow()
	}
	cs, ss := newStreamConn(d, d), newStreamConn(s, s)
	cs.establish()
	ss.establish()
	return cs, ss
}

func tlsPair(b testing.TB) (Conn, Conn) {
	ca, err := NewCA("bench")
	if err != nil {
		b.Fatal(err)
	}
	creds := func(name string) *Credentials {
		cp, kp, err := ca.Issue(name, []string{"127.0.0.1"})
		if err != nil {
			b.Fatal(err)
		}
		cr, err := CredentialsFromPEM(ca.CertPEM(), cp, kp)
		if err != nil {
			b.Fatal(err)
		}
		return cr
	}
	ctx := context.Background()
	ln, err := Listen(ctx, "127.0.0.1:0", creds("secondary"))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   Conn
		err error
	}
	dialed := make(chan res, 1)
	go func() {
		c, err := Dial(ctx, ln.Addr().String(), creds("primary"))
		dialed <- res{c, err}
	}()
	s, err := ln.Accept(ctx)
	if err != nil {
		b.Fatal(err)
	}
	d := <-dialed
	if d.err != nil {
		b.Fatal(d.err)
	}
	return d.c, s
}

// BenchmarkEpochThroughput sends 4 MiB epochs over each transport and
// reports TLS and the pipe against raw TCP with the same framing, measured
// in the same run.
func BenchmarkEpochThroughput(b *testing.B) {
	nsPerOp := map[string]float64{}
	for _, tc := range []struct {
		name string
		pair func(*testing.B) (Conn, Conn)
	}{
		{"raw-tcp", rawTCPPair},
		{"tls-tcp", func(b *testing.B) (Conn, Conn) { return tlsPair(b) }},
		{"pipe", func(*testing.B) (Conn, Conn) { return Pipe(16) }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			a, c := tc.pair(b)
			defer a.Close()
			defer c.Close()
			runEpochs(b, a, c)
			nsPerOp[tc.name] = float64(b.Elapsed().Nanoseconds()) / float64(b.N)
		})
	}
	raw := nsPerOp["raw-tcp"]
	if raw == 0 {
		return
	}
	mibps := func(ns float64) float64 { return 4 / (ns / 1e9) }
	// Printed, not logged: a parent benchmark's log shows only with -v.
	fmt.Printf("4 MiB epochs: raw TCP %.0f MiB/s, TLS %.0f MiB/s (TLS/raw throughput %.2f), pipe %.0f MiB/s (pipe/raw %.2f)\n",
		mibps(raw), mibps(nsPerOp["tls-tcp"]), raw/nsPerOp["tls-tcp"], mibps(nsPerOp["pipe"]), raw/nsPerOp["pipe"])
}
