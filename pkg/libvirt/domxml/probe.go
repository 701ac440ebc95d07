package domxml

import (
	"encoding/xml"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Probe is ftctl's record of how a client reaches the VM on its LAN:
//
//	<ftctl:probe addrs='10.0.0.5,fd00::5' tcp='22,80'/>
//
// one element in ftctl's <protection>, both attributes comma-separated
// lists (a single element, so the whole probe is replaced or removed at
// once; the ports apply to every address, as the agent's arbiter probes
// them). Before a secondary promotes itself it pings these addresses and
// tries these TCP ports: a VM that still answers means its primary lives
// and only the replication link broke, so it does not take over. addrs is
// required, tcp optional (ICMP only). Reading it checks every value:
// addresses must parse as IP addresses (net/netip, zones allowed) and
// must not be unspecified or multicast, ports must be in 1..65535; a bad
// record makes ParseDomain fail with ErrBadXML naming the value.
type Probe struct {
	// Addrs are the VM's IP addresses in canonical form (netip), in
	// recorded order, without duplicates.
	Addrs []string
	// TCPPorts are services of the VM to try, in recorded order, without
	// duplicates; none means ICMP only.
	TCPPorts []int

	seen bool // a second <probe> in the same record is an error
}

// probeError is a malformed probe record; ParseDomain wraps it with
// ErrBadXML, and plan recognises it to let new probe options repair it.
type probeError struct{ msg string }

func (e *probeError) Error() string { return "ftctl probe record: " + e.msg }

// UnmarshalXML reads and checks a <probe> record.
func (p *Probe) UnmarshalXML(d *xml.Decoder, start xml.StartElement) error {
	if p.seen {
		return &probeError{"more than one <probe> element (one element lists every address)"}
	}
	var addrs, tcp string
	for _, a := range start.Attr {
		switch {
		case a.Name.Space != "":
		case a.Name.Local == "addrs":
			addrs = a.Value
		case a.Name.Local == "tcp":
			tcp = a.Value
		}
	}
	if err := d.Skip(); err != nil {
		return err
	}
	if len(splitList(addrs)) == 0 {
		return &probeError{"no addrs (the VM's IP addresses, comma-separated)"}
	}
	var ports []int
	for _, s := range splitList(tcp) {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 65535 {
			return &probeError{fmt.Sprintf("tcp port %q is not a number in 1..65535", s)}
		}
		ports = append(ports, n)
	}
	np, err := NewProbe(splitList(addrs), ports)
	if err != nil {
		return &probeError{err.Error()}
	}
	*p = *np
	p.seen = true
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// NewProbe checks a probe's addresses and ports and returns the record
// Prepare would write: canonical addresses, duplicates dropped, order
// kept. At least one address is required. Errors name the bad value
// (callers wrap them: Prepare with ErrBadOptions).
func NewProbe(addrs []string, tcpPorts []int) (*Probe, error) {
	if len(addrs) == 0 {
		if len(tcpPorts) > 0 {
			return nil, fmt.Errorf("probe TCP ports %v without a probe address", tcpPorts)
		}
		return nil, fmt.Errorf("no probe address")
	}
	p := &Probe{}
	for _, s := range addrs {
		if strings.ContainsAny(s, ", \t\n'\"") {
			return nil, fmt.Errorf("probe address %q contains a comma, quote or space (give one address per value)", s)
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("probe address %q is not an IP address: %v", s, err)
		}
		switch {
		case a.IsUnspecified():
			return nil, fmt.Errorf("probe address %q is unspecified: it names no VM", s)
		case a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
			return nil, fmt.Errorf("probe address %q is a multicast or broadcast address: others would answer for the VM", s)
		}
		if c := a.String(); !slices.Contains(p.Addrs, c) {
			p.Addrs = append(p.Addrs, c)
		}
	}
	for _, n := range tcpPorts {
		if n < 1 || n > 65535 {
			return nil, fmt.Errorf("probe TCP port %d is not in 1..65535", n)
		}
		if !slices.Contains(p.TCPPorts, n) {
			p.TCPPorts = append(p.TCPPorts, n)
		}
	}
	return p, nil
}

// ProbeSpec returns the recorded probe as the agent's arbiter takes it
// (agent.ProbeSpec{Addrs, TCPPorts}): copies, nil when no probe is
// recorded. It is safe on a nil Protection.
func (p *Protection) ProbeSpec() (addrs []string, tcpPorts []int) {
	if p == nil || p.Probe == nil {
		return nil, nil
	}
	return slices.Clone(p.Probe.Addrs), slices.Clone(p.Probe.TCPPorts)
}

// String renders the probe for findings: "10.0.0.5, fd00::5 (TCP 22, 80)".
func (p *Probe) String() string {
	s := strings.Join(p.Addrs, ", ")
	if len(p.TCPPorts) == 0 {
		return s + " (ICMP only)"
	}
	ports := make([]string, len(p.TCPPorts))
	for i, n := range p.TCPPorts {
		ports[i] = strconv.Itoa(n)
	}
	return s + " (TCP " + strings.Join(ports, ", ") + ")"
}

// attrs are the record's attribute values as Prepare writes them.
func (p *Probe) attrs() (addrs, tcp string) {
	ports := make([]string, len(p.TCPPorts))
	for i, n := range p.TCPPorts {
		ports[i] = strconv.Itoa(n)
	}
	return strings.Join(p.Addrs, ","), strings.Join(ports, ",")
}

func (p *Probe) equal(q *Probe) bool {
	if p == nil || q == nil {
		return p == q
	}
	return slices.Equal(p.Addrs, q.Addrs) && slices.Equal(p.TCPPorts, q.TCPPorts)
}

// probeWhy is why a probe matters, for findings.
const probeWhy = "before promoting, the secondary checks whether the VM still answers on its LAN: if it does, the primary lives and only the replication link broke, so it does not take over"

// checkProbe decides the probe record's change from the options and
// reports it. peer is the peer the domain will have after Prepare.
func (p *preparePlan) checkProbe(prot Protection, peer string) {
	probe := prot.Probe
	if p.opts.ProbeAddrs != nil {
		var want *Probe
		if len(p.opts.ProbeAddrs) > 0 {
			want = p.newProbe // checked by withDefaults
		}
		if p.badProbe != "" {
			p.setProbe = true
			fix := "remove it"
			if want != nil {
				fix = "record probe " + want.String()
			}
			p.add(Change, "probe", "malformed probe record: "+p.badProbe, probeWhy, fix)
		} else if !want.equal(probe) {
			p.setProbe = true
			switch {
			case want == nil:
				p.add(Change, "probe", "probe "+probe.String(), probeWhy, "remove the probe record")
			case probe == nil:
				p.add(Change, "probe", "no probe recorded", probeWhy, "record probe "+want.String())
			default:
				p.add(Change, "probe", "probe "+probe.String(), probeWhy, "record probe "+want.String())
			}
		}
		probe = want
	}
	switch {
	case probe == nil && peer != "":
		p.add(Warning, "probe", "no probe address",
			"without a probe address the secondary cannot tell a dead primary from a broken link unless a management network or a witness decides: it will not promote on its own",
			"prepare --probe-addr IP (the VM's LAN address; repeat for more) and --probe-tcp PORT for a service it runs")
	case probe == nil:
		p.add(Info, "probe", "no probe address", probeWhy, "prepare --probe-addr IP [--probe-tcp PORT] before pairing")
	default:
		p.add(Info, "probe", "probe "+probe.String(), probeWhy, "")
		for _, s := range probe.Addrs {
			if a, err := netip.ParseAddr(s); err == nil && a.IsLoopback() {
				p.add(Warning, "probe", "loopback probe address "+s,
					"the secondary would probe its own host, which always answers: it would never promote",
					"give the VM's LAN address")
			}
		}
	}
}

// fixProbe writes the decided probe record into ftctl's element prot
// (prefix pfx), in place when one exists; it returns a new record to
// append, or nil.
func (p *preparePlan) fixProbe(prot *Node, pfx string) *Node {
	var old *Node
	if prot != nil {
		old = prot.First(pfx + ":probe")
	}
	if len(p.opts.ProbeAddrs) == 0 {
		if old != nil {
			prot.Remove(old)
		}
		return nil
	}
	addrs, tcp := p.newProbe.attrs()
	if old == nil {
		n := NewElement(Prefix+":probe", "addrs", addrs)
		if tcp != "" {
			n.SetAttr("tcp", tcp)
		}
		return n
	}
	old.SetAttr("addrs", addrs)
	if tcp != "" {
		old.SetAttr("tcp", tcp)
	} else {
		old.RemoveAttr("tcp")
	}
	return nil
}

// stripProbes removes every probe record from ftctl's element, for
// Prepare with new probe options to replace a malformed one.
func stripProbes(doc *Document) {
	prot, _ := findProtection(doc.Root())
	if prot == nil {
		return
	}
	for _, n := range prot.All(protPrefix(prot) + ":probe") {
		prot.Remove(n)
	}
}
