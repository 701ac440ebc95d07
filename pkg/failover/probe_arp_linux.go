package failover

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// ARPProbeConfig configures an ARPProbe.
type ARPProbeConfig struct {
	// Addr is the VM's IPv4 address.
	Addr netip.Addr
	// Interface is the host interface on the VM's LAN (for instance the
	// bridge port or the bridge itself), inside Netns.
	Interface string
	// Netns holding Interface (a path); empty is the caller's.
	Netns string
	// MAC, if set, is the VM's MAC address: an answer from any other MAC
	// (another host claiming the address) is ignored.
	MAC net.HardwareAddr
	// SenderIP is the sender protocol address of the requests. The default
	// 0.0.0.0 makes them RFC 5227 ARP probes, which the VM answers without
	// caching anything about this host.
	SenderIP netip.Addr
	Timeout  time.Duration // default DefaultProbeTimeout
	Interval time.Duration // between requests; default DefaultProbeInterval
}

// ARPProbe asks "who has Addr?" on a LAN interface with a raw AF_PACKET
// socket. It is the strongest of the probes: any IPv4 stack answers ARP for
// its own address, whatever its firewall does with ICMP and TCP.
type ARPProbe struct {
	cfg ARPProbeConfig
	by  string
}

// NewARPProbe checks cfg.
func NewARPProbe(cfg ARPProbeConfig) (*ARPProbe, error) {
	if !cfg.Addr.Is4() || cfg.Addr.IsUnspecified() {
		return nil, fmt.Errorf("%w: ARP probe needs the VM's IPv4 address, got %v", ErrConfig, cfg.Addr)
	}
	if cfg.Interface == "" {
		return nil, fmt.Errorf("%w: ARP probe of %v needs an interface", ErrConfig, cfg.Addr)
	}
	if cfg.MAC != nil && len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("%w: ARP probe: MAC %v is not an Ethernet address", ErrConfig, cfg.MAC)
	}
	if !cfg.SenderIP.IsValid() {
		cfg.SenderIP = netip.IPv4Unspecified()
	}
	if !cfg.SenderIP.Is4() {
		return nil, fmt.Errorf("%w: ARP probe: sender %v is not IPv4", ErrConfig, cfg.SenderIP)
	}
	var err error
	if cfg.Timeout, cfg.Interval, err = probeTimings(cfg.Timeout, cfg.Interval, "ARP"); err != nil {
		return nil, err
	}
	return &ARPProbe{cfg: cfg, by: fmt.Sprintf("arp %v on %s", cfg.Addr, cfg.Interface)}, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Probe broadcasts ARP requests for Addr every Interval until an ARP
// packet from Addr (and MAC, if set) arrives, or Timeout passes.
func (p *ARPProbe) Probe(ctx context.Context) (Result, error) {
	var (
		s     *rawSock
		ifi   *net.Interface
		proto = htons(unix.ETH_P_ARP)
	)
	err := InNetns(p.cfg.Netns, func() error {
		var err error
		if ifi, err = net.InterfaceByName(p.cfg.Interface); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrProbe, p.by, err)
		}
		if len(ifi.HardwareAddr) != 6 {
			return fmt.Errorf("%w: %s: interface has no Ethernet address", ErrProbe, p.by)
		}
		if ifi.Flags&net.FlagUp == 0 {
			return fmt.Errorf("%w: %s: interface is down", ErrProbe, p.by)
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(proto))
		if err != nil {
			return fmt.Errorf("%w: %s: packet socket: %w", ErrProbe, p.by, err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("%w: %s: bind: %w", ErrProbe, p.by, err)
		}
		s, err = newRawSock(fd, p.by)
		return err
	})
	if err != nil {
		return Result{By: p.by}, err
	}
	defer s.Close()

	req := arpPacket(1, ifi.HardwareAddr, p.cfg.SenderIP, nil, p.cfg.Addr)
	bcast := &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index, Halen: 6}
	copy(bcast.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	target := p.cfg.Addr.As4()
	send := func() error { return s.sendto(req, bcast) }
	fatal := func(err error) bool { return !errors.Is(err, unix.ENOBUFS) }
	match := func(b []byte, from unix.Sockaddr) (string, bool) {
		if ll, ok := from.(*unix.SockaddrLinklayer); !ok || ll.Pkttype == unix.PACKET_OUTGOING {
			return "", false
		}
		if len(b) < 28 || binary.BigEndian.Uint16(b[0:]) != 1 || binary.BigEndian.Uint16(b[2:]) != unix.ETH_P_IP ||
			b[4] != 6 || b[5] != 4 {
			return "", false
		}
		op := binary.BigEndian.Uint16(b[6:])
		sha, spa := net.HardwareAddr(b[8:14]), b[14:18]
		// A reply, or the VM's own request: either way its stack is up.
		if (op != 1 && op != 2) || !bytes.Equal(spa, target[:]) {
			return "", false
		}
		if p.cfg.MAC != nil && !bytes.Equal(sha, p.cfg.MAC) {
			return "", false
		}
		kind := "reply"
		if op == 1 {
			kind = "request"
		}
		return fmt.Sprintf("ARP %s from %v at %v", kind, p.cfg.Addr, sha), true
	}
	return exchange(ctx, s, p.by, p.cfg.Timeout, p.cfg.Interval, send, fatal, match)
}

// arpPacket builds an Ethernet/IPv4 ARP packet (without the link header,
// which the SOCK_DGRAM packet socket adds).
func arpPacket(op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b[0:], 1) // Ethernet
	binary.BigEndian.PutUint16(b[2:], unix.ETH_P_IP)
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], op)
	copy(b[8:14], sha)
	s4, t4 := spa.As4(), tpa.As4()
	copy(b[14:18], s4[:])
	copy(b[18:24], tha) // zero for a request
	copy(b[24:28], t4[:])
	return b
}
