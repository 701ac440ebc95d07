package agent

import (
	"context"

	"github.com/ftctl/ftctl/pkg/qmp"
	"github.com/ftctl/ftctl/pkg/vm"
)

// machine is what the agent needs of a running QEMU: a process the agent
// started itself (*vm.Machine) or one that libvirt started (libvirtMachine,
// reached over the domain's dedicated QMP socket). Guests and replicas
// hold one; nothing else in the agent cares who started QEMU.
type machine interface {
	// QMP is the monitor the agent checkpoints through.
	QMP() *qmp.Client
	// PID of the QEMU process (dirty tracking, status).
	PID() int
	// RAMFile is the file backing guest RAM.
	RAMFile() string
	// Exited is closed once QEMU has ended.
	Exited() <-chan struct{}
	// Stderr is the tail of QEMU's own diagnostics, if the agent sees them.
	Stderr() string
	// Accel is the accelerator in use (kvm or tcg).
	Accel() string
	// Serial is what the guest wrote to its serial console so far.
	Serial() ([]byte, error)
	// Stop shuts QEMU down cleanly (killing it when ctx ends first).
	Stop(ctx context.Context) error
	// Kill ends QEMU at once, the way a host failure looks to the guest.
	Kill() error
	// Close releases what the agent holds of the machine (killing QEMU if
	// the agent owns it).
	Close() error
}

var _ machine = (*vm.Machine)(nil)
