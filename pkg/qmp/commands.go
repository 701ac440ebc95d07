package qmp

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Status is the reply of query-status.
type Status struct {
	// Running is true while the guest CPUs run.
	Running bool
	// Status is QEMU's run state, e.g. "running", "paused", "prelaunch",
	// "inmigrate", "postmigrate".
	Status string
}

// Stop pauses the guest. QEMU drains in-flight block I/O before replying.
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes the guest.
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// QueryStatus returns the guest's run state.
func (c *Client) QueryStatus(ctx context.Context) (Status, error) {
	var r struct {
		Running *bool   `json:"running"`
		Status  *string `json:"status"`
	}
	if err := c.Execute(ctx, "query-status", nil, &r); err != nil {
		return Status{}, err
	}
	if r.Running == nil || r.Status == nil {
		return Status{}, fmt.Errorf("%w: query-status: reply lacks running or status", ErrProtocol)
	}
	return Status{Running: *r.Running, Status: *r.Status}, nil
}

// SetMigrationCapabilities sets migration capabilities, e.g.
// {"x-ignore-shared": true, "events": true}.
func (c *Client) SetMigrationCapabilities(ctx context.Context, caps map[string]bool) error {
	if len(caps) == 0 {
		return errors.New("qmp: migrate-set-capabilities: no capabilities given")
	}
	type capState struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	list := make([]capState, 0, len(caps))
	for name, on := range caps {
		if name == "" {
			return errors.New("qmp: migrate-set-capabilities: empty capability name")
		}
		list = append(list, capState{name, on})
	}
	// A stable order keeps requests reproducible in logs and tests.
	slices.SortFunc(list, func(a, b capState) int { return cmp.Compare(a.Capability, b.Capability) })
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// SetMigrationParameters sets migration parameters, e.g.
// {"max-bandwidth": int64(1<<40), "downtime-limit": 1}.
func (c *Client) SetMigrationParameters(ctx context.Context, params map[string]any) error {
	if len(params) == 0 {
		return errors.New("qmp: migrate-set-parameters: no parameters given")
	}
	return c.Execute(ctx, "migrate-set-parameters", params, nil)
}

// Migrate starts an outgoing migration to uri (e.g. "unix:/path",
// "fd:name", "tcp:host:port") and returns once QEMU has accepted it; use
// WaitMigration to wait for the outcome.
func (c *Client) Migrate(ctx context.Context, uri string) error {
	if uri == "" {
		return errors.New("qmp: migrate: empty uri")
	}
	return c.Execute(ctx, "migrate", map[string]string{"uri": uri}, nil)
}

// MigrateIncoming starts an incoming migration from uri on a QEMU started
// with -incoming defer.
func (c *Client) MigrateIncoming(ctx context.Context, uri string) error {
	if uri == "" {
		return errors.New("qmp: migrate-incoming: empty uri")
	}
	return c.Execute(ctx, "migrate-incoming", map[string]string{"uri": uri}, nil)
}

// MigrateCancel cancels the current outgoing migration.
func (c *Client) MigrateCancel(ctx context.Context) error {
	return c.Execute(ctx, "migrate_cancel", nil, nil)
}

// MigrationInfo is the reply of query-migrate.
type MigrationInfo struct {
	// Status is "" before any migration, then e.g. "setup", "active",
	// "device", "completed", "failed", "cancelled".
	Status string
	// TotalTime is the time the migration took so far (or in total).
	TotalTime time.Duration
	// Downtime is the time the guest was stopped (completed migrations).
	Downtime time.Duration
	// SetupTime is the time spent in setup.
	SetupTime time.Duration
	// ExpectedDowntime is QEMU's estimate while the migration is active.
	ExpectedDowntime time.Duration
	// TransferredBytes is ram.transferred: bytes sent for RAM so far.
	TransferredBytes int64
	// RemainingBytes is ram.remaining.
	RemainingBytes int64
	// TotalBytes is ram.total, the guest RAM size seen by migration.
	TotalBytes int64
	// DirtySyncCount is ram.dirty-sync-count, the number of dirty bitmap
	// syncs (one per precopy round).
	DirtySyncCount int64
	// MBps is ram.mbps, the throughput in megabits per second.
	MBps float64
	// ErrorDesc is QEMU's reason for a failed migration.
	ErrorDesc string
	// Raw is the whole reply, for fields not lifted out above.
	Raw json.RawMessage
}

// Terminal says whether the status is final: completed, failed or
// cancelled.
func (m MigrationInfo) Terminal() bool {
	switch m.Status {
	case "completed", "failed", "cancelled":
		return true
	}
	return false
}

// QueryMigrate returns the state of the current or last migration.
func (c *Client) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var raw json.RawMessage
	if err := c.Execute(ctx, "query-migrate", nil, &raw); err != nil {
		return MigrationInfo{}, err
	}
	var r struct {
		Status           string  `json:"status"`
		TotalTime        int64   `json:"total-time"`
		Downtime         int64   `json:"downtime"`
		SetupTime        int64   `json:"setup-time"`
		ExpectedDowntime int64   `json:"expected-downtime"`
		ErrorDesc        string  `json:"error-desc"`
		RAM              *ramRaw `json:"ram"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return MigrationInfo{}, fmt.Errorf("%w: query-migrate: unexpected reply %s: %v", ErrProtocol, snippet(raw), err)
	}
	ms := func(n int64) time.Duration { return time.Duration(n) * time.Millisecond }
	info := MigrationInfo{
		Status:           r.Status,
		TotalTime:        ms(r.TotalTime),
		Downtime:         ms(r.Downtime),
		SetupTime:        ms(r.SetupTime),
		ExpectedDowntime: ms(r.ExpectedDowntime),
		ErrorDesc:        r.ErrorDesc,
		Raw:              raw,
	}
	if r.RAM != nil {
		info.TransferredBytes = r.RAM.Transferred
		info.RemainingBytes = r.RAM.Remaining
		info.TotalBytes = r.RAM.Total
		info.DirtySyncCount = r.RAM.DirtySyncCount
		info.MBps = r.RAM.MBps
	}
	return info, nil
}

type ramRaw struct {
	Transferred    int64   `json:"transferred"`
	Remaining      int64   `json:"remaining"`
	Total          int64   `json:"total"`
	DirtySyncCount int64   `json:"dirty-sync-count"`
	MBps           float64 `json:"mbps"`
}

// Poll intervals of WaitMigration: short at first because device-state-only
// migrations finish in a few milliseconds, longer later to spare QEMU.
const (
	migratePollMin = 2 * time.Millisecond
	migratePollMax = 20 * time.Millisecond
)

// WaitMigration blocks until the current migration reaches a final status.
// It returns the final info, with an error wrapping ErrMigrationFailed and
// QEMU's error-desc when the status is failed or cancelled. It notices the
// end from a MIGRATION event (sent when the "events" capability is on) or
// from polling query-migrate, whichever comes first; it subscribes before
// the first poll so an early event cannot slip between the two. Before any
// migration has started the status is "" and WaitMigration keeps waiting
// until ctx ends. Call it only after Migrate (or MigrateIncoming) returned
// nil: QEMU resets the status to "setup" inside a successful migrate, but
// after a refused one query-migrate still shows the previous migration's
// final status.
func (c *Client) WaitMigration(ctx context.Context) (MigrationInfo, error) {
	events, cancel := c.Subscribe("MIGRATION")
	defer cancel()

	interval := c.opts.pollMin
	timer := time.NewTimer(interval)
	defer timer.Stop()
	for {
		info, err := c.QueryMigrate(ctx)
		if err != nil {
			return info, err
		}
		switch info.Status {
		case "completed":
			return info, nil
		case "failed", "cancelled":
			desc := info.ErrorDesc
			if desc == "" {
				desc = "no error-desc given"
			}
			return info, fmt.Errorf("%w: status %s: %s", ErrMigrationFailed, info.Status, desc)
		}
	wait:
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					return info, fmt.Errorf("qmp: waiting for migration: %w", c.Err())
				}
				var d struct {
					Status string `json:"status"`
				}
				// Only a final status is worth a query; a malformed event
				// is left to the poll.
				if json.Unmarshal(ev.Data, &d) == nil && (MigrationInfo{Status: d.Status}).Terminal() {
					break wait
				}
			case <-timer.C:
				interval = min(interval*2, c.opts.pollMax)
				timer.Reset(interval)
				break wait
			case <-ctx.Done():
				return info, fmt.Errorf("qmp: waiting for migration (last status %q): %w", info.Status, context.Cause(ctx))
			}
		}
	}
}

// AnnounceParams configures announce-self: QEMU sends RARP/GARP frames from
// the guest's MACs Rounds times, starting after Initial and spacing rounds
// by Step more each time, up to Max.
type AnnounceParams struct {
	Initial, Max, Step time.Duration
	Rounds             int
	// Interfaces limits the announcement to these NIC ids (all if empty).
	Interfaces []string
	// ID names this announce timer, so a later call can replace it.
	ID string
}

// DefaultAnnounceParams are QEMU's own announce defaults (50 ms initial,
// 550 ms max, 5 rounds, 100 ms step).
var DefaultAnnounceParams = AnnounceParams{
	Initial: 50 * time.Millisecond,
	Max:     550 * time.Millisecond,
	Step:    100 * time.Millisecond,
	Rounds:  5,
}

// AnnounceSelf makes QEMU announce the guest's MAC addresses on the network
// with DefaultAnnounceParams, so switches learn its new location after a
// failover.
func (c *Client) AnnounceSelf(ctx context.Context) error {
	return c.AnnounceSelfWith(ctx, DefaultAnnounceParams)
}

// AnnounceSelfWith is AnnounceSelf with explicit parameters.
func (c *Client) AnnounceSelfWith(ctx context.Context, p AnnounceParams) error {
	if p.Rounds < 1 || p.Initial < 0 || p.Max < 0 || p.Step < 0 {
		return fmt.Errorf("qmp: announce-self: invalid parameters %+v (need rounds >= 1, no negative times)", p)
	}
	args := map[string]any{
		"initial": p.Initial.Milliseconds(),
		"max":     p.Max.Milliseconds(),
		"step":    p.Step.Milliseconds(),
		"rounds":  p.Rounds,
	}
	if len(p.Interfaces) > 0 {
		args["interfaces"] = p.Interfaces
	}
	if p.ID != "" {
		args["id"] = p.ID
	}
	return c.Execute(ctx, "announce-self", args, nil)
}

// Quit asks QEMU to exit. It succeeds when QEMU replies or when the
// connection drops as QEMU exits before replying; wait on Done to know the
// connection has ended.
func (c *Client) Quit(ctx context.Context) error {
	if err := c.Err(); err != nil {
		return fmt.Errorf("qmp: quit: %w", err)
	}
	err := c.Execute(ctx, "quit", nil, nil)
	if err != nil && errors.Is(err, ErrClosed) && !errors.Is(err, ErrProtocol) {
		return nil
	}
	return err
}

// GetFD passes fd to QEMU under name, for use as e.g. migrate "fd:name".
// The caller keeps its own fd and should close it when done.
func (c *Client) GetFD(ctx context.Context, name string, fd int) error {
	if name == "" {
		return errors.New("qmp: getfd: empty fd name")
	}
	return c.ExecuteFD(ctx, "getfd", map[string]string{"fdname": name}, fd, nil)
}

// CloseFD closes the fd QEMU holds under name.
func (c *Client) CloseFD(ctx context.Context, name string) error {
	if name == "" {
		return errors.New("qmp: closefd: empty fd name")
	}
	return c.Execute(ctx, "closefd", map[string]string{"fdname": name}, nil)
}

// FDInfo identifies an fd QEMU holds in an fd set.
type FDInfo struct {
	// FDSet is the fd set's id; FD is QEMU's fd number in its own process.
	FDSet, FD int
}

// AddFD passes fd to QEMU into fd set fdset (a negative fdset lets QEMU
// pick a new set), tagged with opaque (omitted if empty). Devices then
// open "/dev/fdset/N".
func (c *Client) AddFD(ctx context.Context, fdset int, fd int, opaque string) (FDInfo, error) {
	args := map[string]any{}
	if fdset >= 0 {
		args["fdset-id"] = fdset
	}
	if opaque != "" {
		args["opaque"] = opaque
	}
	var r struct {
		FDSet *int `json:"fdset-id"`
		FD    *int `json:"fd"`
	}
	if err := c.ExecuteFD(ctx, "add-fd", args, fd, &r); err != nil {
		return FDInfo{}, err
	}
	if r.FDSet == nil || r.FD == nil {
		return FDInfo{}, fmt.Errorf("%w: add-fd: reply lacks fdset-id or fd", ErrProtocol)
	}
	return FDInfo{FDSet: *r.FDSet, FD: *r.FD}, nil
}

// RemoveFD removes fd from fd set fdset, or the whole set if fd < 0.
func (c *Client) RemoveFD(ctx context.Context, fdset int, fd int) error {
	if fdset < 0 {
		return fmt.Errorf("qmp: remove-fd: invalid fd set %d", fdset)
	}
	args := map[string]any{"fdset-id": fdset}
	if fd >= 0 {
		args["fd"] = fd
	}
	return c.Execute(ctx, "remove-fd", args, nil)
}

// FDSet is one entry of query-fdsets.
type FDSet struct {
	ID  int
	FDs []FDSetEntry
}

// FDSetEntry is one fd in an FDSet.
type FDSetEntry struct {
	FD     int
	Opaque string
}

// QueryFDSets lists the fd sets QEMU holds.
func (c *Client) QueryFDSets(ctx context.Context) ([]FDSet, error) {
	var r []struct {
		ID  int `json:"fdset-id"`
		FDs []struct {
			FD     int    `json:"fd"`
			Opaque string `json:"opaque"`
		} `json:"fds"`
	}
	if err := c.Execute(ctx, "query-fdsets", nil, &r); err != nil {
		return nil, err
	}
	sets := make([]FDSet, 0, len(r))
	for _, s := range r {
		set := FDSet{ID: s.ID}
		for _, f := range s.FDs {
			set.FDs = append(set.FDs, FDSetEntry{FD: f.FD, Opaque: f.Opaque})
		}
		sets = append(sets, set)
	}
	return sets, nil
}

// HumanMonitorCommand runs an HMP command line (e.g. "info mtree") and
// returns its text output.
func (c *Client) HumanMonitorCommand(ctx context.Context, line string) (string, error) {
	if line == "" {
		return "", errors.New("qmp: human-monitor-command: empty command line")
	}
	var out string
	err := c.Execute(ctx, "human-monitor-command", map[string]string{"command-line": line}, &out)
	return out, err
}
