package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ftctl/ftctl/internal/fsutil"
	"github.com/ftctl/ftctl/pkg/vm"
)

// Sentinel errors of the control API; the client maps HTTP statuses back
// to them so the CLI can say what to do.
var (
	ErrNotFound   = errors.New("no such VM")
	ErrExists     = errors.New("VM already exists")
	ErrState      = errors.New("operation not possible in the VM's current state")
	ErrBadRequest = errors.New("bad request")
	ErrPeer       = errors.New("peer agent refused or unreachable")
	// ErrUnavailable: a service the agent needs on its own host (its
	// libvirtd) does not answer; nothing is wrong with the VM.
	ErrUnavailable = errors.New("a service this agent needs is unavailable")
)

// State is a VM's protection state as the user sees it.
type State string

// States.
const (
	StateUnprotected State = "unprotected" // running here, no replica
	StateSyncing     State = "syncing"     // initial copy to the secondary
	StateProtected   State = "protected"   // checkpoints committing on the secondary
	StateDegraded    State = "degraded"    // the secondary was lost; running alone
	StateFenced      State = "fenced"      // paused here: the secondary may have taken over (see guest.fenceLate)
	StateHandedOver  State = "handed-over" // moved to the peer by a planned switchover
	StateStandby     State = "standby"     // replica of a peer's VM, ready to take over
	StatePromoted    State = "promoted"    // took over from a dead or departing primary
	StateStopped     State = "stopped"
)

// Role says whether this host runs the VM or holds its replica.
type Role string

// Roles.
const (
	RolePrimary   Role = "primary"
	RoleSecondary Role = "secondary"
)

// VMStatus is what `ftctl status` shows for one VM.
type VMStatus struct {
	Name   string    `json:"name"`
	Role   Role      `json:"role"`
	State  State     `json:"state"`
	Peer   string    `json:"peer,omitempty"`
	Reason string    `json:"reason,omitempty"` // why the last state change happened
	Since  time.Time `json:"since"`

	PID int `json:"pid,omitempty"`
	// ShimPID is the process that owns the VM's QEMU, devices and
	// replication when the agent runs VMs in shims.
	ShimPID int    `json:"shim_pid,omitempty"`
	Accel   string `json:"accel,omitempty"`
	// RunState is QEMU's own run state (query-status: "running",
	// "paused", "inmigrate" for a standby waiting to take over, ...), so a
	// user can see that exactly one copy of the VM runs.
	RunState string `json:"run_state,omitempty"`
	// QEMUHealth is set while the VM's QEMU is slow to answer QMP or hung
	// (primary side), with how long it has been silent.
	QEMUHealth string `json:"qemu_health,omitempty"`
	// PeerHealth is the failure detector's judgement of the peer agent
	// over the replication link and the management path ("alive", or
	// "suspect: ..." / "lost: ..." with the silent paths), while paired.
	PeerHealth string `json:"peer_health,omitempty"`

	// Replication figures (primary side).
	Epoch          uint64        `json:"epoch,omitempty"` // last acknowledged (primary) / committed (secondary)
	Sent           uint64        `json:"sent,omitempty"`
	Checkpoints    uint64        `json:"checkpoints,omitempty"`
	EpochRate      float64       `json:"epoch_rate,omitempty"` // acknowledged epochs per second, recent
	LastPause      time.Duration `json:"last_pause,omitempty"`
	PauseP50       time.Duration `json:"pause_p50,omitempty"`
	PauseP99       time.Duration `json:"pause_p99,omitempty"`
	Lag            time.Duration `json:"lag,omitempty"` // pause start .. ACK, last epoch
	BytesPerSecond float64       `json:"bytes_per_second,omitempty"`
	WireBytes      int64         `json:"wire_bytes,omitempty"`
	Sync           *SyncProgress `json:"sync,omitempty"`
	// Repair is set while a degraded VM tries to pair with its peer again.
	Repair *RepairStatus `json:"repair,omitempty"`
	Error  string        `json:"error,omitempty"`
}

// RepairStatus is the automatic re-pairing of a degraded VM.
type RepairStatus struct {
	Peer      string    `json:"peer"`
	Next      time.Time `json:"next"` // when the next attempt starts (past while one runs)
	Attempts  int       `json:"attempts"`
	LastError string    `json:"last_error,omitempty"`
}

// SyncProgress is the initial synchronisation's advance.
type SyncProgress struct {
	MemoryBytes int64   `json:"memory_bytes"`
	MemoryTotal int64   `json:"memory_total"`
	MemoryRound int     `json:"memory_round"`
	DiskDone    int64   `json:"disk_done"`
	DiskTotal   int64   `json:"disk_total"`
	Rate        float64 `json:"rate"` // bytes/s, memory and disk together
}

// record is what the agent keeps on disk about a VM, so a restarted agent
// knows what it was doing.
type record struct {
	Name  string  `json:"name"`
	Role  Role    `json:"role"`
	State State   `json:"state"`
	Peer  string  `json:"peer,omitempty"`
	Spec  vm.Spec `json:"spec"`
	PID   int     `json:"pid,omitempty"`
	// Libvirt: the VM is a libvirt domain (prepared or adopted), which
	// outlives the process that served its devices; a restarted agent
	// that finds no shim for it reports it lost (lost.go).
	Libvirt bool `json:"libvirt,omitempty"`
}

func (a *Agent) recordPath(name string) string {
	return filepath.Join(a.cfg.StateDir, "vms", name+".json")
}

// saveRecord writes a VM's record atomically.
func (a *Agent) saveRecord(r record) error {
	p := a.recordPath(r.Name)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(p, b, 0o600); err != nil {
		return fmt.Errorf("save state of %s: %w", r.Name, err)
	}
	return nil
}

// loadRecord reads VM name's record; false when there is none or it does
// not parse as the record of that VM.
func (a *Agent) loadRecord(name string) (record, bool) {
	b, err := os.ReadFile(a.recordPath(name))
	if err != nil {
		return record{}, false
	}
	var r record
	if json.Unmarshal(b, &r) != nil || r.Name != name {
		return record{}, false
	}
	return r, true
}

// records reads every VM record on disk, skipping unreadable ones.
func (a *Agent) records() []record {
	ents, err := os.ReadDir(filepath.Join(a.cfg.StateDir, "vms"))
	if err != nil {
		return nil
	}
	var out []record
	for _, e := range ents {
		if name, ok := strings.CutSuffix(e.Name(), ".json"); ok {
			if r, ok := a.loadRecord(name); ok {
				out = append(out, r)
			}
		}
	}
	return out
}

func (a *Agent) removeRecord(name string) {
	os.Remove(a.recordPath(name))
}
