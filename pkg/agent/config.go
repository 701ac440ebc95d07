package agent

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

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

	Policy  lockstep.Policy
	Tracker memsync.Kind
	// PeerTimeout: a replication link silent for this long is dead (no
	// heartbeat, no acknowledgement). Default 1s.
	PeerTimeout time.Duration
	// Arbiter decides, when a primary is lost, whether this secondary may
	// promote. Nil means never promote on failure (planned switchovers
	// still work): safe, but no automatic failover.
	Arbiter Arbiter

	Logger *slog.Logger
}

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
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.PeerAddr != "" && c.Credentials == nil {
		return c, fmt.Errorf("%w: a peer listener needs credentials (ftctl cert)", ErrBadRequest)
	}
	return c, nil
}
