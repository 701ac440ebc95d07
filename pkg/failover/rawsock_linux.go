package failover

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// rawSock is a non-blocking socket made with x/sys/unix (packet and ICMP
// sockets have no net package type) and handed to Go's poller through
// os.NewFile, so reads honour deadlines without a blocked thread.
type rawSock struct {
	f  *os.File
	rc syscall.RawConn
}

func newRawSock(fd int, name string) (*rawSock, error) {
	f := os.NewFile(uintptr(fd), name)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%w: %s: %v", ErrProbe, name, err)
	}
	return &rawSock{f: f, rc: rc}, nil
}

func (s *rawSock) Close() error { return s.f.Close() }

func (s *rawSock) sendto(b []byte, to unix.Sockaddr) error {
	var serr error
	err := s.rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, 0, to)
		return serr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return serr
}

// recvfrom waits until deadline for one datagram.
func (s *rawSock) recvfrom(b []byte, deadline time.Time) (int, unix.Sockaddr, error) {
	if err := s.f.SetReadDeadline(deadline); err != nil {
		return 0, nil, err
	}
	var (
		n    int
		from unix.Sockaddr
		rerr error
	)
	err := s.rc.Read(func(fd uintptr) bool {
		n, from, rerr = unix.Recvfrom(int(fd), b, unix.MSG_TRUNC)
		return rerr != unix.EAGAIN
	})
	if err != nil {
		return 0, nil, err
	}
	return min(n, len(b)), from, rerr
}

// exchange sends a request every interval and reads answers until match
// accepts one (alive), the probe's timeout passes (silent), or ctx ends
// (error). send errors that fatal() marks as "cannot probe" end the probe
// with an error; others (neighbour not found) just count as no answer.
func exchange(ctx context.Context, s *rawSock, by string, timeout, interval time.Duration,
	send func() error, fatal func(error) bool, match func(b []byte, from unix.Sockaddr) (string, bool),
) (Result, error) {
	start := time.Now()
	end := start.Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(end) {
		end = d
	}
	stop := context.AfterFunc(ctx, func() { s.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, 1500)
	var lastSendErr error
	for next := start; ; {
		now := time.Now()
		if !now.Before(end) || ctx.Err() != nil {
			break
		}
		if !now.Before(next) {
			if err := send(); err != nil {
				if fatal(err) {
					return Result{By: by}, fmt.Errorf("%w: %s: send: %w", ErrProbe, by, err)
				}
				lastSendErr = err
			}
			next = now.Add(interval)
		}
		n, from, err := s.recvfrom(buf, earlier(next, end))
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, unix.EINTR) {
				continue
			}
			if fatal(err) {
				return Result{By: by}, fmt.Errorf("%w: %s: receive: %w", ErrProbe, by, err)
			}
			lastSendErr = err
			continue
		}
		if detail, ok := match(buf[:n], from); ok {
			return Result{Alive: true, By: by, Detail: detail, RTT: time.Since(start)}, nil
		}
	}
	r, err := probeOutcome(ctx, by)
	if err == nil && lastSendErr != nil {
		r.Detail += fmt.Sprintf(" (last error: %v)", lastSendErr)
	}
	return r, err
}

func earlier(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
