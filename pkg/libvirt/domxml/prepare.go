package domxml

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// qmpChardev is the QEMU id of the agent's QMP chardev.
const qmpChardev = "ftqmp"

// Prepare returns the domain XML changed for protection, and a unified
// diff of the change ("" when the domain is already prepared: Prepare is
// idempotent). It uses libvirt's own elements where they exist and
// <qemu:commandline> only for what libvirt has no element for (guest RAM
// in a file of ftctl's choosing, the NIC stream, the QMP socket), records
// every replaced device in ftctl's <metadata>, and leaves every element,
// attribute, comment and byte it does not change as it was. A domain with
// Blocker findings is refused with an error wrapping ErrUnsupported.
func Prepare(domainXML string, opts Options) (newXML, diff string, err error) {
	p, err := plan(domainXML, opts)
	if err != nil {
		return "", "", err
	}
	if b := Blockers(p.findings); len(b) > 0 {
		msgs := make([]string, len(b))
		for i, f := range b {
			msgs[i] = f.Area + ": " + f.Problem
		}
		return "", "", fmt.Errorf("%w: %s", ErrUnsupported, strings.Join(msgs, "; "))
	}
	root := p.doc.Root()
	var args []string
	var recs []*Node

	if p.memory {
		args = append(args, p.fixMemory(root)...)
		if prot, _ := findProtection(root); prot != nil && prot.First(protPrefix(prot)+":memory") != nil {
			rec := prot.First(protPrefix(prot) + ":memory")
			rec.SetAttr("id", MemoryID)
			rec.SetAttr("file", p.memFile)
			rec.SetAttr("size-mib", strconv.Itoa(p.memSize))
		} else {
			recs = append(recs, NewElement(Prefix+":memory", "id", MemoryID, "file", p.memFile, "size-mib", strconv.Itoa(p.memSize)))
		}
	}
	devices := root.First("devices")
	if len(p.disks) > 0 {
		nodes := devices.All("disk")
		for _, dp := range p.disks {
			rewriteDisk(devices, nodes[dp.index], dp.rec)
			recs = append(recs, diskRecord(dp.rec))
		}
	}
	if len(p.nics) > 0 {
		nodes := devices.All("interface")
		nextID := 0
		if p.dom.Metadata != nil && p.dom.Metadata.Protection != nil {
			nextID = len(p.dom.Metadata.Protection.NICs)
		}
		for _, np := range p.nics {
			n := nodes[np.index]
			orig := n.Clone()
			if np.rec.Mode == string(NICClient) {
				rewriteClientNIC(devices, n, np.rec)
			} else {
				devices.Remove(n)
				args = append(args, streamNICArgs(nextID, np)...)
			}
			nextID++
			recs = append(recs, nicRecord(np.rec, orig))
		}
	}
	if p.addQMP {
		sock := filepath.Join(p.opts.SocketDir, "qmp.sock")
		args = append(args,
			"-chardev", "socket,id="+qmpChardev+",path="+sock+",server=on,wait=off",
			"-mon", "chardev="+qmpChardev+",mode=control")
		recs = append(recs, NewElement(Prefix+":qmp", "socket", sock))
	}
	if p.setProbe {
		prot, _ := findProtection(root)
		pfx := Prefix
		if prot != nil {
			pfx = protPrefix(prot)
		}
		if n := p.fixProbe(prot, pfx); n != nil {
			recs = append(recs, n)
		}
	}
	if len(recs) > 0 || p.setPeer || p.setPolicy {
		prot := p.addMetadata(root, recs)
		if p.setPeer {
			prot.SetAttr("peer", p.opts.Peer)
		}
		if p.setPolicy {
			prot.SetAttr("policy", string(p.opts.Policy))
		}
	}
	if len(args) > 0 {
		addCommandline(root, args)
	}
	newXML = p.doc.String()
	if newXML == domainXML {
		return newXML, "", nil
	}
	name := p.dom.Name + ".xml"
	return newXML, Unified("a/"+name, "b/"+name, domainXML, newXML), nil
}

// indentOf returns the whitespace ("\n" and spaces) that precedes child c
// in n, or a guess one level deeper than n's own indentation own.
func indentOf(n, c *Node, own string) string {
	for i, ch := range n.Children {
		if ch == c && i > 0 && n.Children[i-1].Kind == Text {
			if ws := lastLineWS(n.Children[i-1].Text); ws != "" {
				return ws
			}
		}
	}
	child, _ := n.indent(own)
	return child
}

// insertAfter puts c into n right after the first existing child element
// among after (tried in order), or before the first child element when
// none exists, indented like its siblings.
func insertAfter(n, c *Node, own string, after ...string) {
	ind := indentOf(n, nil, own)
	at := func(i int, nodes ...*Node) {
		rest := append([]*Node{}, n.Children[i:]...)
		n.Children = append(append(n.Children[:i], nodes...), rest...)
		if n.selfClose {
			n.dirty = true
		}
	}
	for _, name := range after {
		if ref := n.First(name); ref != nil {
			for i, ch := range n.Children {
				if ch == ref {
					at(i+1, &Node{Kind: Text, Text: ind}, c)
					return
				}
			}
		}
	}
	for i, ch := range n.Children {
		if ch.Kind == Element {
			at(i, c, &Node{Kind: Text, Text: ind})
			return
		}
	}
	n.Append(c, own)
}

func (n *Node) allOrNil(name string) []*Node {
	if n == nil {
		return nil
	}
	return n.All(name)
}

func rewriteDisk(devices, d *Node, rec ProtectedDisk) {
	own := indentOf(devices, d, "\n  ")
	d.SetAttr("type", "network")
	src := NewElement("source", "protocol", "nbd", "name", rec.Export)
	src.Append(NewElement("host", "transport", "unix", "socket", rec.Socket), indentOf(d, d.First("source"), own))
	if old := d.First("source"); old != nil {
		d.Replace(old, src)
	} else {
		insertAfter(d, src, own, "driver")
	}
	if drv := d.First("driver"); drv != nil {
		drv.SetAttr("type", "raw")
		if drv.A("io") == "native" {
			drv.RemoveAttr("io")
		}
	} else {
		insertAfter(d, NewElement("driver", "name", "qemu", "type", "raw"), own)
	}
	for _, b := range d.All("backingStore") {
		d.Remove(b)
	}
}

// clientKeep are the <interface> children that mean the same for
// type='client'; the rest (bridge or network source, driver tuning,
// bandwidth, filters) belong to the host side, which the agent now owns;
// they stay in the metadata's copy of the original.
var clientKeep = map[string]bool{"mac": true, "model": true, "address": true, "boot": true, "rom": true, "alias": true, "link": true, "acpi": true}

func rewriteClientNIC(devices, n *Node, rec ProtectedNIC) {
	own := indentOf(devices, n, "\n  ")
	for _, a := range append([]string(nil), attrNames(n)...) {
		if a != "type" {
			n.RemoveAttr(a)
		}
	}
	n.SetAttr("type", "client")
	for _, c := range n.Elements() {
		if !clientKeep[c.Name] {
			n.Remove(c)
		}
	}
	if n.First("mac") == nil {
		insertAfter(n, NewElement("mac", "address", rec.MAC), own)
	}
	insertAfter(n, NewElement("source", "address", "127.0.0.1", "port", rec.Port), own, "mac")
}

func attrNames(n *Node) []string {
	out := make([]string, len(n.Attrs))
	for i, a := range n.Attrs {
		out[i] = qname(a.Name)
	}
	return out
}

func streamNICArgs(id int, np nicPlan) []string {
	nd := fmt.Sprintf("ftnet%d", id)
	addr := np.slot
	if np.fn != "" && np.fn != "0x0" && np.fn != "0" {
		addr += "." + np.fn
	}
	dev := fmt.Sprintf("%s,id=%s-dev,netdev=%s,mac=%s,bus=%s,addr=%s", np.model, nd, nd, np.rec.MAC, np.bus, addr)
	if np.boot != "" {
		dev += ",bootindex=" + np.boot
	}
	return []string{
		"-netdev", "stream,id=" + nd + ",server=off,addr.type=unix,addr.path=" + np.rec.Socket,
		"-device", dev,
	}
}

func diskRecord(r ProtectedDisk) *Node {
	return NewElement(Prefix+":disk", "target", r.Target, "socket", r.Socket, "export", r.Export,
		"type", r.Type, "source", r.Source, "format", r.Format)
}

func nicRecord(r ProtectedNIC, orig *Node) *Node {
	n := NewElement(Prefix+":nic", "mac", r.MAC, "mode", r.Mode)
	if r.Socket != "" {
		n.SetAttr("socket", r.Socket)
	}
	if r.Port != "" {
		n.SetAttr("port", r.Port)
	}
	o := NewElement(Prefix + ":original")
	o.Children = []*Node{orig}
	n.Children = []*Node{o}
	return n
}

// addMetadata appends records to ftctl's element in <metadata>, creating
// both as needed, and returns ftctl's element; other applications'
// metadata and unknown ftctl children stay.
func (p *preparePlan) addMetadata(root *Node, recs []*Node) *Node {
	const rootInd = "\n"
	md := root.First("metadata")
	if md == nil {
		md = NewElement("metadata")
		insertAfter(root, md, rootInd, "description", "title", "genid", "uuid", "name")
	}
	mdInd := indentOf(root, md, rootInd)
	prot, _ := findProtection(root)
	prefix := Prefix
	if prot != nil {
		prefix = protPrefix(prot)
	} else {
		prot = NewElement(Prefix+":protection", "xmlns:"+Prefix, Namespace)
		md.Append(prot, mdInd)
	}
	protInd := indentOf(md, prot, mdInd)
	for _, r := range recs {
		if prefix != Prefix {
			renamePrefix(r, Prefix, prefix)
		}
		prot.Append(r, protInd)
	}
	return prot
}

func renamePrefix(n *Node, from, to string) {
	if strings.HasPrefix(n.Name, from+":") {
		n.Name = to + n.Name[len(from):]
	}
	for _, c := range n.Children {
		if c.Kind == Element && c.dirty {
			renamePrefix(c, from, to)
		}
	}
}

// findProtection returns ftctl's element in <metadata> and <metadata>,
// either nil when absent. ftctl's element is recognised by its namespace,
// whatever prefix it is bound to.
func findProtection(root *Node) (prot, md *Node) {
	md = root.First("metadata")
	if md == nil {
		return nil, nil
	}
	for _, c := range md.Elements() {
		pfx, local, ok := strings.Cut(c.Name, ":")
		if ok && local == "protection" && c.A("xmlns:"+pfx) == Namespace {
			return c, md
		}
	}
	return nil, md
}

// protPrefix is the prefix ftctl's element is written with.
func protPrefix(prot *Node) string {
	pfx, _, _ := strings.Cut(prot.Name, ":")
	return pfx
}

// commandline returns the prefix bound to libvirt's QEMU namespace ("" if
// none) and the <qemu:commandline> element (nil if none).
func commandline(root *Node) (prefix string, cl *Node) {
	for _, a := range root.Attrs {
		// A prefix that is not an XML name cannot start an element name
		// (encoding/xml accepts the declaration all the same).
		if a.Name.Space == "xmlns" && a.Value == QEMUNamespace && xmlName(a.Name.Local) {
			prefix = a.Name.Local
			break
		}
	}
	if prefix == "" {
		return "", nil
	}
	return prefix, root.First(prefix + ":commandline")
}

// addCommandline appends arguments to <qemu:commandline>, declaring the
// namespace on the root when needed.
func addCommandline(root *Node, args []string) {
	prefix, _ := commandline(root)
	if prefix == "" {
		prefix = "qemu"
		if _, taken := root.Attr("xmlns:qemu"); taken {
			prefix = "ftqemu"
		}
		root.SetAttr("xmlns:"+prefix, QEMUNamespace)
	}
	cl := root.First(prefix + ":commandline")
	if cl == nil {
		cl = NewElement(prefix + ":commandline")
		root.Append(cl, "\n")
	}
	own := indentOf(root, cl, "\n")
	for _, a := range args {
		cl.Append(NewElement(prefix+":arg", "value", a), own)
	}
}

// xmlName reports whether s is usable as a namespace prefix: a letter or
// underscore, then letters, digits, '_', '-' or '.' (ASCII only, which
// covers every prefix libvirt and ftctl write).
func xmlName(s string) bool {
	for i, r := range s {
		switch {
		case r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z':
		case i > 0 && (r == '-' || r == '.' || r >= '0' && r <= '9'):
		default:
			return false
		}
	}
	return s != ""
}
