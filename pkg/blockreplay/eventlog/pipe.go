package eventlog

import (
	"context"
	"io"
	"sync"
)

// Sink receives records in sequence order. Send may block to push back on a
// slow consumer; it must not reorder or drop records.
type Sink interface {
	Send(ctx context.Context, r Record) error
}

// Source yields records in the order they were sent; io.EOF ends the stream.
type Source interface {
	Recv(ctx context.Context) (Record, error)
}

// Pipe is an in-memory Sink and Source holding at most MaxBytes of encoded
// records (one oversized record is let through when the pipe is empty, so a
// large write cannot deadlock). A sent Record is handed over, not copied.
type Pipe struct {
	mu      sync.Mutex
	q       []Record
	bytes   int64
	max     int64
	closed  bool
	changed chan struct{} // closed and replaced whenever q or closed changes
}

// NewPipe returns a pipe that holds up to maxBytes.
func NewPipe(maxBytes int64) *Pipe {
	return &Pipe{max: maxBytes, changed: make(chan struct{})}
}

func (p *Pipe) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// waitLocked releases the lock until the pipe changes or ctx ends.
func (p *Pipe) waitLocked(ctx context.Context) error {
	ch := p.changed
	p.mu.Unlock()
	defer p.mu.Lock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Send implements Sink; it blocks while the pipe is full.
func (p *Pipe) Send(ctx context.Context, r Record) error {
	n := int64(r.EncodedLen())
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.closed && len(p.q) > 0 && p.bytes+n > p.max {
		if err := p.waitLocked(ctx); err != nil {
			return err
		}
	}
	if p.closed {
		return ErrClosed
	}
	p.q = append(p.q, r)
	p.bytes += n
	p.notifyLocked()
	return nil
}

// Recv implements Source; it blocks until a record arrives, and returns
// io.EOF once the pipe is closed and drained.
func (p *Pipe) Recv(ctx context.Context) (Record, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.q) == 0 {
		if p.closed {
			return Record{}, io.EOF
		}
		if err := p.waitLocked(ctx); err != nil {
			return Record{}, err
		}
	}
	r := p.q[0]
	p.q[0] = Record{}
	p.q = p.q[1:]
	p.bytes -= int64(r.EncodedLen())
	p.notifyLocked()
	return r, nil
}

// Len is the number of records waiting.
func (p *Pipe) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.q)
}

// Close ends the stream: pending records can still be received, further
// sends fail with ErrClosed.
func (p *Pipe) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.closed = true
		p.notifyLocked()
	}
	return nil
}
