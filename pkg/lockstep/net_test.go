package lockstep_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/netbuf"
	"github.com/ftctl/ftctl/pkg/testbed"
	"github.com/ftctl/ftctl/pkg/vm"
)

// requireNet skips unless the test can create namespaces and taps.
func requireNet(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("needs /dev/net/tun:", err)
	}
}

// tapName is the guest NIC's tap on host A (its own namespace: no clash).
const tapName = "ftls0"

// tapWrite is one guest frame handed to the tap, stamped when the write
// began: the earliest moment it could have been seen outside.
type tapWrite struct {
	at    time.Time
	frame []byte
}

// tapRecorder is the buffer's host port with a capture of every frame
// written to it.
type tapRecorder struct {
	netbuf.Port
	mu     sync.Mutex
	writes []tapWrite
}

func (r *tapRecorder) WriteFrame(ctx context.Context, f []byte) error {
	at := time.Now()
	err := r.Port.WriteFrame(ctx, f)
	if err == nil {
		r.mu.Lock()
		r.writes = append(r.writes, tapWrite{at, bytes.Clone(f)})
		r.mu.Unlock()
	}
	return err
}

func (r *tapRecorder) snapshot() []tapWrite {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]tapWrite(nil), r.writes...)
}

func (r *tapRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.writes)
}

type sealRec struct {
	epoch  uint64
	frames int
}

type releaseRec struct {
	epoch uint64
	at    time.Time
}

// outputRecorder is the Output handed to the coordinator: the real buffer,
// with a record of what each Seal sealed and when each Release was called.
type outputRecorder struct {
	lockstep.Output
	mu       sync.Mutex
	seals    []sealRec
	releases []releaseRec
}

func (o *outputRecorder) Seal(n uint64) (int, int64) {
	frames, b := o.Output.Seal(n)
	o.mu.Lock()
	o.seals = append(o.seals, sealRec{n, frames})
	o.mu.Unlock()
	return frames, b
}

func (o *outputRecorder) Release(n uint64) {
	// Stamped before the buffer can act on it.
	o.mu.Lock()
	o.releases = append(o.releases, releaseRec{n, time.Now()})
	o.mu.Unlock()
	o.Output.Release(n)
}

func (o *outputRecorder) snapshot() ([]sealRec, []releaseRec) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]sealRec(nil), o.seals...), append([]releaseRec(nil), o.releases...)
}

// commitRecorder notes when each epoch committed on the secondary.
type commitRecorder struct {
	mu sync.Mutex
	at map[uint64]time.Time
}

func (c *commitRecorder) onCommit(s lockstep.CommitStats) {
	now := time.Now()
	c.mu.Lock()
	c.at[s.Manifest.Epoch] = now
	c.mu.Unlock()
}

func (c *commitRecorder) snapshot() map[uint64]time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[uint64]time.Time, len(c.at))
	for k, v := range c.at {
		m[k] = v
	}
	return m
}

// stallLink passes frames until stall is called; then Send blocks (the
// secondary receives nothing, so it commits and acknowledges nothing)
// until resume.
type stallLink struct {
	wire.Conn
	mu   sync.Mutex
	gate chan struct{} // nil: open
}

func (l *stallLink) Send(ctx context.Context, f wire.Frame) error {
	l.mu.Lock()
	g := l.gate
	l.mu.Unlock()
	if g != nil {
		select {
		case <-g:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return l.Conn.Send(ctx, f)
}

func (l *stallLink) stall() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.gate == nil {
		l.gate = make(chan struct{})
	}
}

func (l *stallLink) resume() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.gate != nil {
		close(l.gate)
		l.gate = nil
	}
}

// guestNet is a guest NIC's path to the world, on a testbed: the NIC's
// stream goes into a netbuf.Buffer whose host port is a tap (recorded)
// on host A's br-vm; the client runs in the bed's client namespace, across
// the bed's LAN switch. All of it is inside namespaces the bed made.
type guestNet struct {
	bed *testbed.Bed
	tap *netbuf.Tap
	rec *tapRecorder
	buf *netbuf.Buffer
	nic vm.NIC
	ip  netip.Prefix // the guest's address on the LAN
}

// newGuestNet builds the bed, the tap and the buffer (serving until the
// test ends). The buffer holds every guest frame from the start:
// passthrough is off unless passthrough is true (a baseline).
func newGuestNet(t testing.TB, ctx context.Context, passthrough bool) *guestNet {
	t.Helper()
	requireNet(t)
	bed, err := testbed.New(ctx, testbed.Options{Prefix: "ftls", Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := bed.Close(); err != nil {
			t.Errorf("close testbed: %v", err)
		}
	})
	g := &guestNet{bed: bed}
	if g.ip, err = bed.VMAddr(0); err != nil {
		t.Fatal(err)
	}
	mac, err := bed.VMMAC(0)
	if err != nil {
		t.Fatal(err)
	}
	g.tap, err = netbuf.OpenTap(tapName, netbuf.TapOptions{NetNS: bed.A.NetNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.tap.Close() })
	if err := bed.A.Attach(tapName); err != nil {
		t.Fatal(err)
	}
	g.rec = &tapRecorder{Port: g.tap}
	sock := filepath.Join(t.TempDir(), "nic.sock")
	g.buf, err = netbuf.New(sock, g.rec, netbuf.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	g.buf.SetPassthrough(passthrough)
	if st := g.buf.Stats(); st.Passthrough != passthrough {
		t.Fatalf("buffer passthrough %v, want %v", st.Passthrough, passthrough)
	}
	sctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- g.buf.Serve(sctx) }()
	t.Cleanup(func() {
		cancel()
		g.buf.Close()
		if err := <-served; err != nil {
			t.Errorf("buffer Serve: %v", err)
		}
	})
	g.nic = vm.NIC{Stream: sock, MAC: mac.String()}
	return g
}

// workload is the guest's kernel command line part: its TCP service on
// the bed's LAN.
func (g *guestNet) workload(extra string) string {
	return "ftguest.run=tcp ftguest.ip=" + g.ip.String() + " " + extra
}

// dial connects to the guest's TCP service from the client namespace.
func (g *guestNet) dial(ctx context.Context, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return g.bed.Client.Dial(ctx, "tcp", netip.AddrPortFrom(g.ip.Addr(), 7000).String())
}

// tapRx is the number of frames the tap has received (written into it).
func (g *guestNet) tapRx(t testing.TB) uint64 {
	t.Helper()
	h, err := netns.GetFromPath(g.bed.A.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	l, err := nh.LinkByName(tapName)
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().Statistics == nil {
		t.Fatalf("no statistics for %s", tapName)
	}
	return l.Attrs().Statistics.RxPackets
}

// client is a line-oriented client of the guest's TCP service.
type client struct {
	c   net.Conn
	r   *bufio.Reader
	seq int
}

func (c *client) send(line string) error {
	c.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_, err := fmt.Fprintf(c.c, "%s\n", line)
	return err
}

// expect reads the reply to the next request, which must carry the next
// sequence number and echo line.
func (c *client) expect(line string, wait time.Duration) error {
	c.c.SetReadDeadline(time.Now().Add(wait))
	got, err := c.r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("reply to %q: %w (read %q)", line, err, got)
	}
	c.seq++
	if want := fmt.Sprintf("seq=%d %s\n", c.seq, line); got != want {
		return fmt.Errorf("reply %q, want %q", got, want)
	}
	return nil
}

func (c *client) exchange(line string) (time.Duration, error) {
	t := time.Now()
	if err := c.send(line); err != nil {
		return 0, err
	}
	if err := c.expect(line, 30*time.Second); err != nil {
		return 0, err
	}
	return time.Since(t), nil
}

// TestOutputCommitThroughCoordinator: a protected guest's TCP service is
// used by a client in a testbed's client namespace, across its LAN, through
// the output-commit buffer and a real tap on host A's br-vm, with the real
// coordinator and secondary over TCP with mutual TLS. The capture
// proves that every guest frame that reached the tap belongs to an epoch
// the secondary had committed before the frame was written; the client's
// exchanges complete (replies are delayed, not lost). With the secondary
// stalled, no guest frame reaches the tap at all, and the held reply
// arrives once the secondary catches up.
func TestOutputCommitThroughCoordinator(t *testing.T) {
	requireNet(t)
	ctx := testenv.Deadline(t, 4*time.Minute)
	gn := newGuestNet(t, ctx, false)
	out := &outputRecorder{Output: gn.buf}
	commits := &commitRecorder{at: map[uint64]time.Time{}}
	var link *stallLink
	p := newPair(t, ctx, pairOptions{
		link: func(t *testing.T) (wire.Conn, wire.Conn) {
			a, b := tlsLink(t)
			link = &stallLink{Conn: a}
			return link, b
		},
		workload: gn.workload(""),
		nics:     []vm.NIC{gn.nic},
		primary: func(c *lockstep.PrimaryConfig) {
			c.Output = out
			// The stall below can catch the sender part way through an
			// epoch with two more queued behind it; a window of 4 keeps
			// the guest running (and answering, into the buffer) instead
			// of holding it paused, which would prove less.
			c.MaxInflight = 4
		},
		secondary: func(c *lockstep.SecondaryConfig) { c.OnCommit = commits.onCommit },
	})
	t.Cleanup(p.shutdown)
	guestMAC, err := net.ParseMAC(p.primary.Spec().NICs[0].MAC)
	if err != nil {
		t.Fatal(err)
	}
	p.waitResumable(ctx)

	conn, err := gn.dial(ctx, time.Minute)
	if err != nil {
		t.Fatalf("connect to the protected guest: %v", err)
	}
	defer conn.Close()
	cl := &client{c: conn, r: bufio.NewReader(conn)}
	var rtts []time.Duration
	for i := range 5 {
		d, err := cl.exchange(fmt.Sprintf("before-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		rtts = append(rtts, d)
	}
	t.Logf("protected exchanges answered in %v", rtts)

	// Stall the secondary. Epochs already on their way may still commit
	// and release their frames; wait until every epoch sent has been
	// acknowledged and its frames written, then nothing more may go out.
	link.stall()
	settle := time.Now().Add(30 * time.Second)
	for {
		st, bs := p.prim.Stats(), gn.buf.Stats()
		if st.Acked == st.Sent && bs.QueuedFrames == 0 {
			break
		}
		if time.Now().After(settle) {
			t.Fatalf("in-flight epochs did not settle: %+v %+v", st, bs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // let a late ACK show itself
	stalledAt := p.prim.Stats()
	written := gn.rec.count()
	guestFrames := gn.buf.Stats().GuestFrames
	if err := cl.send("during-stall"); err != nil {
		t.Fatal(err)
	}
	// The guest answers (its frames reach the buffer) ...
	answered := time.Now().Add(30 * time.Second)
	for gn.buf.Stats().GuestFrames == guestFrames {
		if time.Now().After(answered) {
			t.Fatalf("the guest never answered during the stall: %+v", gn.buf.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// ... but nothing of it, or of anything else, reaches the tap.
	conn.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
	if got, err := cl.r.ReadString('\n'); !errors.Is(err, os.ErrDeadlineExceeded) || got != "" {
		t.Fatalf("client read %q (err %v) while the secondary was stalled", got, err)
	}
	if n := gn.rec.count(); n != written {
		t.Fatalf("%d guest frames reached the tap while the secondary was stalled", n-written)
	}
	bs := gn.buf.Stats()
	if bs.HeldFrames == 0 {
		t.Fatalf("stalled: no guest frame held although the guest answered: %+v", bs)
	}
	if st := p.prim.Stats(); st.Acked != stalledAt.Acked {
		t.Fatalf("epoch %d acknowledged while the secondary was stalled at %d", st.Acked, stalledAt.Acked)
	}
	t.Logf("stalled at epoch %d: %d guest frames held, none on the tap", stalledAt.Acked, bs.HeldFrames)

	// The secondary catches up: the held reply arrives, delayed, not lost.
	link.resume()
	if err := cl.expect("during-stall", 30*time.Second); err != nil {
		t.Fatalf("after the stall: %v", err)
	}
	for i := range 3 {
		if _, err := cl.exchange(fmt.Sprintf("after-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	conn.Close()

	// Settle, then check the capture. Writes are read before the seals and
	// commits: everything a recorded frame depends on is then recorded.
	if _, _, err := p.prim.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	for drained := time.Now().Add(30 * time.Second); gn.buf.Stats().QueuedFrames != 0; {
		if time.Now().After(drained) {
			t.Fatalf("released frames never reached the tap: %+v", gn.buf.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	writes := gn.rec.snapshot()
	seals, releases := out.snapshot()
	committed := commits.snapshot()
	if rx := gn.tapRx(t); rx != uint64(len(writes)) {
		t.Fatalf("the tap received %d frames, the capture has %d", rx, len(writes))
	}
	checkOutputCommit(t, writes, seals, releases, committed, guestMAC)
	if len(writes) < 20 {
		t.Fatalf("only %d guest frames reached the tap; 9 TCP exchanges need more", len(writes))
	}
	t.Logf("%d guest frames in %d sealed epochs, each on the tap only after its epoch committed; stats %+v",
		len(writes), len(seals), p.prim.Stats())
}

// checkOutputCommit asserts invariant 1 on a capture. Frames leave the
// buffer in order, so the k-th frame written belongs to the epoch whose
// cumulative Seal count first exceeds k.
func checkOutputCommit(t *testing.T, writes []tapWrite, seals []sealRec, releases []releaseRec, committed map[uint64]time.Time, mac net.HardwareAddr) {
	t.Helper()
	k := 0
	for _, s := range seals {
		if s.frames == 0 || k == len(writes) {
			continue
		}
		commitAt, ok := committed[s.epoch]
		if !ok {
			t.Fatalf("frame %d of epoch %d reached the tap, but epoch %d never committed", k, s.epoch, s.epoch)
		}
		var rel *releaseRec
		for i := range releases {
			if releases[i].epoch >= s.epoch {
				rel = &releases[i]
				break
			}
		}
		if rel == nil {
			t.Fatalf("frame %d of epoch %d reached the tap, but no Release covered it", k, s.epoch)
		}
		if rel.at.Before(commitAt) {
			t.Fatalf("epoch %d released (by Release(%d)) %v before it committed", s.epoch, rel.epoch, commitAt.Sub(rel.at))
		}
		for i := 0; i < s.frames && k < len(writes); i, k = i+1, k+1 {
			w := writes[k]
			if !w.at.After(commitAt) {
				t.Fatalf("frame %d of epoch %d reached the tap %v before the epoch committed", k, s.epoch, commitAt.Sub(w.at))
			}
			if w.at.Before(rel.at) {
				t.Fatalf("frame %d of epoch %d reached the tap before its Release", k, s.epoch)
			}
			if len(w.frame) < 14 || !bytes.Equal(w.frame[6:12], mac) {
				t.Fatalf("frame %d on the tap is not from the guest (%x)", k, w.frame[:min(len(w.frame), 14)])
			}
		}
	}
	if k != len(writes) {
		t.Fatalf("%d frames reached the tap but only %d were ever sealed", len(writes), k)
	}
}

// shutdown stops the coordinator and the receiver and waits for both to
// return, so that newPair's cleanups (closing the replica) do not race
// with a Run still finishing. Register it with t.Cleanup after newPair.
func (p *pair) shutdown() {
	if p.cancel == nil {
		return
	}
	p.cancel()
	for name, ch := range map[string]chan struct{}{"primary": p.primDone, "secondary": p.secDone} {
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			p.t.Errorf("%s Run did not return after cancel", name)
		}
	}
}
