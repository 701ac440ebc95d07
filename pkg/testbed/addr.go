package testbed

import (
	"fmt"
	"net"
	"net/netip"
)

// Address plan constants. Each slot takes three /24s of 10.213.0.0/16.
const (
	// NumSlots is how many beds can exist at the same time per prefix.
	NumSlots = 85
	// MaxHosts is the largest Options.Hosts.
	MaxHosts = 8
	// MaxVMs is how many VM addresses a bed's LAN has (VMAddr 0..MaxVMs-1).
	MaxVMs = 50

	hostOctetBase   = 11  // host i has LAN address .11+i
	vmOctetBase     = 50  // VM i has LAN address .50+i
	clientOctet     = 100 // the client's LAN address
	linkOctetBase   = 1   // host i has .1+i on repl and mgmt
	netsPerSlot     = 3
	firstOctet      = 10
	secondOctet     = 213
	lanPrefixLength = 24
)

// Net names one of a bed's networks; it is also the name of its bridge in
// the switch namespace.
type Net string

// The networks of a bed.
const (
	// NetLAN carries the client's traffic to VMs and hosts.
	NetLAN Net = "lan"
	// NetRepl is the replication link between the hosts.
	NetRepl Net = "repl"
	// NetMgmt is a second path between the hosts, for heartbeats.
	NetMgmt Net = "mgmt"
)

// hostIfName is the host-side interface of each network. On KVM hosts the
// LAN interface is a port of br-vm, which holds the host's LAN address.
var hostIfName = map[Net]string{NetLAN: "lan0", NetRepl: "repl0", NetMgmt: "mgmt0"}

// BridgeName is the bridge on each KVM host that VM NICs (taps) join to be
// on the LAN.
const BridgeName = "br-vm"

func slotNet(slot, k int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{firstOctet, secondOctet, byte(slot*netsPerSlot + k), 0}), lanPrefixLength)
}

// withOctet returns p's address with its last octet set to o.
func withOctet(p netip.Prefix, o int) netip.Addr {
	a := p.Addr().As4()
	a[3] = byte(o)
	return netip.AddrFrom4(a)
}

// VMAddr is the LAN address, with the LAN's prefix length, of VM i
// (0 <= i < MaxVMs), e.g. 10.213.L.50/24 for VM 0.
func (b *Bed) VMAddr(i int) (netip.Prefix, error) {
	if i < 0 || i >= MaxVMs {
		return netip.Prefix{}, fmt.Errorf("%w: VM index %d outside [0, %d)", ErrInvalidOptions, i, MaxVMs)
	}
	return netip.PrefixFrom(withOctet(b.LANNet, vmOctetBase+i), b.LANNet.Bits()), nil
}

// VMMAC is the MAC address of VM i (0 <= i < MaxVMs): 52:54:00 (QEMU's
// prefix), then 0xd5, the bed's slot and the VM's last address octet, so a
// VM keeps one MAC, and the LAN's neighbour tables stay right, wherever it
// runs.
func (b *Bed) VMMAC(i int) (net.HardwareAddr, error) {
	if i < 0 || i >= MaxVMs {
		return nil, fmt.Errorf("%w: VM index %d outside [0, %d)", ErrInvalidOptions, i, MaxVMs)
	}
	return net.HardwareAddr{0x52, 0x54, 0x00, secondOctet, byte(b.Slot), byte(vmOctetBase + i)}, nil
}

// bridgeMAC is a fixed, locally administered MAC for host i's br-vm. A
// bridge otherwise takes the lowest MAC of its ports, so the host's own LAN
// address would change MAC whenever a VM tap joined or left.
func bridgeMAC(slot, i int) net.HardwareAddr {
	return net.HardwareAddr{0x02, secondOctet, byte(slot), 0, 0, byte(hostOctetBase + i)}
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
}
