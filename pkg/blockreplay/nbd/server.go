// Package nbd owns ftctl's NBD server, written from the NBD protocol
// document: fixed newstyle handshake (EXPORT_NAME, GO, INFO, LIST, ABORT;
// STRUCTURED_REPLY and STARTTLS are refused with NBD_REP_ERR_UNSUP), and the
// commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC with FUA, served
// with simple replies by a bounded worker pool per connection, so replies may
// come back out of order.
//
// Ordering: the reader goroutine takes a place in a per-export range lock for
// every WRITE, TRIM and WRITE_ZEROES before it hands the request to a worker,
// so overlapping write-class requests reach the backend in the order they
// arrived on the connection, one at a time, while disjoint ones run in
// parallel. The protocol does not require this (a client must not have
// overlapping writes in flight and expect an order), but the write-event log
// depends on overlapping writes never running concurrently, and it makes
// "last arrived wins" the answer to an otherwise undefined question. Reads
// take no lock: a read racing an unanswered write may see either version,
// which the protocol allows. FLUSH calls the backend's Flush, which makes
// every completed write durable (fdatasync), so it covers every write whose
// reply was sent before the flush was processed, as the protocol requires.
package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/internal/rangelock"
)

// Sentinel errors.
var (
	// ErrProtocol means the client broke the protocol badly enough that the
	// connection was dropped; the wrapped text names what was wrong.
	ErrProtocol = errors.New("nbd protocol violation")
	// ErrConfig means the server was configured inconsistently.
	ErrConfig = errors.New("nbd server configuration")
)

// Export is one named disk served by a Server.
type Export struct {
	// Name is what clients ask for; the empty name also selects the first
	// export when none is named "".
	Name        string
	Description string
	Backend     backend.Backend
	ReadOnly    bool
	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN. Set it only when a Flush
	// through one connection makes the completed writes of every connection
	// durable, which holds for backend.File (fdatasync on the shared file).
	MultiConn bool
}

// Options tune a Server; zero values pick defaults.
type Options struct {
	Logger *slog.Logger
	// Workers executing requests per connection (default 8).
	Workers int
	// MaxRequest bounds READ and WRITE lengths (default and maximum 32 MiB).
	MaxRequest uint32
	// MaxInflight bounds the payload bytes buffered per connection
	// (default 64 MiB, at least MaxRequest).
	MaxInflight int64
	// HandshakeTimeout bounds the option phase (default 30 s).
	HandshakeTimeout time.Duration
}

const (
	defaultMaxRequest = 32 << 20
	budgetUnit        = 64 << 10
)

// Server serves exports to NBD clients.
type Server struct {
	opt     Options
	log     *slog.Logger
	exports []*export

	wg sync.WaitGroup
}

type export struct {
	Export
	tflags uint16
	locks  rangelock.Locker
}

// NewServer checks the exports and options.
func NewServer(opt Options, exports ...Export) (*Server, error) {
	if len(exports) == 0 {
		return nil, fmt.Errorf("%w: no exports", ErrConfig)
	}
	if opt.Workers <= 0 {
		opt.Workers = 8
	}
	if opt.MaxRequest == 0 || opt.MaxRequest > defaultMaxRequest {
		opt.MaxRequest = defaultMaxRequest
	}
	if opt.MaxInflight < int64(opt.MaxRequest) {
		opt.MaxInflight = max(64<<20, int64(opt.MaxRequest))
	}
	if opt.HandshakeTimeout <= 0 {
		opt.HandshakeTimeout = 30 * time.Second
	}
	s := &Server{opt: opt, log: opt.Logger}
	if s.log == nil {
		s.log = slog.Default()
	}
	seen := map[string]bool{}
	for _, e := range exports {
		if e.Backend == nil {
			return nil, fmt.Errorf("%w: export %q has no backend", ErrConfig, e.Name)
		}
		if len(e.Name) > maxString || len(e.Description) > maxString {
			return nil, fmt.Errorf("%w: export name or description over %d bytes", ErrConfig, maxString)
		}
		if seen[e.Name] {
			return nil, fmt.Errorf("%w: export %q listed twice", ErrConfig, e.Name)
		}
		seen[e.Name] = true
		fl := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes)
		if e.ReadOnly {
			fl |= tflagReadOnly
		}
		if e.MultiConn {
			fl |= tflagCanMultiConn
		}
		s.exports = append(s.exports, &export{Export: e, tflags: fl})
	}
	return s, nil
}

func (s *Server) lookup(name string) *export {
	for _, e := range s.exports {
		if e.Name == name {
			return e
		}
	}
	if name == "" {
		return s.exports[0]
	}
	return nil
}

// Serve accepts connections until ctx ends or the listener fails, then waits
// for its connections to finish. It closes the listener.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer s.wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			ln.Close()
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			_ = s.ServeConn(ctx, c)
		}()
	}
}

// ServeConn runs one client connection to its end and closes it. It returns
// nil when the client left cleanly (DISC, ABORT, or closing between
// requests), and otherwise the reason the connection was dropped, which is
// also logged.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	defer nc.Close()
	log := s.log.With("remote", nc.RemoteAddr().String())
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	c := &conn{nc: nc, r: bufio.NewReaderSize(nc, 64<<10), w: bufio.NewWriterSize(nc, 64<<10)}
	nc.SetDeadline(time.Now().Add(s.opt.HandshakeTimeout))
	ex, err := s.handshake(c)
	if err != nil {
		if errors.Is(err, errAbort) {
			log.Debug("nbd: client aborted negotiation")
			return nil
		}
		log.Warn("nbd: handshake failed, disconnecting", "err", err)
		return err
	}
	nc.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		// Shutdown raced with the end of the handshake and its deadline was
		// just cleared; set it again so the reader does not block forever.
		nc.SetDeadline(time.Unix(1, 0))
	}
	log = log.With("export", ex.Name)
	err = s.transmit(ctx, c, ex, log)
	if err != nil {
		log.Warn("nbd: disconnecting", "err", err)
	}
	return err
}

var errAbort = errors.New("client sent NBD_OPT_ABORT")

type conn struct {
	nc net.Conn
	r  *bufio.Reader
	w  *bufio.Writer
}

func (c *conn) readFull(b []byte, what string) error {
	if _, err := io.ReadFull(c.r, b); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || (errors.Is(err, io.EOF) && len(b) > 0) {
			return fmt.Errorf("%w: connection ended inside %s", ErrProtocol, what)
		}
		return fmt.Errorf("read %s: %w", what, err)
	}
	return nil
}

// handshake runs fixed newstyle negotiation and returns the chosen export.
func (s *Server) handshake(c *conn) (*export, error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicInit)
	binary.BigEndian.PutUint64(hello[8:], magicOpt)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	c.w.Write(hello[:])
	if err := c.w.Flush(); err != nil {
		return nil, fmt.Errorf("send greeting: %w", err)
	}
	var b4 [4]byte
	if err := c.readFull(b4[:], "client flags"); err != nil {
		return nil, err
	}
	cflags := binary.BigEndian.Uint32(b4[:])
	if cflags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return nil, fmt.Errorf("%w: unknown client flags %#x", ErrProtocol, cflags)
	}
	noZeroes := cflags&flagNoZeroes != 0
	for {
		var h [16]byte
		if err := c.readFull(h[:], "option header"); err != nil {
			return nil, err
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != magicOpt {
			return nil, fmt.Errorf("%w: bad option magic %#x", ErrProtocol, m)
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > maxOptionLen {
			return nil, fmt.Errorf("%w: option %d carries %d bytes, limit %d", ErrProtocol, opt, n, maxOptionLen)
		}
		data := make([]byte, n)
		if err := c.readFull(data, fmt.Sprintf("option %d data", opt)); err != nil {
			return nil, err
		}
		ex, done, err := s.option(c, opt, data, noZeroes)
		if err == nil {
			err = c.w.Flush()
		}
		if err != nil || done {
			return ex, err
		}
	}
}

// option answers one option; done means negotiation is over.
func (s *Server) option(c *conn, opt uint32, data []byte, noZeroes bool) (*export, bool, error) {
	switch opt {
	case optExportName:
		ex := s.lookup(string(data))
		if ex == nil {
			// EXPORT_NAME cannot carry an error: the protocol says terminate.
			return nil, true, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME for unknown export %q", ErrProtocol, data)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(ex.Backend.Size()))
		binary.BigEndian.PutUint16(b[8:], ex.tflags)
		if noZeroes {
			c.w.Write(b[:10])
		} else {
			c.w.Write(b[:])
		}
		return ex, true, nil
	case optAbort:
		c.optReply(opt, repAck, nil)
		c.w.Flush()
		return nil, true, errAbort
	case optList:
		if len(data) != 0 {
			return nil, false, c.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, e := range s.exports {
			p := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
			c.optReply(opt, repServer, append(p, e.Name...))
		}
		return nil, false, c.optReply(opt, repAck, nil)
	case optInfo, optGo:
		return s.infoGo(c, opt, data)
	default: // STRUCTURED_REPLY, STARTTLS and anything newer
		return nil, false, c.optError(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
	}
}

func (s *Server) infoGo(c *conn, opt uint32, data []byte) (*export, bool, error) {
	bad := func(why string) (*export, bool, error) {
		return nil, false, c.optError(opt, repErrInvalid, why)
	}
	if len(data) < 6 {
		return bad(fmt.Sprintf("option data is %d bytes, need at least 6", len(data)))
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) || nl > maxString {
		return bad(fmt.Sprintf("export name length %d does not fit the %d-byte option", nl, len(data)))
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return bad(fmt.Sprintf("%d info requests do not match %d remaining bytes", nreq, len(rest)-2))
	}
	ex := s.lookup(name)
	if ex == nil {
		return nil, false, c.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(ex.Backend.Size()))
	info = binary.BigEndian.AppendUint16(info, ex.tflags)
	c.optReply(opt, repInfo, info)
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoName:
			c.optReply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoName), ex.Name...))
		case infoDescription:
			if ex.Description != "" {
				c.optReply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoDescription), ex.Description...))
			}
		case infoBlockSize:
			// Byte granularity works (unaligned requests go through the page
			// cache), 4 KiB is what the page cache and O_DIRECT like best.
			b := binary.BigEndian.AppendUint16(nil, infoBlockSize)
			b = binary.BigEndian.AppendUint32(b, 1)
			b = binary.BigEndian.AppendUint32(b, 4096)
			b = binary.BigEndian.AppendUint32(b, s.opt.MaxRequest)
			c.optReply(opt, repInfo, b)
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return nil, true, err
	}
	return ex, opt == optGo, nil
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], magicOptReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	c.w.Write(h[:])
	_, err := c.w.Write(data)
	return err
}

func (c *conn) optError(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, []byte(msg))
}

type job struct {
	req    Request
	buf    []byte
	units  int
	ticket *rangelock.Ticket
}

type reply struct {
	handle uint64
	errno  uint32
	data   []byte // READ payload, sent only when errno == 0
	buf    []byte // returned to the pool after sending
	units  int
}

// transmit runs the transmission phase: this goroutine reads and validates
// requests, Workers goroutines execute them, one goroutine writes replies.
func (s *Server) transmit(ctx context.Context, c *conn, ex *export, log *slog.Logger) error {
	budget := make(chan struct{}, max(1, s.opt.MaxInflight/budgetUnit))
	jobs := make(chan job, s.opt.Workers)
	replies := make(chan reply, 2*s.opt.Workers)

	var wg sync.WaitGroup
	for range s.opt.Workers {
		wg.Go(func() {
			for j := range jobs {
				replies <- s.execute(ctx, ex, j)
			}
		})
	}
	writeErr := make(chan error, 1)
	go func() { writeErr <- s.writeReplies(c, replies, budget) }()

	readErr := s.readRequests(ctx, c, ex, log, budget, jobs, replies)
	close(jobs)
	wg.Wait()
	close(replies)
	werr := <-writeErr
	if readErr == nil && werr != nil {
		readErr = fmt.Errorf("send replies: %w", werr)
	}
	return readErr
}

func (s *Server) readRequests(ctx context.Context, c *conn, ex *export, log *slog.Logger,
	budget chan struct{}, jobs chan<- job, replies chan<- reply) error {
	size := uint64(ex.Backend.Size())
	var hdr [requestHeaderLen]byte
	for {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			switch {
			case errors.Is(err, io.EOF):
				log.Debug("nbd: client closed the connection without NBD_CMD_DISC")
				return nil
			case errors.Is(err, io.ErrUnexpectedEOF):
				return fmt.Errorf("%w: connection ended inside a request header", ErrProtocol)
			case ctx.Err() != nil:
				return fmt.Errorf("server shutting down: %w", ctx.Err())
			}
			return fmt.Errorf("read request: %w", err)
		}
		req, err := DecodeRequest(hdr[:])
		if err != nil {
			return err
		}
		if req.Type == cmdDisc {
			log.Debug("nbd: client sent NBD_CMD_DISC")
			return nil
		}
		v := validate(req, size, s.opt.MaxRequest, ex.ReadOnly)
		if v.errno != 0 {
			log.Info("nbd: refusing request", "handle", req.Handle, "reason", v.reason, "errno", v.errno)
			if v.payload {
				if _, err := io.CopyN(io.Discard, c.r, int64(req.Length)); err != nil {
					return fmt.Errorf("%w: connection ended inside a refused write's %d-byte payload", ErrProtocol, req.Length)
				}
			}
			replies <- reply{handle: req.Handle, errno: v.errno}
			continue
		}
		j := job{req: req}
		if req.Type == cmdRead || req.Type == cmdWrite {
			j.units = int((uint64(req.Length) + budgetUnit - 1) / budgetUnit)
			for i := 0; i < j.units; i++ {
				select {
				case budget <- struct{}{}:
				case <-ctx.Done():
					releaseUnits(budget, i)
					return fmt.Errorf("server shutting down: %w", ctx.Err())
				}
			}
			j.buf = getBuf(int(req.Length))
		}
		if req.Type == cmdWrite {
			if _, err := io.ReadFull(c.r, j.buf); err != nil {
				putBuf(j.buf)
				releaseUnits(budget, j.units)
				return fmt.Errorf("%w: connection ended inside a %d-byte write payload: %v", ErrProtocol, req.Length, err)
			}
		}
		switch req.Type {
		case cmdWrite, cmdTrim, cmdWriteZeroes:
			if req.Length > 0 {
				j.ticket = ex.locks.Enqueue(req.Offset, uint64(req.Length))
			}
		}
		jobs <- j
	}
}

func releaseUnits(budget chan struct{}, n int) {
	for range n {
		<-budget
	}
}

func (s *Server) execute(ctx context.Context, ex *export, j job) reply {
	r := reply{handle: j.req.Handle, buf: j.buf, units: j.units}
	if j.ticket != nil {
		defer j.ticket.Release()
		if err := j.ticket.Wait(ctx); err != nil {
			r.errno = errShutdown
			return r
		}
	}
	var fl backend.Flags
	if j.req.Flags&cmdFlagFUA != 0 {
		fl |= backend.FUA
	}
	if j.req.Flags&cmdFlagNoHole != 0 {
		fl |= backend.NoHole
	}
	off, n := int64(j.req.Offset), int64(j.req.Length)
	var err error
	b := ex.Backend
	switch j.req.Type {
	case cmdRead:
		err = b.ReadAt(ctx, j.buf, off)
		r.data = j.buf
	case cmdWrite:
		err = b.WriteAt(ctx, j.buf, off, fl)
	case cmdTrim:
		err = b.Trim(ctx, off, n, fl)
	case cmdWriteZeroes:
		err = b.WriteZeroes(ctx, off, n, fl)
	case cmdFlush:
		err = b.Flush(ctx)
	}
	if err != nil {
		r.errno = errnoFor(err, j.req.Type)
		s.log.Warn("nbd: request failed", "export", ex.Name, "cmd", j.req.Type,
			"offset", off, "length", n, "err", err, "errno", r.errno)
	}
	return r
}

// errnoFor maps a backend error to the NBD error values the protocol allows.
func errnoFor(err error, cmd uint16) uint32 {
	switch {
	case errors.Is(err, backend.ErrOutOfRange):
		if cmd == cmdWrite || cmd == cmdWriteZeroes {
			return errNoSpc
		}
		return errInval
	case errors.Is(err, backend.ErrReadOnly):
		return errPerm
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded), errors.Is(err, backend.ErrClosed):
		return errShutdown
	}
	return errIO
}

// writeReplies sends replies in completion order, flushing the buffer only
// when no other reply is ready, so bursts share system calls. After a send
// error it keeps draining (to free buffers) and closes the connection so the
// reader stops too.
func (s *Server) writeReplies(c *conn, replies <-chan reply, budget chan struct{}) error {
	var werr error
	for r := range replies {
		if werr == nil {
			var h [16]byte
			binary.BigEndian.PutUint32(h[0:], magicSimpleReply)
			binary.BigEndian.PutUint32(h[4:], r.errno)
			binary.BigEndian.PutUint64(h[8:], r.handle)
			_, werr = c.w.Write(h[:])
			if werr == nil && r.errno == 0 && r.data != nil {
				_, werr = c.w.Write(r.data)
			}
			if werr == nil && len(replies) == 0 {
				werr = c.w.Flush()
			}
			if werr != nil {
				c.nc.Close()
			}
		}
		if r.buf != nil {
			putBuf(r.buf)
		}
		releaseUnits(budget, r.units)
	}
	if werr == nil {
		werr = c.w.Flush()
	}
	return werr
}

// Buffers come from power-of-two size classes, aligned for O_DIRECT.
var bufPools [33]sync.Pool

func sizeClass(n int) int {
	if n <= backend.Align {
		return bits.Len(uint(backend.Align - 1))
	}
	return bits.Len(uint(n - 1))
}

func getBuf(n int) []byte {
	if n == 0 {
		return []byte{}
	}
	c := sizeClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return backend.AlignedBuf(1 << c)[:n]
}

func putBuf(b []byte) {
	if cap(b) == 0 || cap(b)&(cap(b)-1) != 0 {
		return
	}
	b = b[:cap(b)]
	bufPools[sizeClass(cap(b))].Put(&b)
}
