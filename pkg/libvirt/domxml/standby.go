package domxml

import (
	"fmt"
	"path/filepath"
	"strings"
)

// StandbyOptions say where a standby's devices are on the standby host.
type StandbyOptions struct {
	// SocketDir is the directory of the standby agent's sockets for this
	// VM; every NBD, NIC and QMP socket keeps its base name (nbdN.sock,
	// nicN.sock, qmp.sock) and moves here.
	SocketDir string
	// RAMFile is the replica RAM file the standby's QEMU maps as guest
	// RAM (the ftmem backend's mem-path).
	RAMFile string
}

// Standby returns the definition of the standby of a prepared domain: the
// same devices, with every socket ftctl's metadata records re-pointed
// into o.SocketDir, guest RAM mapped from o.RAMFile, `-incoming defer`
// appended to <qemu:commandline> (started paused, QEMU waits in
// "inmigrate" for the checkpoint), and the metadata marked
// role='standby' without peer or policy, so the hook on the standby's
// host leaves it to the agent that made it. XML that was not prepared by
// this ftctl (no metadata, no ftmem backend, no dedicated QMP socket, a
// recorded device missing), or whose NICs use NIC mode client (a
// loopback TCP port, not a socket the standby agent can serve in its
// directory), is refused with an error wrapping ErrBadXML; bad options
// with ErrBadOptions.
func Standby(preparedXML string, o StandbyOptions) (string, error) {
	if err := socketDirOK(o.SocketDir); err != nil {
		return "", err
	}
	if err := memPathOK("standby RAM file", o.RAMFile); err != nil {
		return "", err
	}
	pd, err := parsePrepared(preparedXML)
	if err != nil {
		return "", err
	}
	if pd.prot.Role == RoleStandby {
		return "", fmt.Errorf("%w: domain %s is already a standby's definition", ErrBadXML, pd.dom.Name)
	}
	move := func(old string) string { return filepath.Join(o.SocketDir, filepath.Base(old)) }

	// Disks: the <source><host socket> of each recorded disk.
	for i, rec := range pd.prot.Disks {
		pd.diskHost[i].SetAttr("socket", move(rec.Socket))
		pd.diskRecs[i].SetAttr("socket", move(rec.Socket))
	}
	for i, rec := range pd.prot.NICs {
		pd.nicArgs[i].SetAttr("value", strings.Replace(pd.nicArgs[i].A("value"), ",addr.path="+rec.Socket, ",addr.path="+move(rec.Socket), 1))
		pd.nicRecs[i].SetAttr("socket", move(rec.Socket))
	}
	qmpSock := move(pd.prot.QMP.Socket)
	pd.qmpArg.SetAttr("value", strings.Replace(pd.qmpArg.A("value"), ",path="+pd.prot.QMP.Socket+",", ",path="+qmpSock+",", 1))
	pd.qmpRec.SetAttr("socket", qmpSock)
	pd.memArg.SetAttr("value", memoryObjectArg(pd.prot.Memory.SizeMiB, o.RAMFile))
	pd.memRec.SetAttr("file", o.RAMFile)

	pd.protNode.SetAttr("role", RoleStandby)
	pd.protNode.RemoveAttr("peer")
	pd.protNode.RemoveAttr("policy")
	if !pd.dom.hasArg("-incoming") {
		addCommandline(pd.doc.Root(), []string{"-incoming", "defer"})
	}
	return pd.doc.String(), nil
}

// Promoted returns the persistent definition of a standby that took over:
// `-incoming defer` removed, role removed, and each recorded disk's
// original source set to disks[i] (the standby agent's replica images,
// raw files, in the order of the metadata's disk records), so the next
// start on this host goes through the hook and agent like any prepared
// domain. The sockets and RAM file stay as Standby set them.
func Promoted(standbyXML string, disks []string) (string, error) {
	pd, err := parsePrepared(standbyXML)
	if err != nil {
		return "", err
	}
	if pd.prot.Role != RoleStandby {
		return "", fmt.Errorf("%w: domain %s is not a standby's definition (role %q)", ErrBadXML, pd.dom.Name, pd.prot.Role)
	}
	if len(disks) != len(pd.prot.Disks) {
		return "", fmt.Errorf("%w: %d replica disk(s) given, domain %s records %d", ErrBadOptions, len(disks), pd.dom.Name, len(pd.prot.Disks))
	}
	for i, p := range disks {
		if p == "" || !filepath.IsAbs(p) {
			return "", fmt.Errorf("%w: replica disk %d (%s) %q is not an absolute path", ErrBadOptions, i, pd.prot.Disks[i].Target, p)
		}
	}
	for i, r := range pd.diskRecs {
		r.SetAttr("type", "file")
		r.SetAttr("source", disks[i])
		r.SetAttr("format", "raw")
	}
	pd.protNode.RemoveAttr("role")
	_, cl := commandline(pd.doc.Root())
	if cl != nil {
		args := cl.All(protPrefixOfCL(cl) + ":arg")
		for i := 0; i+1 < len(args); i++ {
			if args[i].A("value") == "-incoming" && args[i+1].A("value") == "defer" {
				cl.Remove(args[i])
				cl.Remove(args[i+1])
				i++
			}
		}
	}
	return pd.doc.String(), nil
}

func protPrefixOfCL(cl *Node) string {
	pfx, _, _ := strings.Cut(cl.Name, ":")
	return pfx
}

func socketDirOK(dir string) error {
	if dir == "" || !filepath.IsAbs(dir) {
		return fmt.Errorf("%w: socket directory %q is not absolute", ErrBadOptions, dir)
	}
	if strings.ContainsAny(dir, ",'\"\n") {
		return fmt.Errorf("%w: socket directory %q contains a comma, quote or newline (QEMU option syntax)", ErrBadOptions, dir)
	}
	return nil
}

// prepared is a prepared domain's document with the nodes Standby and
// Promoted rewrite, each checked to be there.
type prepared struct {
	doc      *Document
	dom      *Domain
	prot     *Protection
	protNode *Node
	diskRecs []*Node // ftctl:disk, in record order
	diskHost []*Node // the matching <disk>'s <source><host>
	nicRecs  []*Node
	nicArgs  []*Node // the -netdev stream qemu:arg of each NIC
	qmpRec   *Node
	qmpArg   *Node
	memRec   *Node
	memArg   *Node
}

// parsePrepared reads a domain prepared by Prepare and finds each node
// its records name; anything missing is an error wrapping ErrBadXML that
// says what.
func parsePrepared(domainXML string) (*prepared, error) {
	doc, err := Parse([]byte(domainXML))
	if err != nil {
		return nil, err
	}
	root := doc.Root()
	if root.Name != "domain" {
		return nil, fmt.Errorf("%w: root element is <%s>, not <domain>", ErrBadXML, root.Name)
	}
	dom, err := ParseDomain([]byte(domainXML))
	if err != nil {
		return nil, err
	}
	notPrepared := func(format string, args ...any) error {
		return fmt.Errorf("%w: domain %s was not prepared by ftctl: %s (run ftctl libvirt prepare)", ErrBadXML, dom.Name, fmt.Sprintf(format, args...))
	}
	protNode, _ := findProtection(root)
	if protNode == nil || dom.Metadata == nil || dom.Metadata.Protection == nil {
		return nil, notPrepared("no ftctl metadata")
	}
	pd := &prepared{doc: doc, dom: dom, prot: dom.Metadata.Protection, protNode: protNode}
	pfx := protPrefix(protNode)
	prot := pd.prot

	if prot.Memory == nil || prot.Memory.ID != MemoryID {
		return nil, notPrepared("guest RAM is not in ftctl's %s backend", MemoryID)
	}
	size, err := dom.MemoryMiB()
	if err != nil {
		return nil, err
	}
	if size != prot.Memory.SizeMiB {
		return nil, fmt.Errorf("%w: domain %s: <memory> is %d MiB but the %s backend is recorded as %d MiB (prepare it again)", ErrBadXML, dom.Name, size, MemoryID, prot.Memory.SizeMiB)
	}
	if prot.QMP == nil {
		return nil, notPrepared("no dedicated QMP socket (prepared with --qmp passthrough?)")
	}
	pd.memRec = protNode.First(pfx + ":memory")
	pd.qmpRec = protNode.First(pfx + ":qmp")
	pd.diskRecs = protNode.All(pfx + ":disk")
	pd.nicRecs = protNode.All(pfx + ":nic")
	if pd.memRec == nil || pd.qmpRec == nil || len(pd.diskRecs) != len(prot.Disks) || len(pd.nicRecs) != len(prot.NICs) {
		return nil, fmt.Errorf("%w: domain %s: ftctl's metadata is malformed", ErrBadXML, dom.Name)
	}

	_, cl := commandline(root)
	var args []*Node
	if cl != nil {
		args = cl.All(protPrefixOfCL(cl) + ":arg")
	}
	for i, a := range args {
		v := a.A("value")
		switch {
		case v == memoryObjectArg(prot.Memory.SizeMiB, prot.Memory.File) && i > 0 && args[i-1].A("value") == "-object":
			pd.memArg = a
		case strings.HasPrefix(v, "socket,id="+qmpChardev+",path="+prot.QMP.Socket+","):
			pd.qmpArg = a
		}
	}
	if pd.memArg == nil || !dom.hasArg(memoryMachineArg) {
		return nil, notPrepared("no -object %s / -machine %s arguments for the recorded RAM file %s", MemoryID, memoryMachineArg, prot.Memory.File)
	}
	if pd.qmpArg == nil {
		return nil, notPrepared("no QMP chardev argument for the recorded socket %s", prot.QMP.Socket)
	}

	for _, n := range prot.NICs {
		if n.Mode != string(NICStream) {
			return nil, fmt.Errorf("%w: domain %s: NIC %s uses NIC mode %q; a standby needs mode stream (a unix socket the standby agent serves in its directory), prepare it with --nic stream",
				ErrBadXML, dom.Name, n.MAC, n.Mode)
		}
		var found *Node
		for _, a := range args {
			if v := a.A("value"); strings.HasPrefix(v, "stream,") && strings.Contains(v+",", ",addr.path="+n.Socket+",") {
				found = a
			}
		}
		if found == nil {
			return nil, notPrepared("NIC %s: no -netdev stream argument for the recorded socket %s", n.MAC, n.Socket)
		}
		pd.nicArgs = append(pd.nicArgs, found)
	}

	var diskNodes []*Node
	if devs := root.First("devices"); devs != nil {
		diskNodes = devs.All("disk")
	}
	for _, rec := range prot.Disks {
		var host *Node
		for _, dn := range diskNodes {
			if dn.First("target").A("dev") != rec.Target {
				continue
			}
			if src := dn.First("source"); dn.A("type") == "network" && src.A("protocol") == "nbd" {
				if h := src.First("host"); h.A("socket") == rec.Socket {
					host = h
				}
			}
		}
		if host == nil {
			return nil, notPrepared("disk %s is not served over NBD on the recorded socket %s", rec.Target, rec.Socket)
		}
		pd.diskHost = append(pd.diskHost, host)
	}
	return pd, nil
}
