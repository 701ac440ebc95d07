package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/ftctl/ftctl/pkg/failover"
	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
	"github.com/ftctl/ftctl/pkg/memsync"
)

// Config configures an agent; zero values take the defaults.
type Config struct {
	// Name identifies this host to peers (its certificate's name).
	Name string
	// StateDir keeps what must survive a restart (VM records, replica
	// disks, committed device state). Default /var/lib/ftctl.
	StateDir string
	// RunDir holds sockets and per-run files. Default /run/ftctl.
	RunDir string
	// RAMDir holds guest RAM and replica RAM files. Default /dev/shm.
	RAMDir string
	// ControlSocket is the local control API (mode 0600). Default
	// RunDir/agent.sock.
	ControlSocket string
	// PeerAddr is where peers connect for replication (host:port); empty
	// means this agent only protects outwards.
	PeerAddr string
	// Credentials authenticate replication links (mutual TLS or PSK).
	Credentials *wire.Credentials
	// Bridge, if set, is the bridge every VM tap joins (the VM's LAN).
	Bridge string
	// MgmtAddr, if set, is where this agent answers management heartbeats
	// (UDP host:port, a concrete address: it is sent to peers in the
	// pairing handshake). Both agents of a pair need one for the second
	// path to be used.
	MgmtAddr string
	// MgmtKey authenticates management heartbeats (HMAC-SHA256, at least
	// failover.MinKeyLen bytes), shared by the pair: a --mgmt-key-file, or
	// MgmtKeyFromPSK of the pair's pre-shared key.
	MgmtKey []byte

	Policy  lockstep.Policy
	Tracker memsync.Kind
	// PeerTimeout: a replication link silent for this long is dead (no
	// heartbeat, no acknowledgement). Default 1s.
	PeerTimeout time.Duration
	// QMPTimeout: a primary's QEMU that has not answered query-status for
	// this long is hung (reported in status; while protected, killed so
	// the secondary takes over). Default DefaultQMPTimeout.
	QMPTimeout time.Duration
	// Witness, if set, holds each VM's lease (failover.WitnessClient): a
	// primary keeps it while it runs a paired VM (failover.PrimaryGuard)
	// and fences the VM — kills its QEMU — when it cannot renew it; a
	// promoted secondary takes it over. The arbiter should ask the same
	// witness (ProbeArbiter.Witness).
	Witness Witness
	// NoRepair turns off the automatic re-pairing of degraded VMs with
	// their last peer. RepairMin (default 1 s) is the first delay, doubled
	// after each failed attempt up to RepairMax (default 30 s).
	NoRepair             bool
	RepairMin, RepairMax time.Duration
	// Arbiter decides, when a primary is lost, whether this secondary may
	// promote. Nil means never promote on failure (planned switchovers
	// still work): safe, but no automatic failover.
	Arbiter Arbiter

	// Libvirt, if set, is the libvirtd this agent defines standby domains
	// on (a URI or a socket path, as for `ftctl libvirt --connect`), so it
	// can protect libvirt domains of its peers; on a primary it lets the
	// agent stop libvirt domains through libvirt. Empty: no libvirt.
	Libvirt string

	// ShimCommand, if set, is the command (argv) that starts a VM's shim;
	// the agent appends "--vm NAME", and "--role secondary" for a
	// replica. Each VM this host runs as primary, and each replica it
	// keeps, then lives in its own shim process and survives an agent
	// restart (see shim.go). Empty: VMs and replicas run inside the agent
	// process.
	ShimCommand []string
	// ShimPorts, if set, is the range of ports replica shims listen on
	// (on PeerAddr's host), for firewalls that must name them; zero: a
	// port the system picks.
	ShimPorts PortRange

	Logger *slog.Logger
}

// DefaultQMPTimeout is Config.QMPTimeout's default: QMP answers within
// milliseconds even while a checkpoint runs (the QMP client matches replies
// by id); seconds of silence means the process is stopped or wedged.
const DefaultQMPTimeout = 2 * time.Second

// DefaultPeerPort is the replication port when a peer address names none.
const DefaultPeerPort = "7480"

func (c Config) withDefaults() (Config, error) {
	if c.Name == "" {
		h, err := os.Hostname()
		if err != nil {
			return c, fmt.Errorf("%w: agent name: %v", ErrBadRequest, err)
		}
		c.Name = h
	}
	if c.StateDir == "" {
		c.StateDir = "/var/lib/ftctl"
	}
	if c.RunDir == "" {
		c.RunDir = "/run/ftctl"
	}
	if c.RAMDir == "" {
		c.RAMDir = "/dev/shm"
		if fi, err := os.Stat(c.RAMDir); err != nil || !fi.IsDir() {
			c.RAMDir = c.RunDir
		}
	}
	if c.ControlSocket == "" {
		c.ControlSocket = filepath.Join(c.RunDir, "agent.sock")
	}
	if c.PeerTimeout <= 0 {
		c.PeerTimeout = time.Second
	}
	if c.RepairMin <= 0 {
		c.RepairMin = time.Second
	}
	if c.RepairMax < c.RepairMin {
		c.RepairMax = max(30*time.Second, c.RepairMin)
	}
	if c.QMPTimeout <= 0 {
		c.QMPTimeout = DefaultQMPTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.MgmtAddr != "" {
		host, _, err := net.SplitHostPort(c.MgmtAddr)
		if err != nil {
			return c, fmt.Errorf("%w: management address %q: %v", ErrBadRequest, c.MgmtAddr, err)
		}
		if ip, err := netip.ParseAddr(host); host == "" || (err == nil && ip.IsUnspecified()) {
			return c, fmt.Errorf("%w: management address %q: give this host's own address (peers are told it)", ErrBadRequest, c.MgmtAddr)
		}
		if len(c.MgmtKey) < failover.MinKeyLen {
			return c, fmt.Errorf("%w: management heartbeats need a key of at least %d bytes (--mgmt-key-file, or --psk-file to derive one)", ErrBadRequest, failover.MinKeyLen)
		}
	}
	if err := c.ShimPorts.check(); err != nil {
		return c, fmt.Errorf("%w: shim ports: %v", ErrBadRequest, err)
	}
	if c.PeerAddr != "" && c.Credentials == nil {
		return c, fmt.Errorf("%w: a peer listener needs credentials (ftctl cert)", ErrBadRequest)
	}
	return c, nil
}

// Witness is the lease service as the agent uses it: failover.Leaser, and
// a release for planned handovers (failover.WitnessClient implements it).
type Witness interface {
	failover.Leaser
	Release(ctx context.Context, vm string) error
}
