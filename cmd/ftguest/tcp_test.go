package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/ftctl/ftctl/pkg/checker"
)

// startTCP runs the tcp workload on listen and returns its address and a
// stop function that waits for the exit code.
func startTCP(t *testing.T, listen string) (string, func() int) {
	t.Helper()
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"-run", "tcp", "-listen", listen}, "", &out) }()
	addr := out.waitFor(t, regexp.MustCompile(`ftguest tcp listening addr=(\S+)`))[1]
	out.waitFor(t, regexp.MustCompile(`ftguest ready run=tcp`))
	stopped := false
	var code int
	stop := func() int {
		if !stopped {
			stopped = true
			cancel()
			select {
			case code = <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("tcp workload did not stop on cancel")
			}
		}
		return code
	}
	t.Cleanup(func() { stop() })
	return addr, stop
}

func TestTCPChecksummedReplies(t *testing.T) {
	addr, _ := startTCP(t, "127.0.0.1:0")
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	ask := func(c net.Conn, r *bufio.Reader, line string) string {
		t.Helper()
		if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
			t.Fatal(err)
		}
		reply, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return reply
	}
	// The chain as the protocol documents it, computed without checker.
	chain := func(prev uint64, line string) uint64 {
		return xxhash.Sum64(append(binary.BigEndian.AppendUint64(nil, prev), line...))
	}

	sc, sr := dial()
	if got := ask(sc, sr, checker.Hello); got != checker.HelloReply+"\n" {
		t.Fatalf("hello answered %q", got)
	}
	pc, pr := dial() // a plain client on the same server shares the seq
	var sum uint64
	seq := 0
	for i, line := range []string{"first", "", "x y z\r", checker.Hello, strings.Repeat("long", 1000)} {
		seq++
		sum = chain(sum, strings.TrimSuffix(line, "\r"))
		want := fmt.Sprintf("seq=%d sum=%016x %s\n", seq, sum, strings.TrimSuffix(line, "\r"))
		if got := ask(sc, sr, line); got != want {
			t.Fatalf("request %d: %.100q, want %.100q", i, got, want)
		}
		seq++
		if got, want := ask(pc, pr, "plain"), fmt.Sprintf("seq=%d plain\n", seq); got != want {
			t.Fatalf("plain client: %q, want %q", got, want)
		}
	}
	// A second checksummed connection starts its own chain at 0.
	sc2, sr2 := dial()
	ask(sc2, sr2, checker.Hello)
	if got, want := ask(sc2, sr2, "first"), fmt.Sprintf("seq=%d sum=%016x first\n", seq+1, chain(0, "first")); got != want {
		t.Fatalf("second connection: %q, want %q", got, want)
	}
}

func TestTCPServerBoundsConnections(t *testing.T) {
	// Connections beyond maxConns would need thousands of sockets here;
	// check the bound on a server with a small one instead.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tcpServer{con: &console{w: &syncBuffer{}}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.serveLimit(ctx, ln, 3) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	var open []net.Conn
	for i := range 3 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "c%d\n", i)
		if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		open = append(open, c)
	}
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "one too many\n")
	if reply, err := bufio.NewReader(c).ReadString('\n'); err == nil {
		t.Fatalf("connection over the bound answered %q", reply)
	}
	// Closing one makes room again.
	open[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "again\n")
		reply, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err == nil {
			if !strings.HasSuffix(reply, " again\n") {
				t.Fatalf("reply %q", reply)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no room after a connection closed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runChecker runs a checker against addr until until holds, for at most
// 30 s, and returns it stopped, with Run's error.
func runChecker(t *testing.T, addr string, until func(checker.Report) bool) (*checker.Checker, error) {
	t.Helper()
	c, err := checker.New(checker.Config{Addr: addr, Interval: 5 * time.Millisecond, Timeout: 5 * time.Second, ShortConns: 4})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	deadline := time.Now().Add(30 * time.Second)
	for !until(c.Snapshot()) {
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatalf("condition not reached:\n%s", c.Snapshot())
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	return c, <-done
}

func TestCheckerFindsNoViolationOnTheRealService(t *testing.T) {
	addr, _ := startTCP(t, "127.0.0.1:0")
	var mid time.Time
	var shortAtMid uint64
	c, err := runChecker(t, addr, func(r checker.Report) bool {
		if mid.IsZero() && r.LongAcked >= 20 {
			mid, shortAtMid = time.Now(), r.ShortDone
		}
		// Verify needs a short connection opened after mid: at most
		// ShortConns (4) opened before it complete after it.
		return !mid.IsZero() && r.LongAcked >= 80 && r.ShortDone >= 30 && r.ShortDone > shortAtMid+4
	})
	r := c.Snapshot()
	if err != nil || len(r.Errors) != 0 || r.LongConns != 1 || r.Acked < 80+30 {
		t.Fatalf("Run: %v\n%s%v", err, r, r.Events)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fo, err := c.Verify(ctx, mid)
	if err != nil || fo.FirstAckAfter.Seq <= fo.LastAckBefore.Seq {
		t.Fatalf("Verify: %+v %v", fo, err)
	}
	t.Logf("%s", r)
}

// A guest restarted without protection loses its connections and its
// counter: the checker must say so, with the right sentinels.
func TestCheckerCatchesAnUnprotectedRestart(t *testing.T) {
	addr, stop := startTCP(t, "127.0.0.1:0")
	c, err := checker.New(checker.Config{Addr: addr, Interval: 5 * time.Millisecond, Timeout: 5 * time.Second, ShortConns: 2})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitReport := func(what string, ok func(checker.Report) bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !ok(c.Snapshot()) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not reached:\n%s", what, c.Snapshot())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// Enough requests that the restarted server's counter stays below
	// what the client saw.
	waitReport("warm up", func(r checker.Report) bool { return r.LongAcked >= 100 })
	since := time.Now()
	if code := stop(); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	startTCP(t, addr) // same port, fresh state: seq starts at 1 again
	waitReport("restart seen", func(r checker.Report) bool {
		return r.LongReset && r.Errors[checker.KindReplayed] > 0 && r.LongConns >= 2
	})
	err = c.Snapshot().Err()
	if !errors.Is(err, checker.ErrReset) || !errors.Is(err, checker.ErrReplayed) {
		t.Fatalf("Err %v, want reset and replayed", err)
	}
	vctx, vcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer vcancel()
	_, err = c.Verify(vctx, since)
	if !errors.Is(err, checker.ErrReset) {
		t.Fatalf("Verify: %v, want ErrReset", err)
	}
	t.Logf("Verify: %v", err)
}
