package domxml

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// ErrUnsupported is wrapped by Prepare's error when the domain has
// something ftctl cannot protect (the Blocker findings).
var ErrUnsupported = errors.New("domain cannot be protected")

// ErrBadOptions is wrapped by errors about Options.
var ErrBadOptions = errors.New("bad prepare options")

// Severity orders findings from harmless to fatal.
type Severity int

// Severities.
const (
	// Info: already as protection needs it, or a fact worth knowing.
	Info Severity = iota
	// Change: protection needs it changed; Prepare changes it.
	Change
	// Warning: protection works, but the user should act or know.
	Warning
	// Blocker: protection cannot work; Prepare refuses the domain.
	Blocker
)

func (s Severity) String() string {
	switch s {
	case Info:
		return "ok"
	case Change:
		return "change"
	case Warning:
		return "warning"
	case Blocker:
		return "blocker"
	}
	return "severity(" + strconv.Itoa(int(s)) + ")"
}

// Finding is one thing Check found: what, why it matters, and what
// Prepare (or the user) does about it.
type Finding struct {
	Severity Severity
	// Area names the part of the domain: "memory", "disk vda",
	// "nic 52:54:00:..", "qmp", "cpu", "device hostdev", "domain".
	Area    string
	Problem string
	Why     string
	Fix     string
}

func (f Finding) String() string {
	s := fmt.Sprintf("[%s] %s: %s", f.Severity, f.Area, f.Problem)
	if f.Why != "" {
		s += " (" + f.Why + ")"
	}
	if f.Fix != "" {
		s += "; " + f.Fix
	}
	return s
}

// NICMode says how Prepare routes a NIC's traffic through the agent.
type NICMode string

// NIC modes.
const (
	// NICStream replaces the <interface> with QEMU's `-netdev stream` to a
	// unix socket the agent listens on, through <qemu:commandline>: libvirt
	// 9.0 has no element for -netdev stream (its only use of it is the
	// passt backend, which Debian's libvirt 9.0 rejects and which spawns
	// passt on a socket libvirt picks). The socket is a file with owner
	// and mode; libvirt no longer knows the NIC (virsh domiflist omits it)
	// and marks the domain tainted "custom-argv".
	NICStream NICMode = "stream"
	// NICClient rewrites the <interface> as libvirt's own type='client':
	// QEMU `-netdev socket,connect=127.0.0.1:PORT`, whose frames carry the
	// same 4-byte big-endian length as -netdev stream (verified with QEMU
	// 7.2 and libvirt 9.0 here). libvirt keeps managing the NIC, but the
	// agent's end is a TCP port on the host's loopback, which any local
	// process can race to take, and the agent must listen on TCP.
	NICClient NICMode = "client"
)

// QMPMode says how the agent reaches QEMU's monitor.
type QMPMode string

// QMP modes.
const (
	// QMPSocket adds a second QMP monitor on a unix socket through
	// <qemu:commandline> (-chardev socket + -mon): the agent's own client,
	// with request ids, events and deadlines, talks to QEMU directly, not
	// through libvirtd's RPC and per-domain job lock. libvirt still sees
	// every event on its own monitor, so its view (running, paused)
	// follows stop and cont issued on this socket (verified here).
	QMPSocket QMPMode = "socket"
	// QMPPassthrough changes nothing: the agent sends QMP through
	// libvirt's monitor pass-through (virDomainQemuMonitorCommand). Every
	// command is a libvirtd RPC serialised with libvirt's own jobs on the
	// domain, and the domain is tainted "custom-monitor".
	QMPPassthrough QMPMode = "passthrough"
)

// DefaultRunDir is where the agent keeps per-VM sockets (pkg/agent's
// default RunDir).
const DefaultRunDir = "/run/ftctl"

// Options steer Prepare (and what Check expects).
type Options struct {
	// SocketDir holds the sockets Prepare points the domain at. Default
	// DefaultRunDir/vms/NAME, where the agent puts them.
	SocketDir string
	NIC       NICMode // default NICStream
	// NICPort is the first loopback TCP port for NICClient; NIC i gets
	// NICPort+i. Required for NICClient.
	NICPort int
	QMP     QMPMode // default QMPSocket
	// Export is the NBD export name. Default "disk", as the agent serves.
	Export string
	// Peer, when set, is recorded as the peer agent (HOST:PORT) the hook
	// pairs the domain with on start; "" keeps what the domain has.
	Peer string
	// Policy, when set, is recorded as the hook's policy; "" keeps what
	// the domain has.
	Policy Policy
	// ProbeAddrs, when non-nil, replace the recorded probe (see Probe):
	// the VM's LAN addresses the secondary probes before it promotes
	// itself. nil keeps what the domain has; an empty non-nil slice
	// removes the record.
	ProbeAddrs []string
	// ProbeTCPPorts are the probe's TCP ports, recorded with ProbeAddrs
	// (the record is replaced as a whole, so they need ProbeAddrs).
	ProbeTCPPorts []int
}

// Policy says what `ftctl hook` does for a domain when libvirt starts or
// stops it.
type Policy string

// Policies.
const (
	// PolicyAuto pairs the domain with its peer when it starts and unpairs
	// it when it stops. It is the default for a domain with a peer.
	PolicyAuto Policy = "auto"
	// PolicyManual leaves pairing to the user (ftctl pair / unpair).
	PolicyManual Policy = "manual"
)

func (o Options) withDefaults(name string) (Options, error) {
	if o.SocketDir == "" {
		o.SocketDir = filepath.Join(DefaultRunDir, "vms", name)
	}
	if !filepath.IsAbs(o.SocketDir) {
		return o, fmt.Errorf("%w: socket directory %q is not absolute", ErrBadOptions, o.SocketDir)
	}
	if strings.ContainsAny(o.SocketDir, ",'\"") {
		return o, fmt.Errorf("%w: socket directory %q contains a comma or quote (QEMU option syntax)", ErrBadOptions, o.SocketDir)
	}
	if o.NIC == "" {
		o.NIC = NICStream
	}
	switch o.NIC {
	case NICStream:
	case NICClient:
		if o.NICPort <= 0 || o.NICPort > 65535 {
			return o, fmt.Errorf("%w: NIC mode client needs a TCP port in 1..65535 (got %d)", ErrBadOptions, o.NICPort)
		}
	default:
		return o, fmt.Errorf("%w: unknown NIC mode %q (want %q or %q)", ErrBadOptions, o.NIC, NICStream, NICClient)
	}
	if o.QMP == "" {
		o.QMP = QMPSocket
	}
	if o.QMP != QMPSocket && o.QMP != QMPPassthrough {
		return o, fmt.Errorf("%w: unknown QMP mode %q (want %q or %q)", ErrBadOptions, o.QMP, QMPSocket, QMPPassthrough)
	}
	if o.Export == "" {
		o.Export = "disk"
	}
	if o.Peer != "" {
		if err := ValidPeer(o.Peer); err != nil {
			return o, fmt.Errorf("%w: %w", ErrBadOptions, err)
		}
	}
	switch o.Policy {
	case "", PolicyAuto, PolicyManual:
	default:
		return o, fmt.Errorf("%w: unknown policy %q (want %q or %q)", ErrBadOptions, o.Policy, PolicyAuto, PolicyManual)
	}
	switch {
	case o.ProbeAddrs == nil && len(o.ProbeTCPPorts) > 0:
		return o, fmt.Errorf("%w: probe TCP ports %v without probe addresses (the probe record is replaced as a whole)", ErrBadOptions, o.ProbeTCPPorts)
	case o.ProbeAddrs != nil && len(o.ProbeAddrs) == 0 && len(o.ProbeTCPPorts) > 0:
		return o, fmt.Errorf("%w: probe TCP ports %v while removing the probe record", ErrBadOptions, o.ProbeTCPPorts)
	case len(o.ProbeAddrs) > 0:
		if _, err := NewProbe(o.ProbeAddrs, o.ProbeTCPPorts); err != nil {
			return o, fmt.Errorf("%w: %w", ErrBadOptions, err)
		}
	}
	return o, nil
}

// Check lists what the domain needs for protection and why, assuming
// default Options.
func Check(domainXML string) ([]Finding, error) {
	return CheckWith(domainXML, Options{})
}

// CheckWith is Check for the given Options.
func CheckWith(domainXML string, opts Options) ([]Finding, error) {
	p, err := plan(domainXML, opts)
	if err != nil {
		return nil, err
	}
	return p.findings, nil
}

// Blockers returns the findings of severity Blocker.
func Blockers(fs []Finding) []Finding {
	var out []Finding
	for _, f := range fs {
		if f.Severity == Blocker {
			out = append(out, f)
		}
	}
	return out
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$`)

// diskPlan says what to do with one <disk>.
type diskPlan struct {
	index   int // among <disk> elements
	convert bool
	rec     ProtectedDisk
}

// nicPlan says what to do with one <interface>.
type nicPlan struct {
	index   int // among <interface> elements
	convert bool
	rec     ProtectedNIC
	model   string // QEMU device driver for NICStream
	bus     string // QEMU bus id
	slot    string // PCI slot, "0x1e"
	fn      string
	boot    string
}

type preparePlan struct {
	dom      *Domain
	doc      *Document
	pciSlots map[string]bool // "bus:slot" in use, numbers in decimal
	opts     Options
	findings []Finding
	memory   bool // the ftmem backend must be added or resized
	memSize  int  // MiB, from <memory>
	memFile  string
	disks    []diskPlan
	nics     []nicPlan
	addQMP   bool
	// setPeer, setPolicy: the metadata's peer / policy attribute changes.
	setPeer, setPolicy bool
	// setProbe: the probe record changes to newProbe (nil: removed).
	setProbe bool
	newProbe *Probe
	// badProbe says what was wrong with a malformed probe record the
	// probe options replace ("" when there was none).
	badProbe string
}

func (p *preparePlan) add(sev Severity, area, problem, why, fix string) {
	p.findings = append(p.findings, Finding{Severity: sev, Area: area, Problem: problem, Why: why, Fix: fix})
}

// plan inspects the domain and decides every change Prepare makes; Check
// reports the same decisions as findings, so the two cannot disagree.
func plan(domainXML string, opts Options) (*preparePlan, error) {
	doc, err := Parse([]byte(domainXML))
	if err != nil {
		return nil, err
	}
	if r := doc.Root(); r.Name != "domain" {
		return nil, fmt.Errorf("%w: root element is <%s>, not <domain>", ErrBadXML, r.Name)
	}
	dom, err := ParseDomain([]byte(domainXML))
	var pe *probeError
	var badProbe string
	if errors.As(err, &pe) && opts.ProbeAddrs != nil {
		// New probe options replace a malformed record, so prepare can
		// repair a hand edit.
		stripProbes(doc)
		dom, err = ParseDomain([]byte(doc.String()))
		badProbe = pe.msg
	}
	if err != nil {
		return nil, err
	}
	if !nameRE.MatchString(dom.Name) {
		return nil, fmt.Errorf("%w: domain name %q is not usable in a socket path", ErrBadXML, dom.Name)
	}
	opts, err = opts.withDefaults(dom.Name)
	if err != nil {
		return nil, err
	}
	p := &preparePlan{dom: dom, doc: doc, opts: opts, pciSlots: pciSlots(doc.Root().First("devices")), badProbe: badProbe}
	if len(opts.ProbeAddrs) > 0 {
		p.newProbe, _ = NewProbe(opts.ProbeAddrs, opts.ProbeTCPPorts) // checked by withDefaults
	}
	var prot Protection
	if dom.Metadata != nil && dom.Metadata.Protection != nil {
		prot = *dom.Metadata.Protection
	}
	// The typed view resolves namespaces, the tree Prepare rewrites goes
	// by prefix; a probe record only one of them sees would be written
	// twice or not at all.
	if node, _ := findProtection(doc.Root()); (prot.Probe != nil) != (node != nil && node.First(protPrefix(node)+":probe") != nil) {
		return nil, fmt.Errorf("%w: domain %s: ftctl's probe record is not a child of ftctl's <protection> element under its prefix", ErrBadXML, dom.Name)
	}

	switch dom.Type {
	case "kvm", "qemu":
		p.add(Info, "domain", "type "+dom.Type, "", "")
	default:
		p.add(Blocker, "domain", fmt.Sprintf("domain type %q", dom.Type),
			"ftctl drives QEMU directly (QMP, migration stream, guest RAM file)", "only kvm and qemu domains can be protected")
	}
	if a := dom.OS.Type.Arch; a != "" && a != "x86_64" && a != "i686" {
		p.add(Warning, "domain", "architecture "+a, "ftctl is tested on x86_64 only", "")
	}

	if err := p.checkMemory(prot); err != nil {
		return nil, err
	}
	p.checkCPU()
	p.checkDisks(prot)
	p.checkNICs(prot)
	p.checkQMP(prot)
	p.checkOtherDevices()
	peer := p.checkPairing(prot)
	p.checkProbe(prot, peer)
	return p, nil
}

// ValidPeer checks a peer agent address: HOST:PORT with a numeric port,
// and nothing that could break out of an XML attribute or a shell word.
func ValidPeer(peer string) error {
	host, port, err := net.SplitHostPort(peer)
	if err != nil {
		return fmt.Errorf("peer %q is not HOST:PORT: %v", peer, err)
	}
	if host == "" {
		return fmt.Errorf("peer %q has no host", peer)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("peer %q: port %q is not a number in 1..65535", peer, port)
	}
	for _, r := range host {
		if !(r == '.' || r == '-' || r == ':' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return fmt.Errorf("peer %q: host contains %q", peer, r)
		}
	}
	return nil
}

// EffectivePolicy is the hook's policy for a domain's protection record:
// its own policy, else PolicyAuto when it names a peer, else PolicyManual.
func EffectivePolicy(p *Protection) Policy {
	switch {
	case p == nil:
		return PolicyManual
	case p.Policy != "":
		return Policy(p.Policy)
	case p.Peer != "":
		return PolicyAuto
	}
	return PolicyManual
}

// checkPairing reports the pairing record and returns the peer the
// domain has after Prepare.
func (p *preparePlan) checkPairing(prot Protection) string {
	peer, policy := prot.Peer, Policy(prot.Policy)
	if p.opts.Peer != "" && p.opts.Peer != peer {
		p.setPeer = true
		p.add(Change, "pairing", fmt.Sprintf("peer %q", peer), "the hook pairs the domain with the peer recorded in ftctl's metadata",
			"record peer "+p.opts.Peer)
		peer = p.opts.Peer
	}
	if p.opts.Policy != "" && p.opts.Policy != policy {
		p.setPolicy = true
		p.add(Change, "pairing", fmt.Sprintf("policy %q", policy), "the hook follows the policy recorded in ftctl's metadata",
			"record policy "+string(p.opts.Policy))
		policy = p.opts.Policy
	}
	eff := EffectivePolicy(&Protection{Peer: peer, Policy: string(policy)})
	switch {
	case peer == "" && eff == PolicyAuto:
		p.add(Warning, "pairing", "policy auto without a peer", "the hook has no peer to pair with", "prepare --peer HOST:PORT")
	case peer == "":
		p.add(Info, "pairing", "no peer recorded", "`ftctl hook` pairs only domains whose metadata names a peer",
			"prepare --peer HOST:PORT to pair it automatically when it starts, or run ftctl pair by hand")
	case eff == PolicyManual:
		p.add(Info, "pairing", "peer "+peer+", policy manual", "the hook leaves pairing to the user", "")
	default:
		p.add(Info, "pairing", "peer "+peer+", policy auto", "the hook pairs the domain when it starts and unpairs it when it stops", "")
	}
	return peer
}

func (p *preparePlan) checkCPU() {
	if p.dom.CPU != nil && p.dom.CPU.Mode == "host-passthrough" {
		p.add(Warning, "cpu", "host-passthrough",
			"device state restores on the peer only if its CPU offers the same features",
			"use identical hosts, or host-model / a named CPU model")
	}
}

func (p *preparePlan) checkDisks(prot Protection) {
	known := map[string]ProtectedDisk{}
	for _, d := range prot.Disks {
		known[d.Target] = d
	}
	next := len(prot.Disks)
	targets := map[string]bool{}
	for i, d := range p.dom.Devices.Disks {
		area := "disk " + d.Target.Dev
		if d.Target.Dev == "" {
			area = fmt.Sprintf("disk #%d", i)
		}
		dev := d.Device
		if dev == "" {
			dev = "disk"
		}
		if dev != "disk" || d.ReadOnly != nil {
			path := ""
			if d.Source != nil {
				path = d.Source.File + d.Source.Dev
			}
			if path != "" {
				p.add(Warning, area, "read-only "+dev+" "+path, "it is not replicated",
					"make the same file available at the same path on the peer")
			}
			continue
		}
		if d.Shareable != nil {
			p.add(Blocker, area, "shareable disk", "another VM writes it; its content cannot follow this VM's epochs", "")
			continue
		}
		if d.Transient != nil {
			p.add(Blocker, area, "transient disk", "its writes are thrown away on shutdown, not replicated", "")
			continue
		}
		if d.Target.Dev == "" {
			// The target names the disk in ftctl's metadata; libvirt itself
			// refuses a disk without one.
			p.add(Blocker, area, "disk without <target dev=...>", "ftctl records each disk by its target", "give the disk a target, as libvirt requires")
			continue
		}
		if targets[d.Target.Dev] {
			p.add(Blocker, area, "second disk with target "+d.Target.Dev, "ftctl records each disk by its target", "give each disk its own target, as libvirt requires")
			continue
		}
		targets[d.Target.Dev] = true
		switch d.Type {
		case "network":
			if d.Source != nil && d.Source.Protocol == "nbd" && len(d.Source.Hosts) == 1 && d.Source.Hosts[0].Transport == "unix" {
				if k, ok := known[d.Target.Dev]; ok && k.Socket == d.Source.Hosts[0].Socket {
					p.add(Info, area, "served by the agent over NBD at "+k.Socket, "", "")
					continue
				}
				p.add(Blocker, area, "NBD disk not prepared by ftctl", "ftctl cannot tell which image backs it", "prepare the domain from its original disk")
				continue
			}
			proto := ""
			if d.Source != nil {
				proto = d.Source.Protocol
			}
			p.add(Blocker, area, "network disk ("+proto+")",
				"shared storage sees the primary's speculative writes before their epoch commits (DESIGN invariant 2)", "use a local image")
			continue
		case "file", "block":
		case "volume":
			p.add(Blocker, area, "storage pool volume", "ftctl needs the image path", "use <disk type='file'> with the volume's path")
			continue
		default:
			p.add(Blocker, area, "disk type "+strconv.Quote(d.Type), "", "")
			continue
		}
		src := ""
		if d.Source != nil {
			src = d.Source.File + d.Source.Dev
		}
		if src == "" {
			p.add(Blocker, area, "disk has no source", "", "")
			continue
		}
		format := "raw"
		if d.Driver != nil && d.Driver.Type != "" {
			format = d.Driver.Type
		}
		if format != "raw" {
			p.add(Blocker, area, "image format "+format,
				"the agent's NBD server serves raw images only",
				fmt.Sprintf("convert it (qemu-img convert -O raw %s NEW.img) and point the disk at the copy", src))
			continue
		}
		rec := ProtectedDisk{
			Target: d.Target.Dev, Type: d.Type, Source: src, Format: format, Export: p.opts.Export,
			Socket: filepath.Join(p.opts.SocketDir, fmt.Sprintf("nbd%d.sock", next)),
		}
		next++
		p.disks = append(p.disks, diskPlan{index: i, convert: true, rec: rec})
		p.add(Change, area, d.Type+" "+src,
			"the agent must see every guest write, to stream it to the peer as an event of the current epoch",
			"serve it through the agent: <disk type='network'><source protocol='nbd'> on "+rec.Socket)
		if d.Driver != nil && d.Driver.IO == "native" {
			p.add(Info, area, "io='native' dropped", "it needs O_DIRECT on a local file; NBD has none", "")
		}
	}
}

var nicModels = map[string]string{
	"virtio":  "virtio-net-pci",
	"e1000":   "e1000",
	"e1000e":  "e1000e",
	"rtl8139": "rtl8139",
}

func (p *preparePlan) checkNICs(prot Protection) {
	known := map[string]ProtectedNIC{}
	for _, n := range prot.NICs {
		known[strings.ToLower(n.MAC)] = n
	}
	for _, k := range prot.NICs {
		if k.Mode != string(NICStream) {
			continue
		}
		if p.dom.hasArgContaining(",addr.path=" + k.Socket) {
			p.add(Info, "nic "+k.MAC, "buffered by the agent on "+k.Socket, "", "")
		} else {
			p.add(Warning, "nic "+k.MAC, "ftctl metadata lists a stream NIC on "+k.Socket+" but <qemu:commandline> has no -netdev for it",
				"the guest has lost that NIC", "restore the domain from its backup and prepare it again")
		}
	}
	next := len(prot.NICs)
	usedSlots := p.usedPCISlots()
	for i, n := range p.dom.Devices.Interfaces {
		mac := ""
		if n.MAC != nil {
			mac = strings.ToLower(n.MAC.Address)
		}
		area := "nic " + mac
		if mac == "" {
			area = fmt.Sprintf("nic #%d", i)
		}
		if k, ok := known[mac]; ok && mac != "" && n.Type == "client" && n.Source != nil &&
			n.Source.Address == "127.0.0.1" && n.Source.Port == k.Port {
			p.add(Info, area, "buffered by the agent on 127.0.0.1:"+k.Port, "", "")
			continue
		}
		switch n.Type {
		case "hostdev", "vdpa":
			p.add(Blocker, area, "interface type "+n.Type, "a passed-through device's state cannot be checkpointed", "")
			continue
		case "vhostuser":
			p.add(Blocker, area, "interface type vhostuser", "its packets bypass any socket the agent can buffer", "")
			continue
		}
		model := "rtl8139"
		if n.Model != nil && n.Model.Type != "" {
			model = n.Model.Type
		}
		drv, ok := nicModels[model]
		if !ok {
			p.add(Blocker, area, "NIC model "+model, "ftctl knows virtio, e1000, e1000e and rtl8139", "")
			continue
		}
		np := nicPlan{index: i, convert: true, model: drv}
		if mac == "" {
			mac = derivedMAC(p.dom.Name, next)
			p.add(Info, area, "no MAC; using "+mac, "the standby must present the same MAC", "")
		}
		np.rec = ProtectedNIC{MAC: mac, Mode: string(p.opts.NIC)}
		if n.Boot != nil {
			np.boot = n.Boot.Order
		}
		if p.opts.NIC == NICClient {
			np.rec.Port = strconv.Itoa(p.opts.NICPort + next)
		} else {
			np.rec.Socket = filepath.Join(p.opts.SocketDir, fmt.Sprintf("nic%d.sock", next))
			bus, slot, fn, err := p.pciPlacement(n.Address, usedSlots)
			if err != nil {
				p.add(Blocker, area, err.Error(), "", "")
				continue
			}
			np.bus, np.slot, np.fn = bus, slot, fn
		}
		next++
		p.nics = append(p.nics, np)
		why := "every frame the guest sends must wait in the agent until its epoch commits on the peer (DESIGN invariant 1)"
		if p.opts.NIC == NICClient {
			p.add(Change, area, "interface type "+n.Type, why,
				"make it <interface type='client'> to 127.0.0.1:"+np.rec.Port+" (QEMU -netdev socket); the agent attaches the traffic where the original interface was")
		} else {
			p.add(Change, area, "interface type "+n.Type, why,
				"replace it with QEMU -netdev stream to "+np.rec.Socket+" via <qemu:commandline> (libvirt 9.0 has no element for it); the agent attaches the traffic where the original interface was")
		}
	}
}

// usedPCISlots lists "bus:slot" of every PCI address in <devices>.
func (p *preparePlan) usedPCISlots() map[string]bool {
	return p.pciSlots
}

func pciSlots(devices *Node) map[string]bool {
	used := map[string]bool{}
	var walk func(n *Node)
	walk = func(n *Node) {
		for _, c := range n.Elements() {
			if c.Name == "address" && c.A("type") == "pci" {
				b, err1 := strconv.ParseUint(c.A("bus"), 0, 8)
				s, err2 := strconv.ParseUint(c.A("slot"), 0, 8)
				if err1 == nil && err2 == nil {
					used[fmt.Sprintf("%d:%d", b, s)] = true
				}
			}
			walk(c)
		}
	}
	if devices != nil {
		walk(devices)
	}
	return used
}

// pciPlacement keeps the replaced NIC at its PCI address, so the guest
// sees the same device in the same slot (and names it the same); without
// an address it picks a free high slot on bus 0, away from the low slots
// libvirt assigns.
func (p *preparePlan) pciPlacement(a *PCIAddress, used map[string]bool) (bus, slot, fn string, err error) {
	root := "pci.0"
	if strings.Contains(p.dom.OS.Type.Machine, "q35") {
		root = "pcie.0"
	}
	if a != nil && a.Type != "" {
		if a.Type != "pci" {
			return "", "", "", fmt.Errorf("NIC address type %q (only pci is supported)", a.Type)
		}
		b, err := strconv.ParseUint(a.Bus, 0, 8)
		if err != nil {
			return "", "", "", fmt.Errorf("NIC PCI bus %q: %v", a.Bus, err)
		}
		bus = root
		if b != 0 {
			bus = "pci." + strconv.FormatUint(b, 10)
		}
		fn = a.Function
		if fn == "" {
			fn = "0x0"
		}
		return bus, a.Slot, fn, nil
	}
	for s := 0x1e; s >= 0x03; s-- {
		k := fmt.Sprintf("0:%d", s)
		if !used[k] {
			used[k] = true
			return root, fmt.Sprintf("0x%02x", s), "0x0", nil
		}
	}
	return "", "", "", errors.New("no free PCI slot on bus 0")
}

// derivedMAC makes a stable MAC in QEMU's 52:54:00 range from the domain
// name, for NICs without one (libvirt would invent a random one at define
// time, which the standby could not repeat).
func derivedMAC(name string, i int) string {
	var h uint32 = 2166136261
	for _, c := range []byte(name) {
		h = (h ^ uint32(c)) * 16777619
	}
	h = (h ^ uint32(i)) * 16777619
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", byte(h>>16), byte(h>>8), byte(h))
}

func (p *preparePlan) checkQMP(prot Protection) {
	have := prot.QMP != nil && p.dom.hasArg("socket,id="+qmpChardev+",")
	switch {
	case have:
		p.add(Info, "qmp", "dedicated QMP socket "+prot.QMP.Socket, "", "")
	case p.opts.QMP == QMPSocket:
		p.addQMP = true
		p.add(Change, "qmp", "no QMP socket for the agent",
			"each checkpoint is a few QMP commands (stop, migrate, cont); a direct socket avoids a libvirtd round trip and its domain job lock on each",
			"add a second QMP monitor on "+filepath.Join(p.opts.SocketDir, "qmp.sock")+" via <qemu:commandline>")
	default:
		p.add(Info, "qmp", "QMP through libvirt's monitor pass-through",
			"works without changing the domain; each command is a libvirtd RPC and the domain is tainted custom-monitor", "")
	}
}

func (p *preparePlan) checkOtherDevices() {
	d := p.dom.Devices
	if len(d.Hostdevs) > 0 {
		p.add(Blocker, "device hostdev", fmt.Sprintf("%d passed-through host device(s)", len(d.Hostdevs)),
			"their state cannot be captured in a checkpoint", "remove them")
	}
	for _, f := range d.Filesystems {
		if f.Driver != nil && f.Driver.Type == "virtiofs" {
			p.add(Blocker, "device filesystem", "virtiofs share", "vhost-user-fs devices cannot be migrated, so not checkpointed", "")
		}
	}
	if len(d.Shmems) > 0 {
		p.add(Blocker, "device shmem", "ivshmem device", "memory shared with the host or other VMs is outside the checkpoint", "")
	}
	for _, t := range d.TPMs {
		if t.Backend != nil && t.Backend.Type == "emulator" {
			p.add(Warning, "device tpm", "emulated TPM", "swtpm's state is not in QEMU's migration stream; it is not replicated", "")
		}
	}
	if len(d.Redirdevs) > 0 {
		p.add(Blocker, "device redirdev", "USB redirection", "a redirected device cannot follow the VM to the peer", "")
	}
	for _, v := range d.Videos {
		p.checkVideo(v)
	}
}

// checkVideo warns about a display adapter: its video RAM is QEMU RAM
// outside the shared guest RAM file, so x-ignore-shared does not skip it
// and every checkpoint's device state carries it (zero pages as a few
// bytes each, drawn pages whole). Measured by TestLivePauseDevices (QEMU
// 7.2, TCG, a guest on the serial console that never draws): the device
// state grew from 322 KB to 469 KB with VGA's 16 MiB and to 754 KB with
// QXL's 128 MiB, the pause by about 1.3 and 4 ms. Prepare does not drop
// the device: the display is the user's to give up.
func (p *preparePlan) checkVideo(v Video) {
	model := "default"
	if v.Model != nil && v.Model.Type != "" {
		model = v.Model.Type
	}
	if model == "none" {
		return
	}
	var kib int64
	if v.Model != nil {
		for _, a := range []string{v.Model.VRAM, v.Model.RAM, v.Model.VGAMem} {
			if n, err := strconv.ParseInt(a, 10, 64); err == nil && n > 0 && n < 1<<40 {
				kib += n
			}
		}
	}
	size := "its video RAM"
	if kib > 0 {
		size = fmt.Sprintf("its %d MiB of video RAM", kib>>10)
	}
	p.add(Warning, "device video", "video model "+model,
		size+" is not in the shared guest RAM file, so every checkpoint's device state carries it: "+
			"each page the guest has drawn on is sent whole at every checkpoint, and even an unused adapter "+
			"adds about 0.15 MB and 1.3 ms (VGA, 16 MiB) to 0.4 MB and 4 ms (QXL, 128 MiB) per checkpoint",
		"a server VM needs no display: remove <graphics> and set <video><model type='none'/></video>, "+
			"use the serial console (virsh console)")
}
