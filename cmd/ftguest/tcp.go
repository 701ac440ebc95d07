package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/ftctl/ftctl/pkg/checker"
)

// maxLine bounds a request line; longer lines end the connection.
const maxLine = checker.MaxLine

// maxConns bounds open connections, so a client leaking them cannot take
// the guest's memory; connections beyond it are closed at once.
const maxConns = 4096

// tcpServer answers every request line with "seq=N <line>", N counting
// requests over all connections, so a lost or replayed reply is visible.
// A connection that opens with checker.Hello gets checker's checksummed
// replies instead, "seq=N sum=H <line>", H chaining every line the
// connection sent (checker.NextSum), so its client can tell that the
// server holds exactly its requests, in order, also after a failover.
type tcpServer struct {
	con  *console
	addr string
	seq  atomic.Uint64
}

func (s *tcpServer) name() string { return "tcp" }

func (s *tcpServer) start(context.Context) (func(context.Context) error, error) {
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return nil, err
	}
	s.con.printf("ftguest tcp listening addr=%s", ln.Addr())
	return func(ctx context.Context) error { return s.serve(ctx, ln) }, nil
}

func (s *tcpServer) serve(ctx context.Context, ln net.Listener) error {
	return s.serveLimit(ctx, ln, maxConns)
}

// serveLimit serves ln until ctx ends, with at most limit connections open.
func (s *tcpServer) serveLimit(ctx context.Context, ln net.Listener, limit int) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		mu.Lock()
		if ctx.Err() != nil {
			mu.Unlock()
			c.Close()
			return nil
		}
		if len(conns) >= limit {
			mu.Unlock()
			c.Close()
			continue
		}
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Go(func() {
			s.handle(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		})
	}
}

func (s *tcpServer) handle(c net.Conn) {
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), maxLine)
	var out []byte
	first, summed := true, false
	var sum uint64
	for sc.Scan() {
		line := sc.Bytes()
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		switch {
		case first && string(line) == checker.Hello:
			summed = true
			out = append(out[:0], checker.HelloReply+"\n"...)
		case summed:
			sum = checker.NextSum(sum, line)
			out = checker.AppendReply(out[:0], s.seq.Add(1), sum, line)
		default:
			out = fmt.Appendf(out[:0], "seq=%d %s\n", s.seq.Add(1), line)
		}
		first = false
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}
