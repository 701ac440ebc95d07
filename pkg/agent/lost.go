package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ftctl/ftctl/pkg/libvirt"
)

// Lost domains. A libvirt domain outlives the process that served its
// devices (its disk's NBD export, its NIC's output buffer) and its
// replication: libvirtd, not ftctl, is QEMU's parent. Without shims that
// process is the agent, so an agent restart leaves the domain running
// with its disk and NIC cut and its protection gone; with shims it is the
// domain's shim, and only the shim's own death does that. Either way the
// VM's record on disk is all that is left, and a restarted agent reports
// the domain from it — lost, with why and what to do — instead of
// forgetting a VM libvirt still shows. The report goes when libvirt starts
// the domain again (prepare), says it stopped, or the user stops it.

// lostVM is a VM that a record names and no process of ftctl serves.
type lostVM struct {
	rec   record
	since time.Time
	// owner is what served the VM and is gone ("agent", "shim").
	owner string
}

// loadLost reads the records no shim claimed (discoverShims ran first)
// and keeps those of libvirt domains as lost. Records of VMs the agent
// started itself die with their QEMU's devices and are left as before.
func (a *Agent) loadLost() {
	for _, r := range a.records() {
		a.noteLostRecord(r)
	}
}

// noteLost keeps VM name as lost if its record names a libvirt domain
// this host runs and no shim serves it.
func (a *Agent) noteLost(name string) {
	if r, ok := a.loadRecord(name); ok {
		a.noteLostRecord(r)
	}
}

func (a *Agent) noteLostRecord(r record) {
	if !r.Libvirt || r.Role != RolePrimary || checkShimName(r.Name) != nil {
		return
	}
	owner := "agent"
	if len(a.cfg.ShimCommand) > 0 {
		owner = "shim"
	}
	a.mu.Lock()
	_, shim := a.shims[r.Name]
	if !shim {
		if a.lost == nil {
			a.lost = map[string]*lostVM{}
		}
		a.lost[r.Name] = &lostVM{rec: r, since: time.Now(), owner: owner}
	}
	a.mu.Unlock()
	if !shim {
		a.log.Warn("libvirt domain lost: the process that served its devices is gone", "vm", r.Name, "was", r.State, "owner", owner)
	}
}

// lostFor returns the lost VM of that name, nil if none.
func (a *Agent) lostFor(name string) *lostVM {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lost[name]
}

// dropLost forgets a lost VM and its record.
func (a *Agent) dropLost(name string) {
	a.mu.Lock()
	_, ok := a.lost[name]
	delete(a.lost, name)
	a.mu.Unlock()
	if ok {
		a.removeRecord(name)
	}
}

// qemuAlive says whether the lost VM's QEMU still runs.
func (l *lostVM) qemuAlive() bool {
	return l.rec.PID > 0 && processAlive(l.rec.PID)
}

func (l *lostVM) status() VMStatus {
	s := VMStatus{Name: l.rec.Name, Role: RolePrimary, State: StateUnprotected, Peer: l.rec.Peer, Since: l.since}
	was := string(l.rec.State)
	if l.rec.Peer != "" {
		was += " with " + l.rec.Peer
	}
	qemu := "its QEMU has exited"
	if l.qemuAlive() {
		s.PID = l.rec.PID
		qemu = fmt.Sprintf("its QEMU (pid %d) still runs under libvirt, with its disk and NIC cut", l.rec.PID)
	}
	s.Reason = fmt.Sprintf("lost: the %s process that served this libvirt domain's disk and NIC and its replication is gone (it was %s); %s", l.owner, was, qemu)
	s.Error = "not protected and not served by ftctl: restart the domain through libvirt (virsh destroy, virsh start) to protect it again; ftctl stop forgets it"
	return s
}

// errLost is the error for a request about a lost VM that cannot be
// served.
func (l *lostVM) errLost() error {
	return fmt.Errorf("%w: %s was lost when the %s serving it died: its disk and NIC were served there; restart the domain through libvirt (virsh destroy, virsh start), or forget it with ftctl stop", ErrState, l.rec.Name, l.owner)
}

// stopLost forgets a lost VM; its domain, if it still runs, is destroyed
// through libvirt when the agent has a connection (it runs on with its
// devices cut otherwise, useless).
func (a *Agent) stopLost(ctx context.Context, l *lostVM) error {
	var err error
	if l.qemuAlive() && a.cfg.Libvirt != "" {
		var c *libvirt.Conn
		if c, err = a.libvirtConn(ctx); err == nil {
			if err = c.Destroy(ctx, l.rec.Name); errors.Is(err, libvirt.ErrNoDomain) {
				err = nil
			}
		}
	}
	a.dropLost(l.rec.Name)
	return err
}

// claimLost lets a new replica of name take the place of a lost VM whose
// QEMU is gone; one whose QEMU still runs keeps its name.
func (a *Agent) claimLost(name string) error {
	l := a.lostFor(name)
	if l == nil {
		return nil
	}
	if l.qemuAlive() {
		return fmt.Errorf("%w: %s still runs on this host (lost by a restart: stop it first)", ErrExists, name)
	}
	a.dropLost(name)
	return nil
}
