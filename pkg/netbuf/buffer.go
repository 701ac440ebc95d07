package netbuf

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
)

// DefaultMaxHeldBytes is the memory bound used when Options.MaxHeldBytes is
// zero: several epochs of a busy gigabit guest at Kemari-style epoch lengths.
const DefaultMaxHeldBytes = 32 << 20

// guestReadBuffer is how much of QEMU's stream is read ahead. Bytes read
// ahead but not yet decoded belong to no epoch yet, so they end up in a later
// one, which is the safe direction.
const guestReadBuffer = 64 << 10

// Options configure a Buffer.
type Options struct {
	// Logger receives connection events and protocol errors. Default: none.
	Logger *slog.Logger
	// MaxHeldBytes bounds the guest bytes the buffer keeps: held frames plus
	// released frames not yet written to the host port. When the bound is
	// reached the buffer stops reading QEMU's socket (back-pressure), so the
	// guest's NIC backs off; it never drops a frame and never releases one
	// early. The bound can be exceeded by at most one frame. 0 means
	// DefaultMaxHeldBytes; negative is an error.
	MaxHeldBytes int64
}

// Stats is a snapshot of a Buffer's counters.
type Stats struct {
	HeldFrames int   // guest frames waiting for Release (sealed or not)
	HeldBytes  int64 //
	OpenFrames int   // of which not yet sealed into an epoch
	OpenBytes  int64 //

	QueuedFrames int   // released (or passed through), not yet written to the host port
	QueuedBytes  int64 //

	GuestFrames     uint64 // frames read from QEMU
	SentFrames      uint64 // guest frames written to the host port
	SentBytes       uint64 //
	HostWriteErrors uint64 // guest frames the host port refused (lost like on a wire)
	DiscardedFrames uint64 // held frames dropped by Discard or Close

	InboundFrames  uint64 // world-to-guest frames written to QEMU
	InboundDropped uint64 // world-to-guest frames with no QEMU to take them

	Connections        uint64 // QEMU connections accepted
	StreamErrors       uint64 // connections dropped for a malformed stream
	BackpressureStalls uint64 // times reading QEMU paused at MaxHeldBytes

	LastSealed   uint64        // highest epoch sealed
	LastReleased uint64        // highest epoch released
	MaxHold      time.Duration // longest a frame waited from arrival to Release

	Connected   bool
	Passthrough bool
}

// epoch is a run of consecutive guest frames that share an epoch number.
type epoch struct {
	n      uint64
	frames [][]byte
	bytes  int64
	first  time.Time // arrival of the oldest frame
}

func (e *epoch) add(f []byte) {
	if len(e.frames) == 0 {
		e.first = time.Now()
	}
	e.frames = append(e.frames, f)
	e.bytes += int64(len(f))
}

// Buffer is the output-commit buffer of one guest NIC. Its methods are safe
// for concurrent use.
type Buffer struct {
	log  *slog.Logger
	host Port
	max  int64
	ln   *net.UnixListener
	path string

	served   chan struct{} // closed when Serve has returned
	ctx      context.Context
	cancel   context.CancelFunc
	outbound chan struct{}
	wg       sync.WaitGroup

	mu   sync.Mutex
	cond *sync.Cond // any change to buffered, outq, conn, closed

	open       epoch   // guest frames since the last Seal
	sealed     []epoch // sealed epochs awaiting Release, oldest first
	anySealed  bool
	outq       [][]byte // released frames on their way to the host port
	outFrames  int      // outq plus the batch egress is writing: what Stats reports as queued
	outBytes   int64
	buffered   int64 // open + sealed + outq bytes: what MaxHeldBytes bounds
	pass       bool
	conn       *guestConn
	serving    bool
	closed     bool
	st         Stats
	closeOnce  sync.Once
	writeWarns uint64
}

// guestConn is one QEMU connection.
type guestConn struct {
	c    *net.UnixConn
	once sync.Once
}

func (g *guestConn) close() { g.once.Do(func() { g.c.Close() }) }

// New listens on guestSock (a unix socket path) for QEMU's stream netdev
// and bridges it to host. A stale socket file at guestSock is replaced; any
// other existing file is an error. The socket is made accessible to its
// owner only. The caller keeps ownership of host: Close does not close it.
func New(guestSock string, host Port, o Options) (*Buffer, error) {
	if guestSock == "" {
		return nil, fmt.Errorf("%w: guest socket path is empty", ErrInvalidOptions)
	}
	if host == nil {
		return nil, fmt.Errorf("%w: host port is nil", ErrInvalidOptions)
	}
	if o.MaxHeldBytes < 0 {
		return nil, fmt.Errorf("%w: MaxHeldBytes %d is negative", ErrInvalidOptions, o.MaxHeldBytes)
	}
	limit := o.MaxHeldBytes
	if limit == 0 {
		limit = DefaultMaxHeldBytes
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if fi, err := os.Lstat(guestSock); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%w: guest socket %s exists and is not a socket", ErrInvalidOptions, guestSock)
		}
		// A socket file left by a previous agent: nobody can be listening
		// on it through us, and QEMU needs the path.
		if err := os.Remove(guestSock); err != nil {
			return nil, fmt.Errorf("remove stale guest socket: %w", err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: guestSock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen for QEMU on %s: %w", guestSock, err)
	}
	// Whoever can connect here can inject frames as the guest.
	if err := os.Chmod(guestSock, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restrict guest socket: %w", err)
	}
	b := &Buffer{
		log:      log.With("sock", guestSock),
		host:     host,
		max:      limit,
		ln:       ln,
		path:     guestSock,
		served:   make(chan struct{}),
		outbound: make(chan struct{}, 1),
	}
	b.cond = sync.NewCond(&b.mu)
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.wg.Add(1)
	go b.egress()
	return b, nil
}

// Addr is the path of the socket QEMU connects to.
func (b *Buffer) Addr() string { return b.path }

// Serve accepts QEMU's connection and moves frames until ctx ends or Close
// is called (it then returns nil), or the listener or the host port fails.
// A new connection replaces the current one (a restarted or restored QEMU);
// a disconnect or a malformed stream drops only that connection, never held
// frames. Serve may be called once.
func (b *Buffer) Serve(ctx context.Context) error {
	b.mu.Lock()
	switch {
	case b.closed:
		b.mu.Unlock()
		return ErrClosed
	case b.serving:
		b.mu.Unlock()
		return errors.New("netbuf: Serve called twice")
	}
	b.serving = true
	b.mu.Unlock()
	defer close(b.served)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(b.ctx, cancel)
	defer stop()
	// Accept blocks without a context: closing the listener ends it.
	unblock := context.AfterFunc(ctx, func() { b.ln.Close() })
	defer unblock()

	errc := make(chan error, 2)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); errc <- b.acceptLoop(ctx, &wg) }()
	go func() { defer wg.Done(); errc <- b.hostLoop(ctx) }()
	err := <-errc
	planned := ctx.Err() != nil || b.ctx.Err() != nil
	cancel()
	b.ln.Close()
	b.mu.Lock()
	gc := b.conn
	b.conn = nil
	b.cond.Broadcast()
	b.mu.Unlock()
	if gc != nil {
		gc.close()
	}
	wg.Wait()
	if planned {
		return nil
	}
	return err
}

func (b *Buffer) acceptLoop(ctx context.Context, wg *sync.WaitGroup) error {
	for {
		c, err := b.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || b.ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept QEMU connection on %s: %w", b.path, err)
		}
		gc := &guestConn{c: c}
		b.mu.Lock()
		// Serve's shutdown clears b.conn after cancelling ctx, and Close
		// after setting closed: checking both under the lock means a
		// connection accepted during shutdown is either seen and closed
		// there, or refused here.
		if ctx.Err() != nil || b.closed {
			b.mu.Unlock()
			c.Close()
			return nil
		}
		old := b.conn
		b.conn = gc
		b.st.Connections++
		n := b.st.Connections
		b.cond.Broadcast()
		b.mu.Unlock()
		if old != nil {
			b.log.Warn("a new QEMU connection replaces the current one", "conn", n)
			old.close()
		} else {
			b.log.Info("QEMU connected", "conn", n)
		}
		wg.Add(1)
		go func() { defer wg.Done(); b.readGuest(gc, n) }()
	}
}

// readGuest decodes guest frames from one QEMU connection until it ends.
func (b *Buffer) readGuest(gc *guestConn, n uint64) {
	br := bufio.NewReaderSize(gc.c, guestReadBuffer)
	var hdr [HeaderSize]byte
	for {
		if !b.waitRoom(gc) {
			return
		}
		frame, err := readStreamFrame(br, &hdr)
		if err != nil {
			b.mu.Lock()
			current := b.conn == gc
			if current {
				b.conn = nil
				b.cond.Broadcast()
			}
			switch {
			case errors.Is(err, ErrBadFrame):
				b.st.StreamErrors++
				b.mu.Unlock()
				b.log.Error("dropping QEMU connection: malformed stream; held frames are kept", "conn", n, "err", err)
			case errors.Is(err, io.EOF) || !current:
				b.mu.Unlock()
				b.log.Info("QEMU disconnected; held frames are kept", "conn", n)
			default:
				b.mu.Unlock()
				b.log.Warn("QEMU connection failed; held frames are kept", "conn", n, "err", err)
			}
			gc.close()
			return
		}
		b.admit(frame)
	}
}

// waitRoom blocks while the buffer is at its bound. It reports false when
// gc is no longer the connection to read from.
func (b *Buffer) waitRoom(gc *guestConn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	stalled := false
	for b.buffered >= b.max && b.conn == gc && !b.closed {
		if !stalled {
			stalled = true
			b.st.BackpressureStalls++
			b.log.Debug("buffer full, pausing guest reads", "buffered", b.buffered, "max", b.max)
		}
		b.cond.Wait()
	}
	return b.conn == gc && !b.closed
}

// admit takes one guest frame: held in the open epoch, or queued for the
// host at once in passthrough mode.
func (b *Buffer) admit(f []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.st.GuestFrames++
	b.buffered += int64(len(f))
	if b.pass {
		b.enqueueLocked(f)
		return
	}
	b.open.add(f)
	select {
	case b.outbound <- struct{}{}:
	default:
	}
}

func (b *Buffer) enqueueLocked(f []byte) {
	b.outq = append(b.outq, f)
	b.outFrames++
	b.outBytes += int64(len(f))
	b.cond.Broadcast()
}

// hostLoop moves world-to-guest frames to the current QEMU connection.
func (b *Buffer) hostLoop(ctx context.Context) error {
	buf := make([]byte, MaxFrameSize)
	out := make([]byte, 0, HeaderSize+MaxFrameSize)
	for {
		n, err := b.host.ReadFrame(ctx, buf)
		if err != nil {
			if ctx.Err() != nil || b.ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, ErrShortBuffer) {
				b.log.Warn("host port delivered an oversized frame; dropped", "err", err)
				continue
			}
			return fmt.Errorf("netbuf: read host port: %w", err)
		}
		if checkFrameSize(n) != nil {
			b.countInboundDrop()
			continue
		}
		b.mu.Lock()
		gc := b.conn
		b.mu.Unlock()
		if gc == nil {
			// No QEMU: like a NIC with its link down.
			b.countInboundDrop()
			continue
		}
		out = appendStreamFrame(out[:0], buf[:n])
		// This write may block while the VM is stopped (QEMU does not read
		// for a stopped NIC); frames then queue in the host port, as on a
		// real wire. Replacing or closing the connection unblocks it.
		if _, err := gc.c.Write(out); err != nil {
			b.countInboundDrop()
			continue
		}
		b.mu.Lock()
		b.st.InboundFrames++
		b.mu.Unlock()
	}
}

func (b *Buffer) countInboundDrop() {
	b.mu.Lock()
	b.st.InboundDropped++
	b.mu.Unlock()
}

// egress writes released frames to the host port, in order.
func (b *Buffer) egress() {
	defer b.wg.Done()
	for {
		b.mu.Lock()
		for len(b.outq) == 0 && !b.closed {
			b.cond.Wait()
		}
		if b.closed {
			b.mu.Unlock()
			return
		}
		batch := b.outq
		b.outq = nil
		b.mu.Unlock()
		for i, f := range batch {
			err := b.host.WriteFrame(b.ctx, f)
			batch[i] = nil
			b.mu.Lock()
			b.outFrames--
			b.outBytes -= int64(len(f))
			b.buffered -= int64(len(f))
			b.cond.Broadcast()
			if err == nil {
				b.st.SentFrames++
				b.st.SentBytes += uint64(len(f))
				b.mu.Unlock()
				continue
			}
			b.st.HostWriteErrors++
			b.writeWarns++
			nerr := b.writeWarns
			b.mu.Unlock()
			if b.ctx.Err() != nil {
				return
			}
			if nerr == 1 || nerr%1000 == 0 {
				b.log.Warn("host port refused a guest frame; it is lost as on a wire", "errors", nerr, "err", err)
			}
		}
	}
}

// Seal is called while the guest is paused at the end of epoch n: every
// guest frame received so far and not yet sealed belongs to epoch n; frames
// read afterwards belong to n+1 or later. A frame still in the socket (or
// being decoded) when Seal runs is attributed to the later epoch, which is
// always safe. It returns the number of frames and bytes sealed into n.
//
// Epochs must increase. A Seal with n not above the last sealed epoch is a
// coordinator bug: it is logged and ignored, and its frames stay open for
// the next valid Seal, so they are never released early.
func (b *Buffer) Seal(n uint64) (frames int, bytes int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, 0
	}
	if b.anySealed && n <= b.st.LastSealed {
		b.log.Error("Seal with an epoch not above the last sealed one; ignored", "epoch", n, "last_sealed", b.st.LastSealed)
		return 0, 0
	}
	b.anySealed = true
	b.st.LastSealed = n
	if len(b.open.frames) == 0 {
		return 0, 0
	}
	e := b.open
	e.n = n
	b.sealed = append(b.sealed, e)
	b.open = epoch{}
	return len(e.frames), e.bytes
}

// Release sends every held frame of epochs <= n to the host port, in order.
// It queues them and returns without waiting for the host port; Stats shows
// when they have been written. Frames not yet sealed are never released.
func (b *Buffer) Release(n uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	if n > b.st.LastReleased {
		b.st.LastReleased = n
	}
	now := time.Now()
	i := 0
	for ; i < len(b.sealed) && b.sealed[i].n <= n; i++ {
		e := &b.sealed[i]
		if d := now.Sub(e.first); d > b.st.MaxHold {
			b.st.MaxHold = d
		}
		for _, f := range e.frames {
			b.enqueueLocked(f)
		}
	}
	if i > 0 {
		clear(b.sealed[:i])
		b.sealed = b.sealed[i:]
	}
}

// Outbound signals (without blocking, coalesced into one pending signal)
// that the guest emitted a frame that is now held: the Kemari trigger for a
// checkpoint. In passthrough mode nothing is signalled.
func (b *Buffer) Outbound() <-chan struct{} { return b.outbound }

// SetPassthrough switches unprotected mode on or off. On: every held frame,
// sealed or not, is released in order and new guest frames go out at once
// (before pairing, or degraded after losing the secondary, when there is no
// commit to wait for), and epoch numbering may start again. Off: guest
// frames are held again from the next one on, in the open epoch.
func (b *Buffer) SetPassthrough(on bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.pass == on {
		return
	}
	b.pass = on
	if !on {
		return
	}
	for _, e := range b.sealed {
		for _, f := range e.frames {
			b.enqueueLocked(f)
		}
	}
	b.sealed = nil
	for _, f := range b.open.frames {
		b.enqueueLocked(f)
	}
	b.open = epoch{}
	// Nothing is held any more, so the next protection may number its
	// epochs afresh: a re-pairing after degraded mode starts again from
	// the first epochs, and its Seals must not be refused as going back.
	b.anySealed = false
	b.st.LastSealed, b.st.LastReleased = 0, 0
}

// Discard drops every held frame, sealed or not (e.g. the secondary took
// over after a planned switchover, and these frames' epochs will never be
// acknowledged). Frames already released still go out.
func (b *Buffer) Discard() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.discardLocked()
}

func (b *Buffer) discardLocked() {
	var frames int
	var bytes int64
	for _, e := range b.sealed {
		frames += len(e.frames)
		bytes += e.bytes
	}
	frames += len(b.open.frames)
	bytes += b.open.bytes
	b.sealed = nil
	b.open = epoch{}
	b.buffered -= bytes
	b.st.DiscardedFrames += uint64(frames)
	b.cond.Broadcast()
}

// Stats returns a snapshot of the counters.
func (b *Buffer) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.st
	s.OpenFrames, s.OpenBytes = len(b.open.frames), b.open.bytes
	s.HeldFrames, s.HeldBytes = s.OpenFrames, s.OpenBytes
	for _, e := range b.sealed {
		s.HeldFrames += len(e.frames)
		s.HeldBytes += e.bytes
	}
	s.QueuedFrames, s.QueuedBytes = b.outFrames, b.outBytes
	s.Connected = b.conn != nil
	s.Passthrough = b.pass
	return s
}

// Close stops Serve, closes QEMU's connection and the listener, and drops
// held frames and released frames not yet written (counted as discarded).
// It does not close the host port.
func (b *Buffer) Close() error {
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.discardLocked()
		// Released frames the host port has not taken yet are lost too.
		b.st.DiscardedFrames += uint64(len(b.outq))
		b.closed = true
		gc := b.conn
		b.conn = nil
		b.cond.Broadcast()
		serving := b.serving
		b.mu.Unlock()
		b.cancel()
		b.ln.Close()
		if gc != nil {
			gc.close()
		}
		b.wg.Wait()
		if serving {
			<-b.served
		}
	})
	return nil
}
