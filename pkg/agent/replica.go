package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/vm"
)

// errHandover ends a secondary's receive loop when its primary hands over.
var errHandover = errors.New("primary handed over")

// errVMLost ends a secondary's receive loop when its primary reports the
// VM dead.
var errVMLost = errors.New("primary reports its VM dead")

// replicaVM is a VM this host protects for a peer: replica RAM and disk,
// and a standby QEMU over them, waiting to take over.
type replicaVM struct {
	a       *Agent
	name    string
	spec    vm.Spec
	probe   ProbeSpec
	peer    string
	dir     string // persistent: disk image, replay and lockstep state
	runDir  string
	ramPath string

	replica  *memsync.Replica
	img      *backend.File
	replayer *replay.Replayer
	dev      *devices
	standby  machine
	// standbyXML is the libvirt definition of a standby domain (a
	// libvirt VM's replica); promotedXML replaces it after promotion.
	standbyXML, promotedXML string
	sec                     *lockstep.Secondary
	conn                    *watchedConn
	health                  *peerHealth
	// timeout: the primary's link is dead after this much silence
	// (replicaTimeout).
	timeout time.Duration

	mu      sync.Mutex
	state   State
	reason  string
	since   time.Time
	handEp  uint64
	vmLost  string // the primary's report that the VM died there
	done    chan struct{}
	promote time.Duration // decision → guest running, last promotion
}

func (r *replicaVM) setState(s State, reason string) {
	r.mu.Lock()
	r.state, r.reason, r.since = s, reason, time.Now()
	r.mu.Unlock()
	r.a.log.Info("state", "vm", r.name, "state", s, "reason", reason)
	r.a.saveRecord(record{Name: r.name, Role: RoleSecondary, State: s, Peer: r.peer, Spec: r.spec})
}

// prepareReplica builds a fresh replica and standby for the VM described
// by a protect request.
func (a *Agent) prepareReplica(ctx context.Context, m message) (r *replicaVM, err error) {
	if m.Spec == nil {
		return nil, fmt.Errorf("%w: protect request without a VM spec", ErrBadRequest)
	}
	spec := m.Spec.WithDefaults()
	if spec.Name != m.VM {
		return nil, fmt.Errorf("%w: protect request for %q carries the spec of %q", ErrBadRequest, m.VM, spec.Name)
	}
	if len(m.Disks) != len(spec.Disks) {
		return nil, fmt.Errorf("%w: %d disk sizes for %d disks", ErrBadRequest, len(m.Disks), len(spec.Disks))
	}
	if m.Domain != "" && a.cfg.Libvirt == "" {
		return nil, fmt.Errorf("%w: %s is a libvirt domain, and its standby must be one too: start the agent with --libvirt", ErrState, m.VM)
	}
	r = &replicaVM{a: a, name: spec.Name, spec: spec, probe: m.Probe, peer: m.From, done: make(chan struct{}),
		dir:     filepath.Join(a.cfg.StateDir, "replicas", spec.Name),
		runDir:  filepath.Join(a.cfg.RunDir, "replicas", spec.Name),
		ramPath: filepath.Join(a.cfg.RAMDir, "ftctl-replica-"+spec.Name+".ram")}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	// A pairing always starts from scratch: pre-copy and the disk sync
	// assume an empty replica.
	os.RemoveAll(r.dir)
	os.RemoveAll(r.runDir)
	os.Remove(r.ramPath)
	for _, suffix := range []string{".journal", ".epoch"} {
		os.Remove(r.ramPath + suffix)
	}
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		return r, err
	}
	if r.replica, err = memsync.OpenReplica(r.ramPath, int64(spec.MemoryMiB)<<20); err != nil {
		return r, err
	}
	var images []string
	for i, size := range m.Disks {
		p := filepath.Join(r.dir, fmt.Sprintf("disk%d.raw", i))
		f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600)
		if err != nil {
			return r, err
		}
		err = f.Truncate(size)
		f.Close()
		if err != nil {
			return r, err
		}
		images = append(images, p)
	}
	if len(images) > 1 {
		return r, fmt.Errorf("%w: at most one disk per protected VM for now", ErrBadRequest)
	}
	if len(images) == 1 {
		if r.img, err = backend.OpenFile(images[0], backend.FileOptions{}); err != nil {
			return r, err
		}
		if r.replayer, err = replay.Open(ctx, r.img, filepath.Join(r.dir, "replay"), a.log); err != nil {
			return r, err
		}
		if m.LogEpoch > 0 {
			if err := r.replayer.Reset(ctx, m.LogEpoch-1, m.LogSeq); err != nil {
				return r, err
			}
		}
	}
	if r.dev, err = a.openDevices(spec.Name, spec, r.runDir, images); err != nil {
		return r, err
	}
	r.dev.passthrough(false) // the standby emits nothing until it is promoted
	if m.Domain != "" {
		lm, err := a.startStandbyDomain(ctx, r, m.Domain)
		if err != nil {
			return r, err
		}
		r.standby = lm
	} else {
		sm, err := vm.Start(ctx, r.dev.spec, vm.Options{RunDir: filepath.Join(r.runDir, "qemu"), Standby: true, ReplicaRAM: r.ramPath, Logger: a.log})
		if err != nil {
			return r, fmt.Errorf("standby QEMU: %w", err)
		}
		r.standby = sm
	}
	r.sec, err = lockstep.OpenSecondary(ctx, lockstep.SecondaryConfig{
		Replica: r.replica, Replayer: r.replayer, StateDir: filepath.Join(r.dir, "lockstep"),
		Logger: a.log.With("vm", spec.Name), OnControl: r.onControl,
	})
	if err != nil {
		return r, err
	}
	return r, nil
}

func (r *replicaVM) onControl(ctx context.Context, payload []byte) error {
	m, err := decodeMsg(payload)
	if err != nil {
		return err
	}
	if m.Op == opVMLost {
		r.noteVMLost(m.Error)
		return errVMLost
	}
	if m.Op == opUnpair {
		return errUnpaired
	}
	if m.Op != opHandover {
		return fmt.Errorf("%w: unexpected %q during replication", ErrPeer, m.Op)
	}
	if c := r.sec.Committed(); c.Epoch != m.Epoch || !c.Resumable {
		return fmt.Errorf("%w: handover at epoch %d, but epoch %d is committed here", ErrPeer, m.Epoch, c.Epoch)
	}
	r.mu.Lock()
	r.handEp = m.Epoch
	r.mu.Unlock()
	return errHandover
}

// noteVMLost records the primary's report that the VM died there.
func (r *replicaVM) noteVMLost(why string) {
	if why == "" {
		why = "no reason given"
	}
	r.mu.Lock()
	if r.vmLost == "" {
		r.vmLost = why
	}
	r.mu.Unlock()
}

// run receives epochs until the link ends, then decides what the end means.
func (r *replicaVM) run(ctx context.Context) {
	defer close(r.done)
	// The pairing ends with the link: nothing to watch afterwards.
	defer r.health.close()
	wctx, cancel := context.WithCancel(ctx)
	go r.conn.watch(wctx, r.timeout, func(s time.Duration) {
		r.a.log.Warn("replication link silent", "vm", r.name, "peer", r.peer, "silence", s)
	})
	err := r.sec.Run(ctx, r.conn)
	cancel()
	r.mu.Lock()
	st := r.state
	r.mu.Unlock()
	if st == StateStopped {
		return
	}
	if errors.Is(err, errHandover) {
		e, perr := r.promoteNow(ctx, "planned switchover")
		reply := message{Op: opPromoted, VM: r.name, Epoch: e}
		if perr != nil {
			reply = message{Op: opRefused, VM: r.name, Error: perr.Error()}
		}
		sendMsg(ctx, r.conn, reply)
		r.conn.Close()
		return
	}
	if errors.Is(err, errUnpaired) {
		// The VM was shut down in order on its primary: nothing to take
		// over; the replica goes (dropReplica waits for this run to end).
		r.conn.Close()
		r.a.log.Info("primary's VM shut down; dropping the replica", "vm", r.name, "peer", r.peer)
		go r.a.dropReplica(r)
		return
	}
	ended := time.Now()
	r.conn.Close()
	lost := r.conn.cause(err)
	c := r.sec.Committed()
	r.mu.Lock()
	vmLost := r.vmLost
	r.mu.Unlock()
	if vmLost != "" {
		lost = "the primary's agent reports: " + vmLost
	}
	if !c.Resumable {
		r.setState(StateStandby, fmt.Sprintf("primary lost during the initial sync (%s); nothing to resume", lost))
		return
	}
	if vmLost != "" {
		r.arbitrate(ctx, lost, vmLost)
		return
	}
	if r.health.hasMgmt() {
		// The second path tells a dead primary from a broken link without
		// asking the LAN: an agent that answers after the link ended runs,
		// and so (its QEMU exiting would have been reported) does the VM.
		alive, why := r.health.aliveAfter(ctx, ended)
		if alive {
			r.setState(StateStandby, fmt.Sprintf("primary link lost (%s); not promoting: %s, so only the replication link failed", lost, why))
			return
		}
		lost += "; " + why
	}
	r.arbitrate(ctx, lost, "")
}

// arbitrate asks the arbiter whether to promote after the primary was lost
// (lost says how), and promotes if it agrees.
func (r *replicaVM) arbitrate(ctx context.Context, lost, vmDead string) {
	if r.a.cfg.Arbiter == nil {
		r.setState(StateStandby, fmt.Sprintf("primary lost (%s); not promoting: no arbiter configured", lost))
		return
	}
	ok, why, aerr := r.a.cfg.Arbiter.MayPromote(ctx, ArbiterQuery{VM: r.name, Probe: r.probe, PrimaryVMDead: vmDead})
	if aerr != nil || !ok {
		if aerr != nil {
			why = fmt.Sprintf("%s (arbiter failed: %v)", why, aerr)
		}
		r.setState(StateStandby, fmt.Sprintf("primary link lost (%s); not promoting: %s", lost, why))
		return
	}
	r.mu.Lock()
	replaced := r.state == StateStopped
	r.mu.Unlock()
	if replaced {
		// A new pairing from the primary replaced this replica while the
		// arbiter was thinking: the primary lives.
		return
	}
	if _, err := r.promoteNow(ctx, fmt.Sprintf("primary lost (%s): %s", lost, why)); err != nil {
		r.a.log.Error("promotion failed", "vm", r.name, "err", err)
	}
}

// promoteNow resumes the committed checkpoint in the standby and makes the
// VM a guest of this host.
func (r *replicaVM) promoteNow(ctx context.Context, why string) (uint64, error) {
	t0 := time.Now()
	e, err := r.sec.Promote(ctx, r.standby.QMP())
	if err != nil {
		r.setState(StateStandby, fmt.Sprintf("promotion failed: %v", err))
		return e, err
	}
	r.dev.passthrough(true)
	d := time.Since(t0)
	r.mu.Lock()
	r.promote = d
	r.mu.Unlock()
	lv := r.libvirtPromoted(ctx, t0)
	reason := fmt.Sprintf("%s; resumed epoch %d in %v%s", why, e, d.Round(time.Microsecond), lv)
	// Promoted, but logged and recorded only once adopted as a guest
	// (as the primary it now is): a status read in between still sees
	// the role it will keep.
	r.mu.Lock()
	r.state, r.reason, r.since = StatePromoted, reason, time.Now()
	r.mu.Unlock()
	r.a.adoptPromoted(r, reason)
	return e, nil
}

// close releases the replica's resources (the standby is killed unless it
// was promoted and adopted).
func (r *replicaVM) close() {
	if c := r.link(); r.sec != nil && c != nil {
		c.Close()
	}
	r.health.close()
	if r.standby != nil {
		r.standby.Close()
	}
	if r.dev != nil {
		r.dev.close()
	}
	if r.replayer != nil {
		r.replayer.Close()
	}
	if r.img != nil {
		r.img.Close()
	}
	if r.replica != nil {
		r.replica.Close()
	}
}

// stop ends the protection here and removes the replica.
func (r *replicaVM) stop() {
	r.setState(StateStopped, "replica removed")
	if c := r.link(); c != nil {
		c.Close()
		<-r.done
	}
	r.close()
	os.RemoveAll(r.dir)
	os.RemoveAll(r.runDir)
	os.Remove(r.ramPath)
}

func (r *replicaVM) status() VMStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := VMStatus{Name: r.name, Role: RoleSecondary, State: r.state, Peer: r.peer, Reason: r.reason, Since: r.since}
	if r.state == StatePromoted {
		// Being adopted as a guest: it runs here as the primary.
		s.Role = RolePrimary
	}
	if r.standby != nil {
		s.PID, s.Accel = r.standby.PID(), r.standby.Accel()
	}
	if r.sec != nil {
		s.Epoch = r.sec.Committed().Epoch
	}
	s.PeerHealth = r.health.state()
	return s
}
