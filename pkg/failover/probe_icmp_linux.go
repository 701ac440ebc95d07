package failover

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ICMPMode selects the kind of socket an ICMPProbe uses.
type ICMPMode uint8

const (
	// ICMPAuto tries an unprivileged ping socket first and falls back to a
	// raw socket when net.ipv4.ping_group_range does not allow it.
	ICMPAuto ICMPMode = iota
	// ICMPDatagram uses a ping socket (SOCK_DGRAM, IPPROTO_ICMP) only.
	ICMPDatagram
	// ICMPRaw uses a raw socket (needs CAP_NET_RAW) only.
	ICMPRaw
)

// ICMPProbeConfig configures an ICMPProbe.
type ICMPProbeConfig struct {
	// Addr is the VM's IPv4 address.
	Addr netip.Addr
	// Netns to probe from (a path); empty is the caller's.
	Netns    string
	Mode     ICMPMode
	Timeout  time.Duration // default DefaultProbeTimeout
	Interval time.Duration // between echo requests; default DefaultProbeInterval
}

// ICMPProbe sends echo requests to the VM's address.
type ICMPProbe struct {
	cfg ICMPProbeConfig
	by  string
	seq atomic.Uint32
}

// NewICMPProbe checks cfg.
func NewICMPProbe(cfg ICMPProbeConfig) (*ICMPProbe, error) {
	if !cfg.Addr.Is4() || cfg.Addr.IsUnspecified() {
		return nil, fmt.Errorf("%w: ICMP probe needs the VM's IPv4 address, got %v", ErrConfig, cfg.Addr)
	}
	if cfg.Mode > ICMPRaw {
		return nil, fmt.Errorf("%w: ICMP probe mode %d", ErrConfig, cfg.Mode)
	}
	var err error
	if cfg.Timeout, cfg.Interval, err = probeTimings(cfg.Timeout, cfg.Interval, "ICMP"); err != nil {
		return nil, err
	}
	return &ICMPProbe{cfg: cfg, by: fmt.Sprintf("icmp %v", cfg.Addr)}, nil
}

func (p *ICMPProbe) open() (s *rawSock, raw bool, err error) {
	err = InNetns(p.cfg.Netns, func() error {
		const flags = unix.SOCK_NONBLOCK | unix.SOCK_CLOEXEC
		fd, err := -1, error(nil)
		if p.cfg.Mode != ICMPRaw {
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|flags, unix.IPPROTO_ICMP)
			if err != nil && (p.cfg.Mode == ICMPDatagram || !(errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM))) {
				return fmt.Errorf("%w: ping socket: %w (see net.ipv4.ping_group_range)", ErrProbe, err)
			}
		}
		if fd < 0 {
			raw = true
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|flags, unix.IPPROTO_ICMP)
			if err != nil {
				return fmt.Errorf("%w: raw ICMP socket: %w", ErrProbe, err)
			}
		}
		s, err = newRawSock(fd, p.by)
		return err
	})
	return s, raw, err
}

// Probe sends an echo request every Interval until a reply with our token
// comes back from Addr, or Timeout passes.
func (p *ICMPProbe) Probe(ctx context.Context) (Result, error) {
	s, raw, err := p.open()
	if err != nil {
		return Result{By: p.by}, err
	}
	defer s.Close()
	var token [16]byte
	rand.Read(token[:])
	id := uint16(p.seq.Add(1)) ^ binary.BigEndian.Uint16(token[:]) // the kernel rewrites it on ping sockets
	to := &unix.SockaddrInet4{Addr: p.cfg.Addr.As4()}
	var seq uint16
	send := func() error {
		seq++
		return s.sendto(icmpEcho(id, seq, token[:]), to)
	}
	fatal := func(err error) bool {
		// No neighbour answer (EHOSTUNREACH) is the silence we look for;
		// anything else means this host cannot probe that address.
		return !errors.Is(err, unix.EHOSTUNREACH) && !errors.Is(err, unix.EHOSTDOWN)
	}
	match := func(b []byte, from unix.Sockaddr) (string, bool) {
		sa, ok := from.(*unix.SockaddrInet4)
		if !ok || sa.Addr != to.Addr {
			return "", false
		}
		if raw {
			if len(b) < 20 || b[0]>>4 != 4 {
				return "", false
			}
			ihl := int(b[0]&0x0f) * 4
			if ihl < 20 || len(b) < ihl {
				return "", false
			}
			b = b[ihl:]
		}
		if len(b) < 8+len(token) || b[0] != 0 || b[1] != 0 || !bytes.Equal(b[8:8+len(token)], token[:]) {
			return "", false
		}
		return fmt.Sprintf("echo reply seq %d", binary.BigEndian.Uint16(b[6:])), true
	}
	return exchange(ctx, s, p.by, p.cfg.Timeout, p.cfg.Interval, send, fatal, match)
}

func icmpEcho(id, seq uint16, payload []byte) []byte {
	b := make([]byte, 8+len(payload))
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], payload)
	binary.BigEndian.PutUint16(b[2:], inetChecksum(b))
	return b
}

func inetChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
