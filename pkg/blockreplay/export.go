package blockreplay

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/ftctl/ftctl/pkg/blockreplay/backend"
	"github.com/ftctl/ftctl/pkg/blockreplay/eventlog"
	"github.com/ftctl/ftctl/pkg/blockreplay/nbd"
	"github.com/ftctl/ftctl/pkg/blockreplay/replay"
)

// ExportConfig describes an image to serve with its writes logged.
type ExportConfig struct {
	Path string // raw image
	Name string // NBD export name
	// Sink receives the write events (the replication link, or a Pipe).
	Sink eventlog.Sink
	// Log sets where numbering starts; Promote returns the right value
	// for a promoted replica.
	Log  eventlog.Options
	File backend.FileOptions
	NBD  nbd.Options
}

// Export is a raw image served over NBD with every write logged. The
// primary agent runs one for its guest's disk; a promoted secondary runs
// one over its replica, so the new primary's writes are logged from its
// first write on.
type Export struct {
	Image  *backend.File
	Log    *eventlog.Log
	Server *nbd.Server
}

// OpenExport opens the image and builds the log and the server.
func OpenExport(cfg ExportConfig) (*Export, error) {
	if cfg.Sink == nil {
		return nil, fmt.Errorf("export %q: no event sink", cfg.Name)
	}
	img, err := backend.OpenFile(cfg.Path, cfg.File)
	if err != nil {
		return nil, err
	}
	l := eventlog.New(img, cfg.Sink, cfg.Log)
	srv, err := nbd.NewServer(cfg.NBD, nbd.Export{Name: cfg.Name, Backend: l, ReadOnly: cfg.File.ReadOnly, MultiConn: true})
	if err != nil {
		img.Close()
		return nil, err
	}
	return &Export{Image: img, Log: l, Server: srv}, nil
}

// Serve serves NBD clients on ln until ctx ends.
func (e *Export) Serve(ctx context.Context, ln net.Listener) error {
	return e.Server.Serve(ctx, ln)
}

// Close stops the log and closes the image; call it after Serve returned.
func (e *Export) Close() error {
	return errors.Join(e.Log.Close(), e.Image.Close())
}

// Promote prepares a replica to become the primary's disk at failover: it
// drops every epoch that was staged but not committed (the disk must match
// the memory checkpoint being resumed) and returns log options that
// continue the replayed numbering. Close the replayer afterwards and open
// the image with OpenExport.
func Promote(ctx context.Context, r *replay.Replayer) (eventlog.Options, error) {
	if err := r.Discard(ctx); err != nil {
		return eventlog.Options{}, fmt.Errorf("promote replica: %w", err)
	}
	epoch, seq := r.Applied()
	return eventlog.Options{Epoch: epoch + 1, LastSeq: seq}, nil
}
