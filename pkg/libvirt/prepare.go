package libvirt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
)

// ErrRunning: the request would change a running domain and the caller
// did not say how to handle that.
var ErrRunning = errors.New("libvirt: domain is running")

// DefaultBackupDir is where PrepareDomain keeps the definitions it
// replaces.
const DefaultBackupDir = "/var/lib/ftctl/libvirt-backup"

// PrepareRequest asks PrepareDomain to make a domain ready for
// protection.
type PrepareRequest struct {
	Domain  string
	Options domxml.Options
	// DryRun computes the change and its diff but neither backs up nor
	// defines anything.
	DryRun bool
	// BackupDir receives the old definition before the new one is
	// defined. Default DefaultBackupDir.
	BackupDir string
	// NextStart allows redefining a running domain. libvirt keeps the
	// running QEMU as it is; the new definition takes effect the next
	// time the domain starts (a guest reboot is not enough: it must be
	// shut down and started).
	NextStart bool
}

// PrepareResult says what PrepareDomain found and did.
type PrepareResult struct {
	// State is the domain's state when it was read.
	State State
	// Findings are domxml.CheckWith's findings on the persistent
	// definition, before the change.
	Findings []domxml.Finding
	// Diff is the unified diff of the change; "" when the domain was
	// already prepared.
	Diff   string
	NewXML string
	// Backup is the file holding the old definition ("" when nothing was
	// written).
	Backup string
	// Defined: libvirt now holds the new definition.
	Defined bool
}

// Active reports whether libvirt has a QEMU process for the domain
// (running, paused, ...): a new definition waits for the next start.
func (s State) Active() bool {
	switch s.Code {
	case StateShutoff, StateNoState:
		return false
	}
	return true
}

// PrepareDomain reads a domain's persistent definition, rewrites it with
// domxml.Prepare, and unless DryRun writes the old definition to a new
// file in BackupDir and defines the new one. A running domain is refused
// with ErrRunning unless NextStart is set.
func PrepareDomain(ctx context.Context, d Domains, req PrepareRequest) (PrepareResult, error) {
	var res PrepareResult
	st, err := d.State(ctx, req.Domain)
	if err != nil {
		return res, err
	}
	res.State = st
	// The persistent definition is what the next start uses; a running
	// domain's live XML carries runtime details (aliases, socket paths)
	// that do not belong in a definition.
	old, err := d.XML(ctx, req.Domain, true)
	if err != nil {
		return res, err
	}
	if res.Findings, err = domxml.CheckWith(old, req.Options); err != nil {
		return res, err
	}
	newXML, diff, err := domxml.Prepare(old, req.Options)
	if err != nil {
		return res, err
	}
	res.NewXML, res.Diff = newXML, diff
	if diff == "" || req.DryRun {
		return res, nil
	}
	if st.Active() && !req.NextStart {
		return res, fmt.Errorf("%w: domain %s is %s; a new definition takes effect only at its next start (allow that explicitly, or shut it down first)",
			ErrRunning, req.Domain, st)
	}
	dir := req.BackupDir
	if dir == "" {
		dir = DefaultBackupDir
	}
	if res.Backup, err = writeBackup(dir, req.Domain, old); err != nil {
		return res, err
	}
	if err := d.Define(ctx, newXML); err != nil {
		return res, fmt.Errorf("define the prepared domain (the old definition is in %s): %w", res.Backup, err)
	}
	res.Defined = true
	return res, nil
}

// writeBackup writes xml to a new file named after the domain and the
// time, never replacing an existing one, and syncs it before returning:
// the define that follows must not be able to lose the only copy.
func writeBackup(dir, name, xml string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("backup directory: %w", err)
	}
	base := name + "-" + time.Now().UTC().Format("20060102T150405Z")
	for i := 0; ; i++ {
		path := filepath.Join(dir, base+".xml")
		if i > 0 {
			path = filepath.Join(dir, fmt.Sprintf("%s-%d.xml", base, i))
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, os.ErrExist) && i < 100 {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("backup of domain %s: %w", name, err)
		}
		_, err = f.WriteString(xml)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
			return "", fmt.Errorf("backup of domain %s: %w", name, err)
		}
		return path, nil
	}
}
