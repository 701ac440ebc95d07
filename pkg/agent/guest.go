package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/initsync"
	"github.com/ftctl/ftctl/pkg/failover"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/qmp"
	"github.com/ftctl/ftctl/pkg/vm"
)

// guest is a VM this host runs: its QEMU, its devices and, while paired,
// its protection.
type guest struct {
	a     *Agent
	name  string
	spec  vm.Spec // as the user gave it
	probe ProbeSpec
	dir   string
	dev   *devices
	m     machine
	// domain is the prepared libvirt domain XML of a VM libvirt runs (""
	// for a VM the agent started); it goes to the secondary in the
	// protect request.
	domain string

	mu     sync.Mutex
	state  State
	reason string
	since  time.Time
	peer   string
	prot   *protection
	rate   rateMeter
	// extra files the guest owns beyond what vm.Machine removes (the
	// replica RAM file a promoted guest runs on).
	extra []string
	// health is what the QMP liveness detector says when not all is well.
	health string
	// killedFor is why the agent killed a hung QEMU.
	killedFor string
	// guardStop/guardDone: the witness lease guard, while it runs.
	guardStop context.CancelFunc
	guardDone chan struct{}
	// pairMu serialises pairings (the user's and the automatic ones).
	pairMu sync.Mutex
	// The automatic re-pairing of a degraded guest, while it runs.
	repairStop  context.CancelFunc
	repairNext  time.Time
	repairTries int
	repairErr   string
}

// protection is one pairing of a guest with a secondary.
type protection struct {
	peer     string
	conn     *watchedConn
	health   *peerHealth
	prim     *lockstep.Primary
	region   *memsync.Region
	tracker  memsync.Tracker
	events   *eventlog.Pipe
	diskSync *initsync.Syncer
	cancel   context.CancelFunc
	done     chan struct{}
	err      error
	handover bool // ended by a planned switchover
	stopping bool // ended on purpose (unpair, stop)
	vmLost   bool // ended because the VM died here
	lostOnce sync.Once
	auto     bool // made by the automatic re-pairing, not (yet) by the user
	shim     bool // the replica lives in a replica shim (the peer redirected us)
	endOnce  sync.Once
	// peerTimeout and probeWindow are the secondary's (its ready reply):
	// when it may decide to promote on the VM's silence.
	peerTimeout, probeWindow time.Duration
}

// releaseSlack is how much earlier than the secondary's probe window
// closes the primary must release the VM's output: the secondary may have
// last heard the primary up to one heartbeat (100 ms) before the primary
// last heard it, and the VM's answer still has to cross the LAN.
const releaseSlack = 150 * time.Millisecond

// tooLate says whether, with the link silent since last, releasing the
// VM's held output now could come after the secondary's probe stopped
// listening: the secondary would then have found the VM silent and
// promoted, and both would run. It returns how late it is.
func (p *protection) tooLate(last, now time.Time) (bool, time.Duration) {
	if p.probeWindow <= 0 {
		return false, 0
	}
	deadline := last.Add(p.peerTimeout + p.probeWindow - releaseSlack)
	return now.After(deadline), now.Sub(deadline)
}

func (g *guest) setState(s State, reason string) {
	g.mu.Lock()
	g.state, g.reason, g.since = s, reason, time.Now()
	g.mu.Unlock()
	g.a.log.Info("state", "vm", g.name, "state", s, "reason", reason)
	_, lv := g.m.(*libvirtMachine)
	g.a.saveRecord(record{Name: g.name, Role: RolePrimary, State: s, Peer: g.peer, Spec: g.spec, PID: g.pid(), Libvirt: lv})
}

func (g *guest) pid() int {
	if g.m == nil {
		return 0
	}
	return g.m.PID()
}

// startGuest boots a VM whose disks the agent serves and whose NICs it
// buffers.
func (a *Agent) startGuest(ctx context.Context, spec vm.Spec, probe ProbeSpec) (*guest, error) {
	spec = spec.WithDefaults()
	var images []string
	for i, d := range spec.Disks {
		if d.Path == "" || d.NBD != nil {
			return nil, fmt.Errorf("%w: disks[%d]: give a raw image path; the agent serves it", ErrBadRequest, i)
		}
		if d.Format != "" && d.Format != "raw" {
			return nil, fmt.Errorf("%w: disks[%d]: only raw images can be protected (got %s)", ErrBadRequest, i, d.Format)
		}
		images = append(images, d.Path)
	}
	for i, n := range spec.NICs {
		if n.User || n.Stream != "" {
			return nil, fmt.Errorf("%w: nics[%d]: leave the backend empty; the agent connects the NIC", ErrBadRequest, i)
		}
	}
	g := &guest{a: a, name: spec.Name, spec: spec, probe: probe, dir: filepath.Join(a.cfg.RunDir, "vms", spec.Name)}
	dev, err := a.openDevices(spec.Name, spec, g.dir, images)
	if err != nil {
		return nil, err
	}
	g.dev = dev
	g.m, err = vm.Start(ctx, dev.spec, vm.Options{RunDir: filepath.Join(g.dir, "qemu"), RAMDir: a.cfg.RAMDir, Logger: a.log})
	if err != nil {
		dev.close()
		return nil, err
	}
	g.setState(StateUnprotected, "started")
	go g.watch()
	return g, nil
}

// watch notices the guest's QEMU dying or hanging outside ftctl's
// control. Its process exiting is certain death. A QEMU that stops
// answering QMP (query-status, polled by a liveness-only
// failover.Detector) for QMPTimeout is hung: that is reported in status;
// and while the VM is protected the hung QEMU is killed — a frozen primary
// cannot checkpoint, and if it thawed later it would run on beyond the
// last committed checkpoint next to a promoted copy — after which the
// exit is handled like any other: the secondary is told to take over.
func (g *guest) watch() {
	det, err := failover.NewDetector(failover.Config{
		Paths: []failover.Path{}, Liveness: g.liveness,
		Interval: qmpPollInterval(g.a.cfg.QMPTimeout), LivenessTimeout: g.a.cfg.QMPTimeout / 2, Timeout: g.a.cfg.QMPTimeout,
	})
	if err != nil {
		g.a.log.Error("QMP liveness detector", "vm", g.name, "err", err)
		<-g.m.Exited()
		g.qemuExited()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go det.Run(ctx)
	for {
		select {
		case <-g.m.Exited():
			g.qemuExited()
			return
		case ev := <-det.Events():
			g.onLiveness(ev)
		}
	}
}

// qmpPollInterval: ten polls per timeout, at most one every 200 ms (each
// is a QMP round trip into a busy emulator).
func qmpPollInterval(timeout time.Duration) time.Duration {
	return max(min(200*time.Millisecond, timeout/10), time.Millisecond)
}

// liveness is one QMP poll: ErrDead once the process exited.
func (g *guest) liveness(ctx context.Context) error {
	select {
	case <-g.m.Exited():
		return fmt.Errorf("%w: QEMU exited", failover.ErrDead)
	default:
	}
	if _, err := g.m.QMP().QueryStatus(ctx); err != nil {
		return fmt.Errorf("query-status: %w", err)
	}
	return nil
}

// onLiveness records the QMP detector's judgement and acts on a hang.
func (g *guest) onLiveness(ev failover.Event) {
	g.mu.Lock()
	switch ev.State {
	case failover.Alive:
		g.health = ""
	default:
		g.health = fmt.Sprintf("QEMU %s: %s", map[failover.State]string{failover.Suspect: "slow to answer QMP", failover.Lost: "hung"}[ev.State], ev.Reason)
	}
	st, p := g.state, g.prot
	g.mu.Unlock()
	if ev.State != failover.Lost || errors.Is(ev.Liveness, failover.ErrDead) {
		return
	}
	g.a.log.Warn("QEMU not answering", "vm", g.name, "state", st, "reason", ev.Reason)
	if p == nil || st != StateProtected {
		// Nobody could take over: killing the VM would only lose it. A
		// human decides (status shows the hang).
		return
	}
	g.mu.Lock()
	g.killedFor = fmt.Sprintf("QEMU hung (%s); killed it", ev.Reason)
	g.mu.Unlock()
	if err := g.m.Kill(); err != nil {
		g.a.log.Error("kill hung QEMU", "vm", g.name, "err", err)
	}
}

// exitReason says how QEMU ended, with its last words if any.
func (g *guest) exitReason() string {
	if e := strings.TrimSpace(g.m.Stderr()); e != "" {
		return "QEMU exited: " + e
	}
	return "QEMU exited"
}

// qemuExited ends everything that depended on the guest's QEMU.
func (g *guest) qemuExited() {
	g.mu.Lock()
	st, p := g.state, g.prot
	reason := g.killedFor
	g.mu.Unlock()
	if st == StateHandedOver || st == StateStopped {
		return
	}
	if reason == "" {
		reason = g.exitReason()
	}
	g.stopRepair()
	// The VM is gone here: its lease is free for the secondary, which
	// must have it before it is told to take over.
	g.stopGuard(false)
	if p != nil && g.cleanExit() {
		// Shut down in order (libvirt domain): nothing to take over.
		g.endCleanly(p)
	} else if p != nil {
		g.releaseLease()
		g.vmLost(p, reason)
	}
	g.stopProtection()
	g.setState(StateStopped, reason)
	if p == nil {
		g.releaseLease()
	}
}

// vmLost ends a protection because the VM died here: the held output is
// dropped (the secondary resumes from before it and produces it again), and
// the secondary, if it holds a committed checkpoint, is told to take over.
// The management path would otherwise show it this agent alive, and it
// would rightly refuse to promote.
func (g *guest) vmLost(p *protection, reason string) {
	p.lostOnce.Do(func() {
		g.mu.Lock()
		p.vmLost = true
		g.mu.Unlock()
		g.dev.stream(nil)
		drain(p.events)
		told := false
		if p.prim.Stats().Checkpoints > 0 {
			if err := g.tellVMLost(p, reason); err != nil {
				g.a.log.Error("could not tell the secondary that the VM died", "vm", g.name, "peer", p.peer, "err", err)
			} else {
				told = true
				g.a.log.Info("told the secondary to take over", "vm", g.name, "peer", p.peer, "reason", reason)
			}
		}
		p.cancel()
		if !told {
			p.conn.Close()
			return
		}
		// The report is the link's last frame: end the link in order and
		// wait for the secondary to end its side, which it does once it
		// has read the report. Merely closing would leave delivering it to
		// this process's sockets, and a shim exits soon after its VM.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := p.conn.Shutdown(ctx); err != nil {
			g.a.log.Info("replication link did not end in order after the vm-lost report", "vm", g.name, "peer", p.peer, "err", err)
		}
	})
}

// tellVMLost sends opVMLost on the replication link and again on a new
// link (or only there, if the replication link is gone).
//
// The replication link carries the report in the common case: it is the
// link's last frame before it ends in order (vmLost), and a secondary reads
// what had arrived even when its own writes fail. The new link, answered,
// is the confirmation for what the replication link cannot do: a link that
// is half dead (the report never gets through), or a secondary that ends
// the link for a reason of its own (its watchdog) before it reads the
// report. The new link's report arrives while the replication link is
// still open, so the secondary decides with the report in hand.
func (g *guest) tellVMLost(p *protection, reason string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m := message{Op: opVMLost, VM: g.name, From: g.a.cfg.Name, Error: reason}
	sctx, scancel := context.WithTimeout(ctx, time.Second)
	err := sendMsg(sctx, p.conn, m)
	scancel()
	if err == nil {
		// A secondary that already acted on the first report may refuse
		// the second: it knows.
		if cerr := g.sendVMLost(ctx, p, m); cerr != nil {
			g.a.log.Info("vm-lost report not confirmed on a second link", "vm", g.name, "peer", p.peer, "err", cerr)
		}
		return nil
	}
	if nerr := g.sendVMLost(ctx, p, m); nerr != nil {
		return fmt.Errorf("on the link: %v; on a new link: %w", err, nerr)
	}
	return nil
}

// sendVMLost sends a vm-lost report on a new link to the VM's replica
// (its shim, or the peer's agent) and waits for the answer.
func (g *guest) sendVMLost(ctx context.Context, p *protection, m message) error {
	// A new link goes to the replica's shim when the peer runs replicas
	// in shims (remembered from the pairing, or by redirect).
	l, err := g.a.dialReplica(ctx, g.name, p.peer)
	if err != nil {
		return err
	}
	l, reply, err := g.a.askReplica(ctx, l, g.name, p.peer, m, 5*time.Second)
	if err != nil {
		return err
	}
	l.conn.Close()
	if reply.Op != opReady {
		return fmt.Errorf("%w: %s answered %q: %s", ErrPeer, p.peer, reply.Op, reply.Error)
	}
	return nil
}

// pair opens a link to peer and starts protecting the guest there.
func (g *guest) pair(ctx context.Context, peer string) error {
	g.stopRepair()
	g.pairMu.Lock()
	defer g.pairMu.Unlock()
	g.mu.Lock()
	if p := g.prot; p != nil && p.auto && p.peer == peer {
		// The automatic re-pairing got there first: what the user asks
		// for is done, and the pairing is the user's from now on.
		p.auto = false
		g.mu.Unlock()
		return nil
	}
	g.mu.Unlock()
	return g.pairLocked(ctx, peer, false)
}

// pairLocked pairs the guest with peer; pairMu is held, so that a user's
// pairing and an automatic one never run at once.
func (g *guest) pairLocked(ctx context.Context, peer string, auto bool) error {
	g.mu.Lock()
	st := g.state
	busy := g.prot != nil
	g.mu.Unlock()
	if busy || (st != StateUnprotected && st != StateDegraded && st != StatePromoted) {
		return fmt.Errorf("%w: %s is %s (unpair it first)", ErrState, g.name, st)
	}
	if len(g.dev.disks) > 1 {
		return fmt.Errorf("%w: %s has %d disks; ftctl protects at most one disk per VM for now", ErrState, g.name, len(g.dev.disks))
	}
	if g.a.cfg.Credentials == nil {
		return fmt.Errorf("%w: this agent has no credentials for replication links (start it with --ca/--cert/--key or --psk-file)", ErrState)
	}
	if err := g.startGuard(ctx); err != nil {
		return err
	}
	// To the peer's agent, or straight to the replica shim it redirected
	// an earlier pairing of this VM to.
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	link, err := g.a.dialReplica(dctx, g.name, peer)
	cancel()
	if err != nil {
		return fmt.Errorf("%w: connect to %s: %w", ErrPeer, peer, err)
	}
	conn := link.conn
	fail := func(err error) error { conn.Close(); return err }

	// The disk's events start streaming at a moment with no write in
	// flight: QEMU's stop drains I/O. The replayer starts in step with the
	// log's position there; the initial sync then copies the whole disk.
	c := g.m.QMP()
	events := eventlog.NewPipe(64 << 20)
	msg := message{Op: opProtect, VM: g.name, Spec: &g.spec, Probe: g.probe, From: g.a.cfg.Name, Mgmt: g.a.MgmtAddr(), Domain: g.domain, PeerTimeout: g.a.cfg.PeerTimeout}
	if err := c.Stop(ctx); err != nil {
		return fail(err)
	}
	if len(g.dev.disks) == 1 {
		log := g.dev.disks[0].ex.Log
		// Close the epoch whose events went nowhere, so the stream the
		// replica sees starts with a whole epoch.
		if _, _, err := log.MarkEpoch(ctx); err != nil {
			c.Cont(ctx)
			return fail(err)
		}
		msg.LogEpoch, msg.LogSeq = log.Position()
		msg.Disks = []int64{log.Size()}
		g.dev.stream(events)
	}
	if err := c.Cont(ctx); err != nil {
		g.dev.stream(nil)
		return fail(err)
	}
	undo := func(err error) error {
		g.dev.stream(nil)
		drain(events)
		return fail(err)
	}
	// The replica side may redirect the request to a shim of its own:
	// the link that answers is the one the pairing uses.
	link, reply, err := g.a.askReplica(ctx, link, g.name, peer, msg, 60*time.Second)
	conn = link.conn
	if err != nil {
		return undo(fmt.Errorf("%w: %s did not answer: %w", ErrPeer, peer, err))
	}
	if reply.Op != opReady {
		return undo(fmt.Errorf("%w: %s refused to protect %s: %s", ErrPeer, peer, g.name, reply.Error))
	}

	p := &protection{peer: peer, conn: conn, events: events, done: make(chan struct{}), auto: auto, shim: link.routed,
		peerTimeout: max(reply.PeerTimeout, g.a.cfg.PeerTimeout), probeWindow: reply.ProbeWindow}
	if p.health, err = g.a.newPeerHealth(reply.Mgmt, g.a.cfg.PeerTimeout); err != nil {
		return undo(err)
	}
	conn.health.Store(p.health)
	if p.region, err = memsync.OpenRegion(g.m.RAMFile(), false); err != nil {
		p.health.close()
		return undo(err)
	}
	if p.tracker, err = memsync.New(ctx, memsync.Config{Kind: g.a.cfg.Tracker, PID: g.m.PID(), Region: p.region}); err != nil {
		p.region.Close()
		p.health.close()
		return undo(err)
	}
	cfg := lockstep.PrimaryConfig{
		QMP: c, RAM: p.region, Tracker: p.tracker, Conn: conn,
		Policy: g.a.cfg.Policy, Logger: g.a.log.With("vm", g.name),
	}
	if len(g.dev.disks) == 1 {
		de := g.dev.disks[0]
		cfg.Block, cfg.BlockEvents = de.ex.Log, events
		p.diskSync = initsync.New(de.ex.Log, de.ex.Image, initsync.Options{})
		cfg.DiskSync = p.diskSync.Run
	}
	if len(g.dev.nics) > 0 {
		cfg.Output = output{nics: g.dev.nics}
	}
	if p.prim, err = lockstep.NewPrimary(cfg); err != nil {
		p.tracker.Close()
		p.region.Close()
		p.health.close()
		return undo(err)
	}
	runCtx, runCancel := context.WithCancel(context.Background())
	p.cancel = runCancel
	g.mu.Lock()
	g.prot, g.peer = p, peer
	g.mu.Unlock()
	g.setState(StateSyncing, "paired with "+peer)
	go conn.watch(runCtx, g.a.cfg.PeerTimeout, func(s time.Duration) {
		g.a.log.Warn("replication link silent", "vm", g.name, "peer", peer, "silence", s)
	})
	go g.runProtection(runCtx, p)
	return nil
}

func peerAddr(peer string) string {
	if _, _, err := splitHostPort(peer); err == nil {
		return peer
	}
	return peer + ":" + DefaultPeerPort
}

// runProtection runs the coordinator; when it ends without a handover the
// guest goes on alone: degraded, its held output released.
func (g *guest) runProtection(ctx context.Context, p *protection) {
	go func() {
		// syncing → protected once the secondary holds a checkpoint.
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if p.prim.Stats().Checkpoints > 0 {
					g.setState(StateProtected, "first checkpoint committed on "+p.peer)
					return
				}
			}
		}
	}()
	err := p.prim.Run(ctx)
	p.err = err
	if errors.Is(err, qmp.ErrClosed) && g.cleanExit() {
		// Checked before qemuDying, which gives up after 2 s: a domain
		// shut down in order must never look like a lost secondary
		// (degraded, the link left to time out) or a lost VM, either of
		// which would have the secondary resurrect it.
		g.endCleanly(p)
	} else if g.qemuDying(err) && g.cleanExit() {
		g.endCleanly(p)
	} else if g.qemuDying(err) {
		// Not a lost secondary but a lost VM: watch reports it (and
		// stopProtection waits for done).
		g.mu.Lock()
		reason := g.killedFor
		g.mu.Unlock()
		if reason == "" {
			reason = g.exitReason()
		}
		g.stopGuard(true)
		g.vmLost(p, reason)
	}
	g.mu.Lock()
	handover, lost := p.handover, p.vmLost
	g.mu.Unlock()
	if lost {
		g.freeProtection(p)
		p.health.close()
	} else if !handover {
		g.degrade(p, err)
	}
	close(p.done)
}

// freeProtection frees what an ended protection held here (its dirty tracking
// and RAM mapping) and forgets it. Its peer health is the caller's to
// close: degrade still asks it after the link is gone.
func (g *guest) freeProtection(p *protection) {
	p.tracker.Close()
	p.region.Close()
	g.mu.Lock()
	if g.prot == p {
		g.prot = nil
	}
	g.mu.Unlock()
}

// detach ends a failed protection's disk stream and link, then releases
// it; it returns when the link was closed.
func (g *guest) detach(p *protection) (ended time.Time) {
	g.dev.stream(nil)
	drain(p.events)
	p.cancel()
	ended = time.Now()
	p.conn.Close()
	g.freeProtection(p)
	return ended
}

// fenceLate ends a protection whose end was noticed too late to let the
// VM's held output out safely (protection.tooLate): the secondary may
// have found the VM silent and promoted it. The guest is paused here with
// its output held, which is safe whichever copy lives, until the operator
// says which: `ftctl stop` here if the secondary runs the VM, `ftctl
// resume` if it did not take over.
func (g *guest) fenceLate(p *protection, err error, last time.Time, late time.Duration) {
	qctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	perr := g.m.QMP().Stop(qctx)
	cancel()
	g.detach(p)
	p.health.close()
	reason := fmt.Sprintf("secondary lost (%s), noticed %v after it was last heard: %v after %s's LAN probe may have stopped listening, so it may have taken over. "+
		"Guest paused here with its output held: if %s runs %s now, `ftctl stop %s` here; if not, `ftctl resume %s`",
		p.conn.cause(err), time.Since(last).Round(time.Millisecond), late.Round(time.Millisecond), p.peer, p.peer, g.name, g.name, g.name)
	if perr != nil {
		// The output stays held all the same: nothing of this copy
		// reaches the LAN.
		reason += fmt.Sprintf(" (pausing the guest failed: %v)", perr)
	}
	g.a.log.Warn("fenced: the end of the protection was noticed too late", "vm", g.name, "peer", p.peer, "late", late)
	g.setState(StateFenced, reason)
}

// resume lets a fenced guest run on alone, on the operator's word that the
// secondary did not take over.
func (g *guest) resume(ctx context.Context) error {
	g.mu.Lock()
	st, peer := g.state, g.peer
	g.mu.Unlock()
	if st != StateFenced {
		return fmt.Errorf("%w: %s is %s; only a fenced VM is resumed", ErrState, g.name, st)
	}
	if err := g.m.QMP().Cont(ctx); err != nil {
		return fmt.Errorf("%w: resume %s: %w", ErrState, g.name, err)
	}
	g.dev.passthrough(true)
	g.setState(StateDegraded, fmt.Sprintf("resumed by the operator after a fence (%s did not take over)", peer))
	g.startRepair(peer)
	return nil
}

// qemuDying says whether the coordinator ended because the guest's QEMU
// went away: its QMP connection closed and the process exits soon after.
func (g *guest) qemuDying(err error) bool {
	select {
	case <-g.m.Exited():
		return true
	default:
	}
	if !errors.Is(err, qmp.ErrClosed) {
		return false
	}
	select {
	case <-g.m.Exited():
		return true
	case <-time.After(2 * time.Second):
		return false
	}
}

// degrade ends a protection that failed: output flows again, the disk's
// events are discarded, the guest keeps running. Unless this comes too
// late (see protection.tooLate): then the guest is fenced instead.
func (g *guest) degrade(p *protection, err error) {
	if d := time.Duration(g.a.degradeDelay.Load()); d > 0 {
		time.Sleep(d)
	}
	last := time.Unix(0, p.conn.last.Load())
	g.mu.Lock()
	ending := p.stopping
	g.mu.Unlock()
	if late, by := p.tooLate(last, time.Now()); late && !ending {
		g.fenceLate(p, err, last, by)
		return
	}
	g.dev.passthrough(true)
	ended := g.detach(p)
	g.mu.Lock()
	st := g.state
	stopping := p.stopping
	g.mu.Unlock()
	if stopping || st == StateStopped || st == StateHandedOver {
		return
	}
	reason := "secondary lost"
	if err != nil {
		reason = "secondary lost: " + p.conn.cause(err)
	}
	g.setState(StateDegraded, reason)
	g.startRepair(p.peer)
	if !p.health.hasMgmt() {
		p.health.close()
		return
	}
	// Degrading cannot wait (output is held until it does); what the
	// management path says about the secondary is added when known.
	go func() {
		defer p.health.close()
		alive, why := p.health.aliveAfter(context.Background(), ended)
		// The heartbeats went to whoever answered the pairing: B's agent,
		// or the replica shim B's agent redirected it to (whose agent may
		// well still run).
		who := "the secondary's agent"
		if p.shim {
			who = "the secondary's replica shim"
		}
		if alive {
			why = who + " still runs (" + why + "): only the replication link failed"
		} else {
			why = who + " is silent too (" + why + ")"
		}
		g.mu.Lock()
		same := g.state == StateDegraded && g.reason == reason
		g.mu.Unlock()
		if same {
			g.setState(StateDegraded, reason+"; "+why)
		}
	}()
}

// stopProtection ends the current pairing, if any, and waits for it.
func (g *guest) stopProtection() {
	g.mu.Lock()
	p := g.prot
	g.mu.Unlock()
	if p == nil {
		return
	}
	g.mu.Lock()
	p.stopping = true
	g.mu.Unlock()
	p.cancel()
	p.conn.Close()
	<-p.done
}

// drain empties an event pipe so a write blocked on it completes.
func drain(p *eventlog.Pipe) {
	if p == nil {
		return
	}
	for p.Len() > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := p.Recv(ctx)
		cancel()
		if err != nil {
			return
		}
	}
}

// failover hands the guest over to its secondary with zero loss: a final
// checkpoint (the guest stays paused), committed and acknowledged; then the
// peer promotes its standby and this QEMU quits.
func (g *guest) failover(ctx context.Context) (uint64, error) {
	g.mu.Lock()
	p := g.prot
	st := g.state
	g.mu.Unlock()
	if p == nil || st != StateProtected {
		return 0, fmt.Errorf("%w: %s is %s; a planned failover needs a protected VM", ErrState, g.name, st)
	}
	g.mu.Lock()
	p.handover = true
	g.mu.Unlock()
	n, err := p.prim.Handover(ctx)
	if err != nil {
		g.mu.Lock()
		p.handover = false
		g.mu.Unlock()
		return 0, fmt.Errorf("final checkpoint: %w", err)
	}
	<-p.done // the coordinator has stopped; the link is ours again
	// The guest stays paused from here on: its lease goes to the peer.
	g.stopGuard(true)
	if err := sendMsg(ctx, p.conn, message{Op: opHandover, VM: g.name, Epoch: n}); err != nil {
		g.resumeAlone(p, err)
		return 0, fmt.Errorf("%w: tell %s to take over: %w", ErrPeer, p.peer, err)
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	reply, err := recvMsg(rctx, p.conn)
	cancel()
	if err == nil && reply.Op != opPromoted {
		err = fmt.Errorf("%w: %s answered %q: %s", ErrPeer, p.peer, reply.Op, reply.Error)
	}
	if err != nil {
		// The peer may or may not have taken over; resuming here could
		// make two copies run. Stay paused and say so.
		g.setState(StateDegraded, fmt.Sprintf("handover to %s unconfirmed, guest left paused: %v", p.peer, err))
		return n, err
	}
	g.setState(StateHandedOver, fmt.Sprintf("running on %s since epoch %d", p.peer, n))
	p.conn.Close()
	p.health.close()
	p.tracker.Close()
	p.region.Close()
	g.dev.stream(nil)
	qctx, qcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer qcancel()
	g.m.Stop(qctx)
	g.dev.close()
	g.m.Close()
	// The record stays (state handed-over, serial log kept) until the VM
	// is stopped here or comes back as a replica.
	return n, nil
}

// resumeAlone is the way back when a handover could not even be announced:
// the peer cannot have taken over, so the guest resumes here, degraded.
func (g *guest) resumeAlone(p *protection, err error) {
	p.conn.Close()
	p.health.close()
	p.tracker.Close()
	p.region.Close()
	g.dev.passthrough(true)
	g.dev.stream(nil)
	drain(p.events)
	if gerr := g.startGuard(context.Background()); gerr != nil {
		// Without the lease, resuming could make two copies run.
		g.mu.Lock()
		g.prot = nil
		g.mu.Unlock()
		g.setState(StateDegraded, fmt.Sprintf("handover failed (%v) and the lease could not be taken back (%v); guest left paused", err, gerr))
		return
	}
	g.m.QMP().Cont(context.Background())
	g.mu.Lock()
	g.prot = nil
	g.mu.Unlock()
	g.setState(StateDegraded, fmt.Sprintf("handover failed, running here alone: %v", err))
}

// unpair stops protecting the guest (it keeps running, unprotected).
func (g *guest) unpair() error {
	repairing := g.stopRepair()
	g.pairMu.Lock()
	defer g.pairMu.Unlock()
	g.mu.Lock()
	p := g.prot
	g.mu.Unlock()
	if p == nil && repairing {
		g.peer = ""
		g.setState(StateUnprotected, "unpaired (automatic re-pairing stopped)")
		return nil
	}
	if p == nil {
		return fmt.Errorf("%w: %s is not paired", ErrState, g.name)
	}
	g.stopProtection()
	g.peer = ""
	g.setState(StateUnprotected, "unpaired")
	return nil
}

// stop shuts the guest down and releases everything.
func (g *guest) stop(ctx context.Context) error {
	g.mu.Lock()
	gone := g.state == StateHandedOver
	g.mu.Unlock()
	if gone {
		g.a.forget(g.name)
		return nil
	}
	g.setState(StateStopped, "stopped by request")
	g.stopRepair()
	g.stopProtection()
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err := g.m.Stop(qctx)
	g.m.Close()
	g.stopGuard(true)
	g.dev.close()
	os.RemoveAll(g.dir)
	for _, f := range g.extra {
		os.Remove(f)
	}
	g.a.forget(g.name)
	return err
}

// status reports the guest's state and figures.
func (g *guest) status() VMStatus {
	g.mu.Lock()
	s := VMStatus{Name: g.name, Role: RolePrimary, State: g.state, Peer: g.peer, Reason: g.reason, Since: g.since,
		Accel: g.m.Accel(), QEMUHealth: g.health}
	if g.a.shimOf != "" {
		s.ShimPID = os.Getpid()
	}
	select {
	case <-g.m.Exited():
	default:
		s.PID = g.pid()
	}
	p := g.prot
	if g.repairStop != nil && p == nil {
		next := g.repairNext
		s.Repair = &RepairStatus{Peer: g.peer, Next: next, Attempts: g.repairTries, LastError: g.repairErr}
	}
	g.mu.Unlock()
	if p == nil {
		return s
	}
	st := p.prim.Stats()
	s.Epoch, s.Sent, s.Checkpoints = st.Acked, st.Sent, st.Checkpoints
	s.LastPause, s.PauseP50, s.PauseP99, s.Lag = st.LastPause, st.PauseP50, st.PauseP99, st.LastAckLatency
	s.WireBytes = st.WireBytes
	s.PeerHealth = p.health.state()
	s.EpochRate, s.BytesPerSecond = g.rate.update(st.Acked, st.WireBytes)
	if st.Err != nil {
		s.Error = st.Err.Error()
	}
	if st.Checkpoints == 0 {
		sp := &SyncProgress{MemoryBytes: st.Sync.BytesSent, MemoryTotal: int64(g.spec.MemoryMiB) << 20, MemoryRound: st.Sync.Round, Rate: st.Sync.Rate}
		if p.diskSync != nil {
			dp := p.diskSync.Progress()
			sp.DiskDone, sp.DiskTotal = dp.Done, dp.Total
			// dp.Rate counts bytes scanned, holes included (gigabytes a
			// second on a sparse disk); the user wants bytes copied.
			if secs := dp.Elapsed.Seconds(); secs > 0 {
				sp.Rate += float64(dp.Sent) / secs
			}
		}
		s.Sync = sp
	}
	return s
}

// rateMeter turns counters into recent rates for status.
type rateMeter struct {
	mu     sync.Mutex
	t      time.Time
	epochs uint64
	bytes  int64
	er, br float64
}

func (r *rateMeter) update(epochs uint64, bytes int64) (float64, float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if !r.t.IsZero() {
		if dt := now.Sub(r.t).Seconds(); dt > 0.2 {
			r.er = float64(epochs-r.epochs) / dt
			r.br = float64(bytes-r.bytes) / dt
		} else {
			return r.er, r.br
		}
	}
	r.t, r.epochs, r.bytes = now, epochs, bytes
	return r.er, r.br
}

// startGuard takes the VM's lease from the witness (when one is
// configured) and keeps it with a failover.PrimaryGuard until stopGuard.
// The guard runs from the first pairing on, degraded or not: a standby of
// the VM may exist on a peer, which the witness lets promote only once this
// primary stopped renewing — and a primary that cannot renew fences itself
// first. A witness that cannot be reached, or says another node holds the
// lease, refuses the pairing (nothing has been started yet).
func (g *guest) startGuard(ctx context.Context) error {
	w := g.a.cfg.Witness
	if w == nil {
		return nil
	}
	g.mu.Lock()
	running := g.guardStop != nil
	g.mu.Unlock()
	if running {
		return nil
	}
	l, err := w.Acquire(ctx, g.name, true)
	if err != nil {
		return fmt.Errorf("%w: witness: %w (is `ftctl witness` running and reachable, with the same key?)", ErrPeer, err)
	}
	if !l.Granted {
		if l.Holder == "" {
			return fmt.Errorf("%w: the witness restarted less than a lease ago and grants no new lease yet; try again in %v", ErrState, l.TTL)
		}
		return fmt.Errorf("%w: the witness says %q holds the lease of %s", ErrState, l.Holder, g.name)
	}
	guard, err := failover.NewPrimaryGuard(failover.GuardConfig{VM: g.name, Lease: w, Fence: failover.FenceFunc(g.fence), Held: &l})
	if err != nil {
		return fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	gctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	g.mu.Lock()
	g.guardStop, g.guardDone = cancel, done
	g.mu.Unlock()
	go func() {
		defer close(done)
		err := guard.Run(gctx)
		if gctx.Err() == nil {
			g.a.log.Warn("lease guard ended", "vm", g.name, "err", err)
		}
	}()
	return nil
}

// stopGuard stops renewing the lease; with release it gives the lease up,
// which is only safe once the VM here is stopped or paused for good.
func (g *guest) stopGuard(release bool) {
	g.mu.Lock()
	stop, done := g.guardStop, g.guardDone
	g.guardStop, g.guardDone = nil, nil
	g.mu.Unlock()
	if stop == nil {
		return
	}
	stop()
	<-done
	if release {
		g.releaseLease()
	}
}

// releaseLease gives the VM's lease up (best effort: unreleased, it lapses
// within a TTL).
func (g *guest) releaseLease() {
	if g.a.cfg.Witness == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := g.a.cfg.Witness.Release(ctx, g.name); err != nil {
		g.a.log.Warn("release lease", "vm", g.name, "err", err)
	}
}

// fence is the guard's last resort: this primary lost (or could not
// renew) the VM's lease, so a secondary may be promoting. The QEMU is
// killed, not paused: a paused copy could be resumed by mistake next to
// the promoted one, and the secondary resumes from its own replica anyway.
func (g *guest) fence(ctx context.Context, reason string) error {
	g.mu.Lock()
	g.killedFor = "fenced: " + reason + "; QEMU killed"
	g.mu.Unlock()
	g.a.log.Warn("fencing", "vm", g.name, "reason", reason)
	err := g.m.Kill()
	g.a.log.Warn("fenced: QEMU killed", "vm", g.name, "err", err)
	return err
}

// Automatic re-pairing: a degraded guest tries to pair with its last peer
// again, after 1 s, then doubling up to 30 s between attempts (Config
// RepairMin/RepairMax; NoRepair turns it off), until it succeeds or a user
// pairs, unpairs or stops the VM. Each attempt that reaches the peer costs
// the guest one brief pause (the disk event stream starts at a stop), so
// the backoff also bounds that.

// startRepair starts re-pairing with peer unless it runs already.
func (g *guest) startRepair(peer string) {
	if g.a.cfg.NoRepair || peer == "" {
		return
	}
	g.mu.Lock()
	if g.repairStop != nil {
		g.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	g.repairStop, g.repairTries, g.repairErr = cancel, 0, ""
	g.mu.Unlock()
	go g.repairLoop(ctx, peer)
}

// stopRepair ends the re-pairing (without waiting for an attempt under
// way: pairMu orders it with what follows). It reports whether one ran.
func (g *guest) stopRepair() bool {
	g.mu.Lock()
	stop := g.repairStop
	g.repairStop = nil
	g.mu.Unlock()
	if stop != nil {
		stop()
	}
	return stop != nil
}

func (g *guest) repairLoop(ctx context.Context, peer string) {
	defer func() {
		g.mu.Lock()
		if g.repairStop != nil && ctx.Err() == nil {
			g.repairStop()
			g.repairStop = nil
		}
		g.mu.Unlock()
	}()
	delay := g.a.cfg.RepairMin
	for {
		g.mu.Lock()
		g.repairNext = time.Now().Add(delay)
		g.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		g.pairMu.Lock()
		g.mu.Lock()
		st, busy := g.state, g.prot != nil
		g.repairTries++
		g.mu.Unlock()
		if ctx.Err() != nil || busy || st != StateDegraded {
			g.pairMu.Unlock()
			return
		}
		err := g.pairLocked(ctx, peer, true)
		g.pairMu.Unlock()
		if err == nil {
			g.a.log.Info("re-paired", "vm", g.name, "peer", peer)
			return
		}
		g.a.log.Info("re-pairing failed", "vm", g.name, "peer", peer, "err", err)
		g.mu.Lock()
		g.repairErr = err.Error()
		g.mu.Unlock()
		delay = min(2*delay, g.a.cfg.RepairMax)
	}
}
