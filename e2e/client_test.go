package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/testbed"
)

// vmClient uses the guest's TCP service from the bed's client namespace:
// one long-lived connection and short ones. The service numbers every
// reply over all connections ("seq=N line"), so the ledger of replies
// the client received shows a reply lost, repeated or invented across a
// failover.
type vmClient struct {
	bed  *testbed.Bed
	addr string

	mu     sync.Mutex
	long   net.Conn
	longR  *bufio.Reader
	n      int
	ledger []uint64 // seq of every reply received, in order
	// lostReq counts requests sent whose reply never came (a connection
	// that broke): the service may have counted them, so a gap in the
	// ledger is then no proof of loss.
	lostReq int
}

func newVMClient(t *testing.T, c *cluster) *vmClient {
	t.Helper()
	a, err := c.bed.VMAddr(0)
	if err != nil {
		t.Fatal(err)
	}
	vc := &vmClient{bed: c.bed, addr: netip.AddrPortFrom(a.Addr(), 7000).String()}
	t.Cleanup(vc.close)
	return vc
}

func (vc *vmClient) close() {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	if vc.long != nil {
		vc.long.Close()
		vc.long = nil
	}
}

var replyRE = regexp.MustCompile(`^seq=(\d+) (.*)\n$`)

// exchange sends one line on conn and reads its reply.
func (vc *vmClient) exchange(c net.Conn, r *bufio.Reader, wait time.Duration) (uint64, error) {
	line, err := vc.send(c, wait)
	if err != nil {
		return 0, err
	}
	return vc.receive(r, c, line, wait)
}

// send sends the next request line on c.
func (vc *vmClient) send(c net.Conn, wait time.Duration) (string, error) {
	vc.n++
	line := fmt.Sprintf("req-%d", vc.n)
	c.SetDeadline(time.Now().Add(wait))
	if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
		vc.lostReq++
		return "", fmt.Errorf("send %q: %w", line, err)
	}
	return line, nil
}

// receive reads the reply to line.
func (vc *vmClient) receive(r *bufio.Reader, c net.Conn, line string, wait time.Duration) (uint64, error) {
	c.SetDeadline(time.Now().Add(wait))
	got, err := r.ReadString('\n')
	if err != nil {
		vc.lostReq++
		return 0, fmt.Errorf("reply to %q: %w (read %q)", line, err, got)
	}
	m := replyRE.FindStringSubmatch(got)
	if m == nil || m[2] != line {
		return 0, fmt.Errorf("reply %q to %q", got, line)
	}
	seq, _ := strconv.ParseUint(m[1], 10, 64)
	vc.ledger = append(vc.ledger, seq)
	return seq, nil
}

// connectLong opens the long-lived connection.
func (vc *vmClient) connectLong(ctx context.Context) error {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := vc.bed.Client.Dial(dctx, "tcp", vc.addr)
	if err != nil {
		return err
	}
	vc.long, vc.longR = c, bufio.NewReader(c)
	return nil
}

// onLong makes one exchange on the long-lived connection.
func (vc *vmClient) onLong(wait time.Duration) (uint64, error) {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	if vc.long == nil {
		return 0, fmt.Errorf("no long-lived connection")
	}
	return vc.exchange(vc.long, vc.longR, wait)
}

// sendLong sends a request on the long-lived connection without waiting
// for its reply (finishLong reads it).
func (vc *vmClient) sendLong() (string, error) {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	if vc.long == nil {
		return "", fmt.Errorf("no long-lived connection")
	}
	return vc.send(vc.long, time.Minute)
}

// finishLong reads the reply to a request sendLong sent.
func (vc *vmClient) finishLong(line string, wait time.Duration) (uint64, error) {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	return vc.receive(vc.longR, vc.long, line, wait)
}

// short makes one exchange on a new connection.
func (vc *vmClient) short(ctx context.Context, wait time.Duration) (uint64, error) {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	c, err := vc.bed.Client.Dial(dctx, "tcp", vc.addr)
	if err != nil {
		return 0, fmt.Errorf("connect %s: %w", vc.addr, err)
	}
	defer c.Close()
	return vc.exchange(c, bufio.NewReader(c), wait)
}

// shortUntil retries short exchanges until one succeeds or wait ends.
func (vc *vmClient) shortUntil(ctx context.Context, wait time.Duration) (uint64, time.Duration, error) {
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		seq, err := vc.short(ctx, 3*time.Second)
		if err == nil {
			return seq, time.Since(t0), nil
		}
		select {
		case <-ctx.Done():
			return 0, time.Since(t0), fmt.Errorf("the VM's service never answered a new connection within %v: %w", wait, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// checkLedger verifies the replies the client received: strictly
// increasing (nothing repeated or reordered), and without a gap unless a
// request was left unanswered.
func (vc *vmClient) checkLedger(t *testing.T) {
	t.Helper()
	vc.mu.Lock()
	defer vc.mu.Unlock()
	if len(vc.ledger) == 0 {
		t.Fatal("the client received no reply at all")
	}
	for i := 1; i < len(vc.ledger); i++ {
		prev, cur := vc.ledger[i-1], vc.ledger[i]
		if cur <= prev {
			t.Fatalf("reply %d has seq=%d after seq=%d: a reply the client had was repeated (ledger %v)", i, cur, prev, vc.ledger)
		}
		if cur != prev+1 && vc.lostReq == 0 {
			t.Fatalf("reply %d has seq=%d after seq=%d with no request unanswered: replies lost (ledger %v)", i, cur, prev, vc.ledger)
		}
	}
}
