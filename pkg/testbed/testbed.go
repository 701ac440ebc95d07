package testbed

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Errors callers can test for with errors.Is.
var (
	// ErrNeedRoot: creating namespaces needs root.
	ErrNeedRoot = errors.New("testbed: needs root")
	// ErrInvalidOptions: an argument is out of range or malformed.
	ErrInvalidOptions = errors.New("testbed: invalid options")
	// ErrNoSlot: NumSlots beds with this prefix exist already.
	ErrNoSlot = errors.New("testbed: no free slot")
	// ErrClosed: the bed was closed.
	ErrClosed = errors.New("testbed: closed")
	// ErrNoLink: the host is not wired to that network.
	ErrNoLink = errors.New("testbed: host has no such link")
)

// DefaultPrefix names the namespaces of beds made with an empty
// Options.Prefix.
const DefaultPrefix = "ftb"

// geteuid is a seam for the test of ErrNeedRoot.
var geteuid = os.Geteuid

// Options configure New.
type Options struct {
	// Prefix starts every namespace name ("<Prefix>-<slot>-a"): a lower
	// case letter, then up to 7 lower case letters or digits. Empty means
	// DefaultPrefix. CleanupStale works per prefix.
	Prefix string
	// Hosts is the number of KVM hosts, 2..MaxHosts; 0 means 2. They are
	// named a, b, c, ... (the client is "client").
	Hosts int
	// Logger receives a debug line per step; nil discards them.
	Logger *slog.Logger

	// failStep makes New fail at the step of this name (tests).
	failStep string
	// slotHint+1, if not 0, is the slot New tries first (tests).
	slotHint int
}

var prefixRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,7}$`)

func checkPrefix(p string) error {
	if !prefixRE.MatchString(p) {
		return fmt.Errorf("%w: prefix %q must be a lower case letter then up to 7 lower case letters or digits", ErrInvalidOptions, p)
	}
	return nil
}

// Bed is one topology: KVM hosts, a client and the switch joining them.
// Its methods are safe for concurrent use.
type Bed struct {
	// Prefix and Slot make the namespace names and choose the subnets.
	Prefix string
	Slot   int
	// Hosts are the KVM hosts; A and B are Hosts[0] and Hosts[1].
	Hosts []*Host
	A, B  *Host
	// Client is a namespace on the LAN only, where users of the VMs run.
	Client *Host
	// LAN is the switch namespace holding the bridges; it has no addresses.
	LAN *Host
	// LANNet, ReplNet and MgmtNet are the subnets of the three networks.
	LANNet, ReplNet, MgmtNet netip.Prefix

	log    *slog.Logger
	closed atomic.Bool

	mu     sync.Mutex
	lock   *slotLock // nil once released
	netns  []string  // namespaces that exist, in creation order
	vms    map[int]*FakeVM
	failAt string
}

// Host is one network namespace of a bed.
type Host struct {
	// Name is the role: "a", "b", ..., "client", "lan", "vm<i>".
	Name string
	// NSName is the namespace's name, for `ip netns exec NSName`.
	NSName string
	// NetNS is the namespace's path, /var/run/netns/NSName.
	NetNS string
	// LANAddr, ReplAddr and MgmtAddr are the host's own addresses on each
	// network; the zero Addr where the host is not on it.
	LANAddr, ReplAddr, MgmtAddr netip.Addr
	// Bridge is the bridge VM NICs join to be on the LAN, on KVM hosts
	// (BridgeName); empty elsewhere.
	Bridge string

	nets []Net // networks wired through the switch, in port order
	bed  *Bed
}

// New builds a bed. It removes everything it made when it fails, and
// returns an error wrapping ErrNeedRoot when not run as root.
func New(ctx context.Context, o Options) (*Bed, error) {
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if err := checkPrefix(o.Prefix); err != nil {
		return nil, err
	}
	if o.Hosts == 0 {
		o.Hosts = 2
	}
	if o.Hosts < 2 || o.Hosts > MaxHosts {
		return nil, fmt.Errorf("%w: %d hosts, want 2..%d", ErrInvalidOptions, o.Hosts, MaxHosts)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if geteuid() != 0 {
		return nil, fmt.Errorf("%w: creating network namespaces (run as root)", ErrNeedRoot)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	slot, lock, stale, err := claimSlot(o.Prefix, o.slotHint-1)
	if err != nil {
		return nil, err
	}
	b := &Bed{
		Prefix:  o.Prefix,
		Slot:    slot,
		LANNet:  slotNet(slot, 0),
		ReplNet: slotNet(slot, 1),
		MgmtNet: slotNet(slot, 2),
		log:     o.Logger.With("bed", fmt.Sprintf("%s-%d", o.Prefix, slot)),
		lock:    lock,
		vms:     map[int]*FakeVM{},
		failAt:  o.failStep,
	}
	if len(stale) > 0 {
		b.log.Info("removed namespaces a crashed run left in this slot", "netns", stale)
	}
	b.LAN = b.newHost("lan")
	for i := range o.Hosts {
		h := b.newHost(string(rune('a' + i)))
		h.LANAddr = withOctet(b.LANNet, hostOctetBase+i)
		h.ReplAddr = withOctet(b.ReplNet, linkOctetBase+i)
		h.MgmtAddr = withOctet(b.MgmtNet, linkOctetBase+i)
		h.Bridge = BridgeName
		h.nets = []Net{NetLAN, NetRepl, NetMgmt}
		b.Hosts = append(b.Hosts, h)
	}
	b.A, b.B = b.Hosts[0], b.Hosts[1]
	b.Client = b.newHost("client")
	b.Client.LANAddr = withOctet(b.LANNet, clientOctet)
	b.Client.nets = []Net{NetLAN}

	if err := b.build(ctx); err != nil {
		if cerr := b.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("and cleaning up: %w", cerr))
		}
		return nil, err
	}
	b.log.Debug("bed ready", "lan", b.LANNet, "repl", b.ReplNet, "mgmt", b.MgmtNet)
	return b, nil
}

func (b *Bed) newHost(role string) *Host {
	n := nsName(b.Prefix, b.Slot, role)
	return &Host{Name: role, NSName: n, NetNS: netnsPath(n), bed: b}
}

// step is one named part of building a bed.
type step struct {
	name string
	run  func() error
}

func (b *Bed) build(ctx context.Context) error {
	var steps []step
	all := append([]*Host{b.LAN}, b.Hosts...)
	all = append(all, b.Client)
	for _, h := range all {
		steps = append(steps, step{"netns " + h.Name, func() error { return b.addNetns(h) }})
	}
	steps = append(steps, step{"switch", b.buildSwitch})
	for _, h := range append(slices.Clone(b.Hosts), b.Client) {
		steps = append(steps, step{"wire " + h.Name, func() error { return b.wire(h) }})
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("before step %s: %w", s.name, err)
		}
		b.log.Debug("step", "name", s.name)
		if s.name == b.failAt {
			return fmt.Errorf("step %s: injected failure", s.name)
		}
		if err := s.run(); err != nil {
			return fmt.Errorf("step %s: %w", s.name, err)
		}
	}
	return nil
}

func (b *Bed) addNetns(h *Host) error {
	if err := createNetns(h.NSName); err != nil {
		return err
	}
	b.mu.Lock()
	b.netns = append(b.netns, h.NSName)
	b.mu.Unlock()
	return nil
}

// buildSwitch makes one bridge per network in the switch namespace.
func (b *Bed) buildSwitch() error {
	sw, err := handleAt(b.LAN.NetNS)
	if err != nil {
		return err
	}
	defer sw.Close()
	off := false
	for _, n := range []Net{NetLAN, NetRepl, NetMgmt} {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: string(n), Group: linkGroup}, MulticastSnooping: &off}
		if err := sw.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge %s: %w", n, err)
		}
		if err := sw.LinkSetUp(br); err != nil {
			return fmt.Errorf("bridge %s up: %w", n, err)
		}
	}
	return nil
}

func portName(h *Host, n Net) string { return h.Name + "-" + string(n) }

// wire connects host h to each of its networks with a veth pair made
// directly across the two namespaces, so no end ever appears in the
// machine's own namespace, and gives it its addresses.
func (b *Bed) wire(h *Host) error {
	sw, err := handleAt(b.LAN.NetNS)
	if err != nil {
		return err
	}
	defer sw.Close()
	hh, err := handleAt(h.NetNS)
	if err != nil {
		return err
	}
	defer hh.Close()
	hostNS, err := netns.GetFromPath(h.NetNS)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", h.NetNS, err)
	}
	defer hostNS.Close()

	var vmBridge netlink.Link
	if h.Bridge != "" {
		i := slices.Index(b.Hosts, h)
		vmBridge = &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: h.Bridge, HardwareAddr: bridgeMAC(b.Slot, i), Group: linkGroup}}
		if err := hh.LinkAdd(vmBridge); err != nil {
			return fmt.Errorf("add %s in %s: %w", h.Bridge, h.NSName, err)
		}
		if err := hh.LinkSetUp(vmBridge); err != nil {
			return fmt.Errorf("%s up in %s: %w", h.Bridge, h.NSName, err)
		}
	}
	for _, n := range h.nets {
		port := portName(h, n)
		v := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: port, Group: linkGroup},
			PeerName:      hostIfName[n],
			PeerNamespace: netlink.NsFd(hostNS),
		}
		if err := sw.LinkAdd(v); err != nil {
			return fmt.Errorf("add veth %s/%s: %w", port, hostIfName[n], err)
		}
		if err := setPort(sw, port, string(n)); err != nil {
			return err
		}
		l, err := hh.LinkByName(hostIfName[n])
		if err != nil {
			return fmt.Errorf("find %s in %s: %w", hostIfName[n], h.NSName, err)
		}
		if err := hh.LinkSetGroup(l, linkGroup); err != nil {
			return fmt.Errorf("group of %s in %s: %w", l.Attrs().Name, h.NSName, err)
		}
		addrLink, addr, bits := l, netip.Addr{}, 0
		switch n {
		case NetLAN:
			addr, bits = h.LANAddr, b.LANNet.Bits()
			if vmBridge != nil {
				if err := hh.LinkSetMaster(l, vmBridge); err != nil {
					return fmt.Errorf("%s into %s in %s: %w", l.Attrs().Name, h.Bridge, h.NSName, err)
				}
				addrLink = vmBridge
			}
		case NetRepl:
			addr, bits = h.ReplAddr, b.ReplNet.Bits()
		case NetMgmt:
			addr, bits = h.MgmtAddr, b.MgmtNet.Bits()
		}
		if err := hh.AddrAdd(addrLink, &netlink.Addr{IPNet: ipNet(addr, bits)}); err != nil {
			return fmt.Errorf("address %v on %s in %s: %w", addr, addrLink.Attrs().Name, h.NSName, err)
		}
		if err := hh.LinkSetUp(l); err != nil {
			return fmt.Errorf("%s up in %s: %w", l.Attrs().Name, h.NSName, err)
		}
	}
	return nil
}

// setPort enslaves the switch port to its bridge and brings it up.
func setPort(sw *netlink.Handle, port, bridge string) error {
	p, err := sw.LinkByName(port)
	if err != nil {
		return fmt.Errorf("find port %s: %w", port, err)
	}
	br, err := sw.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("find bridge %s: %w", bridge, err)
	}
	if err := sw.LinkSetMaster(p, br); err != nil {
		return fmt.Errorf("port %s into bridge %s: %w", port, bridge, err)
	}
	if err := sw.LinkSetUp(p); err != nil {
		return fmt.Errorf("port %s up: %w", port, err)
	}
	return nil
}

// Close removes every namespace and link of the bed, fake VMs' included,
// and its lock file. It does not stop processes started in the bed: stop
// them first, or their namespaces live on until they exit, cut off from
// everything (every veth is gone). Calling Close again retries whatever
// failed before, and is a no-op once everything is gone.
func (b *Bed) Close() error {
	b.closed.Store(true)
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	// Every veth has one end in the switch or in a fake VM: deleting those
	// ends (one batch per namespace) cuts every namespace off from every
	// other, even one a lingering socket keeps alive. The kernel removes
	// the rest (bridges, loopbacks) with the namespaces, in the background.
	for _, n := range b.netns {
		if n == b.LAN.NSName || b.isFakeVMNetns(n) {
			if err := deleteGroup(netnsPath(n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	var left []string
	for _, n := range b.netns {
		if err := removeNetns(n, false); err != nil {
			errs = append(errs, err)
			if _, serr := os.Stat(netnsPath(n)); serr == nil {
				left = append(left, n)
			}
		}
	}
	b.netns = left
	if len(left) == 0 && b.lock != nil {
		if err := b.lock.release(); err != nil {
			errs = append(errs, fmt.Errorf("release lock: %w", err))
		}
		b.lock = nil
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close bed %s-%d: %w", b.Prefix, b.Slot, err)
	}
	b.log.Debug("bed removed")
	return nil
}

func (b *Bed) isFakeVMNetns(name string) bool {
	for _, v := range b.vms {
		if v.NSName == name {
			return true
		}
	}
	return false
}

func (b *Bed) checkOpen() error {
	if b.closed.Load() {
		return fmt.Errorf("bed %s-%d: %w", b.Prefix, b.Slot, ErrClosed)
	}
	return nil
}
