package agent

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
	"github.com/ftctl/ftctl/pkg/vm"
)

// Libvirt domains. A domain prepared with `ftctl libvirt prepare` names,
// in its <ftctl:protection> metadata, the sockets its QEMU expects the
// agent at (NBD per disk, a stream per NIC), its dedicated QMP socket and
// the file its RAM lives in. libvirt's hook (ftctl hook) tells the agent
// when such a domain is about to start (PrepareDomain: open its devices),
// has started (AdoptDomain: take its QEMU as a primary VM, and pair it),
// and has stopped (DomainStopped). The agent never calls libvirt on these
// paths: the hook runs inside libvirt's start job.
//
// On the secondary, a protect request carrying the domain XML makes the
// standby a libvirt domain too (domxml.Standby: the replica's sockets and
// RAM file, -incoming defer), defined and started paused on this host's
// libvirtd (Config.Libvirt). Promotion is the same lockstep Promote over
// the standby's dedicated QMP socket; libvirt follows QEMU's RESUME to
// "running", and the persistent definition is rewritten with
// domxml.Promoted so the VM's next start here is an ordinary prepared
// domain.
//
// Routes (control socket):
//
//	POST /v1/domains/{name}/prepare  PrepareDomainRequest
//	POST /v1/domains/{name}/adopt    AdoptDomainRequest → VMStatus
//	POST /v1/domains/{name}/stopped

// PrepareDomainRequest carries the domain XML libvirt is about to start.
type PrepareDomainRequest struct {
	XML string `json:"xml"`
}

// AdoptDomainRequest carries the XML of a domain libvirt has started and
// the peer to pair it with ("" leaves it unprotected).
type AdoptDomainRequest struct {
	XML  string `json:"xml"`
	Peer string `json:"peer,omitempty"`
}

// PrepareDomain opens the devices a prepared domain's metadata names,
// before libvirt starts it.
func (c *Client) PrepareDomain(ctx context.Context, name string, domainXML []byte) error {
	return c.do(ctx, http.MethodPost, "/v1/domains/"+name+"/prepare", PrepareDomainRequest{XML: string(domainXML)}, nil)
}

// AdoptDomain takes a domain libvirt has started as a primary VM of the
// agent, and starts pairing it with peer unless peer is "".
func (c *Client) AdoptDomain(ctx context.Context, name string, domainXML []byte, peer string) (VMStatus, error) {
	var s VMStatus
	return s, c.do(ctx, http.MethodPost, "/v1/domains/"+name+"/adopt", AdoptDomainRequest{XML: string(domainXML), Peer: peer}, &s)
}

// DomainStopped tells the agent that libvirt has stopped the domain.
func (c *Client) DomainStopped(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, "/v1/domains/"+name+"/stopped", nil, nil)
}

func (a *Agent) libvirtRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/domains/{name}/prepare", func(w http.ResponseWriter, r *http.Request) {
		var req PrepareDomainRequest
		if err := readJSON(r, &req); err != nil {
			writeErr(w, err)
			return
		}
		if err := a.PrepareDomain(r.Context(), r.PathValue("name"), []byte(req.XML)); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("POST /v1/domains/{name}/adopt", func(w http.ResponseWriter, r *http.Request) {
		var req AdoptDomainRequest
		if err := readJSON(r, &req); err != nil {
			writeErr(w, err)
			return
		}
		s, err := a.AdoptDomain(context.WithoutCancel(r.Context()), r.PathValue("name"), []byte(req.XML), req.Peer)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, s)
	})
	mux.HandleFunc("POST /v1/domains/{name}/stopped", func(w http.ResponseWriter, r *http.Request) {
		if err := a.DomainStopped(context.WithoutCancel(r.Context()), r.PathValue("name")); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, struct{}{})
	})
}

// libvirtState is the agent's libvirt side: domains whose devices are
// open but whose QEMU has not been adopted yet, and the connection to this
// host's libvirtd (Config.Libvirt), made when first needed.
type libvirtState struct {
	mu       sync.Mutex
	prepared map[string]*preparedDomain

	connMu sync.Mutex
	conn   *libvirt.Conn
}

// preparedDomain is a domain whose devices the agent opened for libvirt.
type preparedDomain struct {
	xml   string
	since time.Time
	prot  *domxml.Protection
	spec  vm.Spec
	// probe is how the secondary's arbiter reaches the VM on its LAN,
	// recorded by `ftctl libvirt prepare --probe-addr`.
	probe  ProbeSpec
	serial string
	accel  string
	dev    *devices
}

// libvirtConn returns the connection to this host's libvirtd, dialling
// it (again, after a disconnect) when needed.
func (a *Agent) libvirtConn(ctx context.Context) (*libvirt.Conn, error) {
	if a.cfg.Libvirt == "" {
		return nil, fmt.Errorf("%w: this agent has no libvirt connection (start it with --libvirt)", ErrState)
	}
	a.lv.connMu.Lock()
	defer a.lv.connMu.Unlock()
	if c := a.lv.conn; c != nil {
		select {
		case <-c.Disconnected():
			c.Close()
			a.lv.conn = nil
		default:
			return c, nil
		}
	}
	c, err := libvirt.Dial(ctx, a.cfg.Libvirt)
	if err != nil {
		return nil, fmt.Errorf("%w: %w (is libvirtd running?)", ErrUnavailable, err)
	}
	a.lv.conn = c
	return c, nil
}

// libvirtDialer is what a libvirtMachine uses to reach libvirt: nil when
// the agent has none configured.
func (a *Agent) libvirtDialer() func(context.Context) (*libvirt.Conn, error) {
	if a.cfg.Libvirt == "" {
		return nil
	}
	return a.libvirtConn
}

func (a *Agent) closeLibvirt() {
	a.lv.connMu.Lock()
	c := a.lv.conn
	a.lv.conn = nil
	a.lv.connMu.Unlock()
	if c != nil {
		c.Close()
	}
	a.lv.mu.Lock()
	ps := a.lv.prepared
	a.lv.prepared = nil
	a.lv.mu.Unlock()
	for n, pd := range ps {
		pd.dev.close()
		a.removeRecord(n)
	}
}

// parsePrepared reads a prepared primary domain: what the agent serves
// for it and the VM spec it stands for.
func parsePrepared(name string, domainXML []byte) (*preparedDomain, error) {
	dom, err := domxml.ParseDomain(domainXML)
	if err != nil {
		return nil, fmt.Errorf("%w: domain %s: %w", ErrBadRequest, name, err)
	}
	if dom.Name != name {
		return nil, fmt.Errorf("%w: the XML sent for domain %q describes %q", ErrBadRequest, name, dom.Name)
	}
	if dom.Metadata == nil || dom.Metadata.Protection == nil {
		return nil, fmt.Errorf("%w: domain %s carries no ftctl protection metadata (prepare it with `ftctl libvirt prepare %s`)", ErrBadRequest, name, name)
	}
	prot := dom.Metadata.Protection
	if prot.Role == domxml.RoleStandby {
		return nil, fmt.Errorf("%w: domain %s is a standby an ftctl agent defined; that agent owns its devices", ErrBadRequest, name)
	}
	if prot.QMP == nil || prot.QMP.Socket == "" {
		return nil, fmt.Errorf("%w: domain %s has no dedicated QMP socket in its metadata (prepare it again with the default QMP mode)", ErrBadRequest, name)
	}
	if prot.Memory == nil || prot.Memory.File == "" {
		return nil, fmt.Errorf("%w: domain %s: its metadata names no guest RAM file (prepare it again with this ftctl)", ErrBadRequest, name)
	}
	mib, err := dom.MemoryMiB()
	if err != nil {
		return nil, fmt.Errorf("%w: domain %s: %w", ErrBadRequest, name, err)
	}
	pd := &preparedDomain{xml: string(domainXML), prot: prot, accel: vm.AccelTCG, since: time.Now()}
	if dom.Type == "kvm" {
		pd.accel = vm.AccelKVM
	}
	pd.spec = vm.Spec{Name: name, MemoryMiB: mib, Accel: pd.accel}
	for i, d := range prot.Disks {
		if d.Format != "" && d.Format != "raw" {
			return nil, fmt.Errorf("%w: domain %s: disk %s: only raw images can be protected (got %s)", ErrBadRequest, name, d.Target, d.Format)
		}
		if d.Source == "" || d.Socket == "" {
			return nil, fmt.Errorf("%w: domain %s: disk %d (%s): its metadata lacks the image or the socket", ErrBadRequest, name, i, d.Target)
		}
		pd.spec.Disks = append(pd.spec.Disks, vm.Disk{Path: d.Source, Format: "raw"})
	}
	for i, n := range prot.NICs {
		if n.Mode == string(domxml.NICClient) {
			return nil, fmt.Errorf("%w: domain %s: NIC %s: mode client is not supported yet by the agent (prepare the domain with the stream NIC mode)", ErrBadRequest, name, n.MAC)
		}
		if n.Socket == "" {
			return nil, fmt.Errorf("%w: domain %s: NIC %d (%s): its metadata names no socket", ErrBadRequest, name, i, n.MAC)
		}
		pd.spec.NICs = append(pd.spec.NICs, vm.NIC{MAC: n.MAC})
	}
	addrs, ports := prot.ProbeSpec()
	pd.probe = ProbeSpec{Addrs: addrs, TCPPorts: ports}
	pd.serial = serialFile(domainXML)
	return pd, nil
}

// serialFile is the file of the domain's first file-backed serial port
// ("" if none).
func serialFile(domainXML []byte) string {
	var d struct {
		Serials []struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Path string `xml:"path,attr"`
			} `xml:"source"`
		} `xml:"devices>serial"`
	}
	if xml.Unmarshal(domainXML, &d) != nil {
		return ""
	}
	for _, s := range d.Serials {
		if s.Type == "file" && s.Source.Path != "" {
			return s.Source.Path
		}
	}
	return ""
}

// libvirtGuest returns the guest of a domain libvirt runs, nil if the
// name is unknown or not such a guest.
func (a *Agent) libvirtGuest(name string) (*guest, *libvirtMachine) {
	a.mu.Lock()
	g := a.guests[name]
	a.mu.Unlock()
	if g == nil {
		return nil, nil
	}
	lm, ok := g.m.(*libvirtMachine)
	if !ok {
		return nil, nil
	}
	return g, lm
}

// PrepareDomain opens the devices of a prepared domain libvirt is about
// to start, at the paths its metadata names. It is fast (no libvirt call,
// no QEMU) and idempotent.
func (a *Agent) PrepareDomain(ctx context.Context, name string, domainXML []byte) error {
	pd, err := parsePrepared(name, domainXML)
	if err != nil {
		return err
	}
	// libvirt starts the domain anew: what a dead agent or shim left of
	// its last run is over.
	a.dropLost(name)
	if len(a.cfg.ShimCommand) > 0 {
		return a.prepareDomainShim(ctx, name, domainXML)
	}
	a.lv.mu.Lock()
	defer a.lv.mu.Unlock()
	if _, ok := a.lv.prepared[name]; ok {
		return nil
	}
	if g, _ := a.libvirtGuest(name); g != nil {
		g.mu.Lock()
		gone := g.state == StateStopped || g.state == StateHandedOver
		g.mu.Unlock()
		if !gone {
			return nil // its devices are open and in use
		}
		// What is left of the domain's last run (libvirt never said it
		// stopped) makes way.
		g.release()
	}
	a.mu.Lock()
	_, isGuest := a.guests[name]
	_, isReplica := a.replicas[name]
	_, isShim := a.shims[name]
	a.mu.Unlock()
	if isReplica {
		return fmt.Errorf("%w: %s is a replica here, protected for another host", ErrExists, name)
	}
	if isGuest || isShim {
		return fmt.Errorf("%w: %s runs here already, not under libvirt", ErrExists, name)
	}
	if err := os.MkdirAll(filepath.Dir(pd.prot.Memory.File), 0o700); err != nil {
		return fmt.Errorf("domain %s: guest RAM directory: %w", name, err)
	}
	at := &deviceSockets{}
	var images []string
	for _, d := range pd.prot.Disks {
		at.disks = append(at.disks, d.Socket)
		images = append(images, d.Source)
		if at.export == "" {
			at.export = d.Export
		} else if d.Export != at.export {
			return fmt.Errorf("%w: domain %s: disks use different NBD export names (%s, %s)", ErrBadRequest, name, at.export, d.Export)
		}
	}
	for _, n := range pd.prot.NICs {
		at.nics = append(at.nics, n.Socket)
	}
	if pd.dev, err = a.openDevicesAt(name, pd.spec, "", images, at); err != nil {
		return fmt.Errorf("domain %s: %w", name, err)
	}
	if a.lv.prepared == nil {
		a.lv.prepared = map[string]*preparedDomain{}
	}
	a.lv.prepared[name] = pd
	a.mu.Lock()
	a.served = true
	a.mu.Unlock()
	// A record from now on: a restarted agent finds this domain's shim
	// by it, or, without shims, reports the domain lost.
	a.saveRecord(record{Name: name, Role: RolePrimary, State: StateUnprotected, Spec: pd.spec, Libvirt: true})
	a.log.Info("devices open for libvirt domain", "vm", name, "disks", len(at.disks), "nics", len(at.nics))
	return nil
}

// prepareDomainShim starts (or finds) the shim of a libvirt domain about
// to start and has it open the domain's devices; the domain's later
// requests go to that shim, which outlives the agent as a VM's shim does.
func (a *Agent) prepareDomainShim(ctx context.Context, name string, domainXML []byte) error {
	a.shimMu.Lock()
	defer a.shimMu.Unlock()
	if sp := a.shimFor(name); sp != nil {
		pctx, cancel := context.WithTimeout(ctx, shimTimeout)
		err := sp.c.PrepareDomain(pctx, name, domainXML)
		cancel()
		var re *remoteError
		if err == nil || errors.As(err, &re) {
			// The shim decides (its domain's devices are open already;
			// or it keeps a replica of that name).
			return err
		}
		a.log.Warn("replacing a shim that does not answer", "vm", name, "err", err)
		a.dropShim(sp)
	}
	a.mu.Lock()
	_, isGuest := a.guests[name]
	_, isReplica := a.replicas[name]
	a.mu.Unlock()
	if isGuest || isReplica {
		return fmt.Errorf("%w: %s runs here already, not under libvirt", ErrExists, name)
	}
	sp, err := a.startShimProc(ctx, name, RolePrimary)
	if err != nil {
		return fmt.Errorf("domain %s: %w", name, err)
	}
	if err := sp.c.PrepareDomain(ctx, name, domainXML); err != nil {
		a.killShim(sp)
		return err
	}
	return nil
}

// preparedStatus lists the prepared domains (all, or the one named):
// devices open, QEMU not adopted yet.
func (a *Agent) preparedStatus(name string) []VMStatus {
	a.lv.mu.Lock()
	defer a.lv.mu.Unlock()
	var out []VMStatus
	for n, pd := range a.lv.prepared {
		if name != "" && n != name {
			continue
		}
		s := VMStatus{Name: n, Role: RolePrimary, State: StateUnprotected, Since: pd.since, Accel: pd.accel,
			Reason: "prepared: its devices are open; waiting for libvirt to start the domain"}
		if a.shimOf != "" {
			s.ShimPID = os.Getpid()
		}
		out = append(out, s)
	}
	return out
}

// stopPrepared closes the devices of a prepared domain (one libvirt has
// not started yet) and says whether there was one.
func (a *Agent) stopPrepared(name string) bool {
	a.lv.mu.Lock()
	pd := a.lv.prepared[name]
	delete(a.lv.prepared, name)
	a.lv.mu.Unlock()
	if pd == nil {
		return false
	}
	pd.dev.close()
	a.removeRecord(name)
	return true
}

// AdoptDomain takes a domain libvirt has started as a primary VM (state
// unprotected) and, with a peer, starts pairing it as Pair does. It is
// idempotent: an adopted domain is only paired if it is not yet.
func (a *Agent) AdoptDomain(ctx context.Context, name string, domainXML []byte, peer string) (VMStatus, error) {
	if l := a.lostFor(name); l != nil {
		return VMStatus{}, l.errLost()
	}
	if len(a.cfg.ShimCommand) > 0 {
		sp := a.shimFor(name)
		if sp == nil {
			// Not prepared through this agent (or its shim is gone):
			// the shim opens the devices first, as a hook's prepare would.
			if err := a.PrepareDomain(ctx, name, domainXML); err != nil {
				return VMStatus{}, err
			}
			if sp = a.shimFor(name); sp == nil {
				return VMStatus{}, fmt.Errorf("%w: domain %s: its shim went away", ErrState, name)
			}
		}
		st, err := sp.c.AdoptDomain(ctx, name, domainXML, peer)
		sp.setRole(st.Role)
		return st, err
	}
	g, _ := a.libvirtGuest(name)
	if g == nil {
		var err error
		if g, err = a.adopt(ctx, name, domainXML); err != nil {
			return VMStatus{}, err
		}
	}
	if peer != "" {
		g.mu.Lock()
		same := g.prot != nil && g.prot.peer == peer
		g.mu.Unlock()
		if !same {
			if err := g.pair(ctx, peer); err != nil {
				return g.status(), err
			}
		}
	}
	return g.status(), nil
}

func (a *Agent) adopt(ctx context.Context, name string, domainXML []byte) (*guest, error) {
	if err := a.PrepareDomain(ctx, name, domainXML); err != nil {
		return nil, err
	}
	a.lv.mu.Lock()
	defer a.lv.mu.Unlock()
	pd := a.lv.prepared[name]
	if pd == nil {
		return nil, fmt.Errorf("%w: domain %s was stopped while being adopted", ErrState, name)
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	lm, err := dialLibvirtMachine(dctx, name, pd.prot.QMP.Socket, pd.prot.Memory.File, pd.serial, pd.accel, a.libvirtDialer())
	cancel()
	if err != nil {
		return nil, err
	}
	delete(a.lv.prepared, name)
	// The XML of the running domain is what the standby copies: the
	// same devices at the same addresses.
	g := &guest{a: a, name: name, spec: pd.spec, probe: pd.probe, dev: pd.dev, m: lm, domain: string(domainXML)}
	a.mu.Lock()
	a.guests[name] = g
	a.mu.Unlock()
	g.setState(StateUnprotected, "adopted from libvirt")
	go g.watch()
	return g, nil
}

// DomainStopped is libvirt's news that a domain stopped. A clean shutdown
// (QEMU announced it) has already ended the protection and told the
// secondary to drop its standby (qemuExited); a crash has told it to take
// over. Either way what is left here is released; an unknown domain is
// fine.
func (a *Agent) DomainStopped(ctx context.Context, name string) error {
	a.dropLost(name)
	if sp := a.shimFor(name); sp != nil {
		err := sp.c.DomainStopped(ctx, name)
		var re *remoteError
		if err != nil && !errors.As(err, &re) && sp.gone() {
			// The shim died with the domain: nothing is left to release.
			err = nil
		}
		// A shim whose VM is gone ends: forget it.
		a.shimStatus(sp)
		return err
	}
	if a.stopPrepared(name) {
		return nil
	}
	g, lm := a.libvirtGuest(name)
	if g == nil {
		return nil
	}
	select {
	case <-lm.Exited():
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%w: libvirt says domain %s stopped, but its QEMU still answers QMP", ErrState, name)
	case <-ctx.Done():
		return ctx.Err()
	}
	// Let watch finish with the exit (it decides between unpair and
	// vm-lost) before the devices go.
	for range 100 {
		g.mu.Lock()
		// A handover keeps its (finished) protection in g.prot.
		done := g.state == StateHandedOver || (g.state == StateStopped && g.prot == nil)
		g.mu.Unlock()
		if done {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	g.release()
	return nil
}

// release lets go of a libvirt guest whose QEMU is gone: protection,
// lease, monitor, devices, record.
func (g *guest) release() {
	g.stopRepair()
	g.stopProtection()
	g.stopGuard(true)
	g.m.Close()
	g.dev.close()
	g.a.mu.Lock()
	if g.a.guests[g.name] == g {
		delete(g.a.guests, g.name)
	}
	g.a.mu.Unlock()
	g.a.removeRecord(g.name)
}

// cleanExit reports whether the guest's QEMU ended in order (a libvirt
// domain shut down or destroyed), not by a crash.
func (g *guest) cleanExit() bool {
	lm, ok := g.m.(*libvirtMachine)
	if !ok {
		return false
	}
	if lm.cleanShutdown() {
		// QEMU announced an orderly end: final, however long it then
		// takes to exit (a loaded host, libvirt's own clean-up).
		return true
	}
	select {
	case <-lm.Exited():
		return lm.cleanShutdown()
	default:
		return false
	}
}

// endCleanly ends a protection whose VM was shut down in order: the
// secondary is told to drop its standby (rather than promote it), before
// anything closes the link.
func (g *guest) endCleanly(p *protection) {
	p.endOnce.Do(func() {
		g.mu.Lock()
		p.stopping = true
		g.mu.Unlock()
		g.dev.stream(nil)
		drain(p.events)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := sendMsg(ctx, p.conn, message{Op: opUnpair, VM: g.name, From: g.a.cfg.Name}); err != nil {
			g.a.log.Warn("could not tell the secondary the VM shut down", "vm", g.name, "peer", p.peer, "err", err)
		}
		p.cancel()
	})
}

// Secondary side.

// errUnpaired ends a secondary's receive loop when its primary's VM shut
// down in order.
var errUnpaired = errors.New("primary's VM shut down")

// startStandbyDomain defines the standby of a libvirt domain on this
// host's libvirtd and starts it paused, waiting for an incoming state;
// its devices and replica RAM are r's.
func (a *Agent) startStandbyDomain(ctx context.Context, r *replicaVM, preparedXML string) (*libvirtMachine, error) {
	x, err := domxml.Standby(preparedXML, domxml.StandbyOptions{SocketDir: r.runDir, RAMFile: r.ramPath})
	if err != nil {
		return nil, fmt.Errorf("%w: standby of domain %s: %w", ErrBadRequest, r.name, err)
	}
	dom, err := domxml.ParseDomain([]byte(x))
	if err != nil || dom.Metadata == nil || dom.Metadata.Protection == nil || dom.Metadata.Protection.QMP == nil {
		return nil, fmt.Errorf("%w: standby of domain %s: no QMP socket in its XML (%v)", ErrBadRequest, r.name, err)
	}
	c, err := a.libvirtConn(ctx)
	if err != nil {
		return nil, err
	}
	st, err := c.State(ctx, r.name)
	switch {
	case errors.Is(err, libvirt.ErrNoDomain):
	case err != nil:
		return nil, fmt.Errorf("%w: standby of domain %s: %w", ErrState, r.name, err)
	case st.Active():
		return nil, fmt.Errorf("%w: a domain %s is %s on this host's libvirt; a standby cannot take its name (stop it, or undefine it if it is stale)", ErrExists, r.name, st)
	}
	// An inactive definition of that name (a former standby, or the VM
	// from before it failed over away) is replaced.
	if err := c.Define(ctx, x); err != nil {
		return nil, fmt.Errorf("define the standby domain %s: %w", r.name, err)
	}
	lm := &libvirtMachine{domain: r.name, lv: a.libvirtConn}
	lm.owned.Store(true)
	if err := c.Start(ctx, r.name, true); err != nil {
		lm.dropDomain()
		return nil, fmt.Errorf("start the standby domain %s paused: %w", r.name, err)
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	m, err := dialLibvirtMachine(dctx, r.name, dom.Metadata.Protection.QMP.Socket, r.ramPath, serialFile([]byte(x)), accelOf(dom), a.libvirtConn)
	cancel()
	if err != nil {
		lm.dropDomain()
		return nil, err
	}
	m.owned.Store(true)
	r.standbyXML = x
	return m, nil
}

func accelOf(d *domxml.Domain) string {
	if d.Type == "kvm" {
		return vm.AccelKVM
	}
	return vm.AccelTCG
}

// libvirtPromoted finishes a promotion of a standby domain: the agent no
// longer owns the domain (it is the VM now), it waits (briefly) until
// libvirt shows it running, and rewrites its persistent definition with
// domxml.Promoted, so the VM's next start on this host is an ordinary
// prepared domain on the replica's disks. It returns what to add to the
// promotion's reason.
func (r *replicaVM) libvirtPromoted(ctx context.Context, t0 time.Time) string {
	lm, ok := r.standby.(*libvirtMachine)
	if !ok {
		return ""
	}
	lm.owned.Store(false)
	c, err := r.a.libvirtConn(ctx)
	if err != nil {
		return fmt.Sprintf("; libvirt: %v", err)
	}
	note := ""
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	for {
		st, err := c.State(wctx, r.name)
		if err == nil && st.Code == libvirt.StateRunning {
			note = fmt.Sprintf("; libvirt shows it running %v after the decision", time.Since(t0).Round(time.Microsecond))
			break
		}
		if wctx.Err() != nil {
			note = fmt.Sprintf("; libvirt does not show it running yet (%v, %v)", st, err)
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	cancel()
	var disks []string
	for i := range r.spec.Disks {
		disks = append(disks, filepath.Join(r.dir, fmt.Sprintf("disk%d.raw", i)))
	}
	px, err := domxml.Promoted(r.standbyXML, disks)
	if err == nil {
		err = c.Define(ctx, px)
	}
	if err != nil {
		r.a.log.Error("promoted domain keeps its standby definition", "vm", r.name, "err", err)
		return note + "; its persistent definition is still the standby's: " + strings.TrimSpace(err.Error())
	}
	r.promotedXML = px
	return note
}
