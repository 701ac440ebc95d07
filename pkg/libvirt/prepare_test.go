package libvirt_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
)

// fakeDomains holds one domain's definition and state.
type fakeDomains struct {
	xml     string
	state   libvirt.State
	defined []string
	defErr  error
}

func (f *fakeDomains) XML(_ context.Context, name string, inactive bool) (string, error) {
	if name != "web" {
		return "", libvirt.ErrNoDomain
	}
	return f.xml, nil
}

func (f *fakeDomains) State(_ context.Context, name string) (libvirt.State, error) {
	if name != "web" {
		return libvirt.State{}, libvirt.ErrNoDomain
	}
	return f.state, nil
}

func (f *fakeDomains) Define(_ context.Context, xml string) error {
	if f.defErr != nil {
		return f.defErr
	}
	f.defined = append(f.defined, xml)
	f.xml = xml
	return nil
}

func plainDomain(t *testing.T) string {
	b, err := os.ReadFile("domxml/testdata/plain.xml")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestPrepareDomain(t *testing.T) {
	ctx := context.Background()
	old := plainDomain(t)
	f := &fakeDomains{xml: old, state: libvirt.State{Code: libvirt.StateShutoff}}
	dir := t.TempDir()
	req := libvirt.PrepareRequest{Domain: "web", Options: domxml.Options{SocketDir: "/s", Peer: "b:7480"}, BackupDir: dir, DryRun: true}

	res, err := libvirt.PrepareDomain(ctx, f, req)
	if err != nil {
		t.Fatal(err)
	}
	if res.Diff == "" || res.Defined || res.Backup != "" || len(f.defined) != 0 {
		t.Fatalf("dry run: %+v, defined %d", res, len(f.defined))
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("dry run wrote %d backup files", len(ents))
	}

	req.DryRun = false
	res, err = libvirt.PrepareDomain(ctx, f, req)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Defined || len(f.defined) != 1 || f.defined[0] != res.NewXML || !strings.Contains(res.NewXML, "peer='b:7480'") {
		t.Fatalf("not defined as prepared: %+v", res)
	}
	if filepath.Dir(res.Backup) != dir {
		t.Errorf("backup %s not in %s", res.Backup, dir)
	}
	if b, err := os.ReadFile(res.Backup); err != nil || string(b) != old {
		t.Errorf("backup does not hold the old definition (%v)", err)
	}

	// Again: already prepared, nothing defined, no second backup.
	res, err = libvirt.PrepareDomain(ctx, f, req)
	if err != nil || res.Diff != "" || res.Defined || res.Backup != "" || len(f.defined) != 1 {
		t.Fatalf("second prepare: %+v %v", res, err)
	}
}

func TestPrepareDomainRunning(t *testing.T) {
	ctx := context.Background()
	f := &fakeDomains{xml: plainDomain(t), state: libvirt.State{Code: libvirt.StateRunning, Reason: 1}}
	dir := t.TempDir()
	req := libvirt.PrepareRequest{Domain: "web", Options: domxml.Options{SocketDir: "/s"}, BackupDir: dir}
	_, err := libvirt.PrepareDomain(ctx, f, req)
	if !errors.Is(err, libvirt.ErrRunning) || !strings.Contains(err.Error(), "next start") || len(f.defined) != 0 {
		t.Fatalf("running domain: %v, defined %d", err, len(f.defined))
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("refused prepare wrote %d backup files", len(ents))
	}
	// A dry run of a running domain is fine.
	if res, err := libvirt.PrepareDomain(ctx, f, libvirt.PrepareRequest{Domain: "web", Options: req.Options, DryRun: true}); err != nil || res.Diff == "" {
		t.Fatalf("dry run of a running domain: %v", err)
	}
	req.NextStart = true
	res, err := libvirt.PrepareDomain(ctx, f, req)
	if err != nil || !res.Defined || !res.State.Active() {
		t.Fatalf("next-start prepare: %+v %v", res, err)
	}

	// A failing define names the backup.
	f2 := &fakeDomains{xml: plainDomain(t), state: libvirt.State{Code: libvirt.StateShutoff}, defErr: errors.New("boom")}
	res, err = libvirt.PrepareDomain(ctx, f2, libvirt.PrepareRequest{Domain: "web", Options: req.Options, BackupDir: dir})
	if err == nil || !strings.Contains(err.Error(), res.Backup) || res.Backup == "" {
		t.Fatalf("define failure: %v (backup %q)", err, res.Backup)
	}
	if _, err := libvirt.PrepareDomain(ctx, f2, libvirt.PrepareRequest{Domain: "nope"}); !errors.Is(err, libvirt.ErrNoDomain) {
		t.Fatalf("unknown domain: %v", err)
	}
}
