package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
)

// maxLine bounds a request line; longer lines end the connection.
const maxLine = 64 << 10

// tcpServer answers every request line with "seq=N <line>", N counting
// requests over all connections, so a lost or replayed reply is visible.
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
	for sc.Scan() {
		line := sc.Bytes()
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		out = fmt.Appendf(out[:0], "seq=%d %s\n", s.seq.Add(1), line)
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}
