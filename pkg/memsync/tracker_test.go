package memsync_test

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/ftctl/ftctl/pkg/memsync"
	"github.com/ftctl/ftctl/pkg/memsync/memsynctest"
)

func TestMain(m *testing.M) {
	memsynctest.RunWriterIfChild()
	crashChild()
	os.Exit(m.Run())
}

func TestShadowConformance(t *testing.T) {
	memsynctest.TestTracker(t, func(ctx context.Context, t *testing.T, tg memsynctest.Target) (memsync.Tracker, error) {
		return memsync.NewShadow(tg.Region, 0), nil
	}, memsynctest.Options{ContentExact: true})
}

func TestShadowConformanceOneWorker(t *testing.T) {
	memsynctest.TestTracker(t, func(ctx context.Context, t *testing.T, tg memsynctest.Target) (memsync.Tracker, error) {
		return memsync.NewShadow(tg.Region, 1), nil
	}, memsynctest.Options{ContentExact: true, Pages: 300, Rounds: 2})
}

// TestSoftDirtyConformance runs for real only on kernels with soft-dirty;
// hack/guest-test.sh runs it inside Debian's cloud kernel under TCG.
func TestSoftDirtyConformance(t *testing.T) {
	memsynctest.TestTracker(t, func(ctx context.Context, t *testing.T, tg memsynctest.Target) (memsync.Tracker, error) {
		if err := memsync.ProbeSoftDirty(); err != nil {
			t.Skipf("soft-dirty unsupported on this kernel: %v", err)
		}
		return memsync.New(ctx, memsync.Config{Kind: memsync.KindSoftDirty, PID: tg.PID, Region: tg.Region})
	}, memsynctest.Options{WriteExact: true})
}

func TestNewChoosesByProbe(t *testing.T) {
	path := t.TempDir() + "/ram"
	if err := os.WriteFile(path, make([]byte, 16*memsync.PageSize), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := memsync.OpenRegion(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	probe := memsync.ProbeSoftDirty()
	t.Logf("soft-dirty probe: %v", probe)

	// Our own process does not map the file shared, so with soft-dirty
	// support this must fail with ErrNotFound, and without it fall back.
	tr, err := memsync.New(ctx, memsync.Config{PID: os.Getpid(), Region: r})
	if probe == nil {
		if !errors.Is(err, memsync.ErrNotFound) {
			t.Errorf("auto with soft-dirty, pid without mapping: got %v, want ErrNotFound", err)
		}
	} else {
		if err != nil {
			t.Fatalf("auto without soft-dirty: %v", err)
		}
		if tr.Kind() != memsync.KindShadow {
			t.Errorf("auto without soft-dirty chose %s", tr.Kind())
		}
		tr.Close()
		_, err = memsync.New(ctx, memsync.Config{Kind: memsync.KindSoftDirty, PID: os.Getpid(), Region: r})
		if !errors.Is(err, memsync.ErrUnsupported) {
			t.Errorf("forced soft-dirty on unsupported kernel: got %v, want ErrUnsupported", err)
		}
	}
	tr, err = memsync.New(ctx, memsync.Config{Kind: memsync.KindShadow, Region: r})
	if err != nil || tr.Kind() != memsync.KindShadow {
		t.Errorf("forced shadow: %v, %v", tr, err)
	}
	if _, err := memsync.New(ctx, memsync.Config{Kind: "bogus", Region: r}); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("bogus kind: got %v", err)
	}
	if _, err := memsync.New(ctx, memsync.Config{}); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("no region: got %v", err)
	}
	if _, err := memsync.ParseKind("x"); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("ParseKind(x): got %v", err)
	}
}

func TestOpenRegionRejectsBadSizes(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int{0, 100, memsync.PageSize + 1} {
		path := dir + "/f"
		if err := os.WriteFile(path, make([]byte, size), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := memsync.OpenRegion(path, false); !errors.Is(err, memsync.ErrBadInput) {
			t.Errorf("size %d: got %v, want ErrBadInput", size, err)
		}
	}
	if _, err := memsync.OpenRegion(dir+"/missing", false); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("missing file: got %v", err)
	}
}

// TestSoftDirtyFindsMapping checks the /proc/PID/maps discovery against a
// real process on any kernel: it needs no soft-dirty support.
func TestSoftDirtyFindsMapping(t *testing.T) {
	path := t.TempDir() + "/ram"
	if err := os.WriteFile(path, make([]byte, 64*memsync.PageSize), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := memsync.OpenRegion(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	w := memsynctest.StartWriter(ctx, t, path)
	tr, err := memsync.NewSoftDirty(ctx, w.PID(), r)
	if err != nil {
		t.Fatalf("NewSoftDirty on the writer: %v", err)
	}
	defer tr.Close()
	if err := tr.Begin(ctx); err != nil {
		t.Fatalf("Begin: %v", err)
	}
	w.Do(t, 'f', []int{1, 2})
	d, err := tr.Dirty(ctx)
	if err != nil {
		t.Fatalf("Dirty: %v", err)
	}
	if d.Len() != 64 {
		t.Errorf("Dirty Len %d, want 64", d.Len())
	}
	if memsync.ProbeSoftDirty() == nil && (!d.Test(1) || !d.Test(2)) {
		t.Errorf("soft-dirty kernel, but written pages not reported: %v", d.Pages())
	}
	// This process maps the file only read-only, which cannot dirty it, so
	// it must be refused like a process without any mapping.
	if _, err := memsync.NewSoftDirty(ctx, os.Getpid(), r); !errors.Is(err, memsync.ErrNotFound) {
		t.Errorf("pid without the mapping: got %v, want ErrNotFound", err)
	}
	if _, err := memsync.NewSoftDirty(ctx, 0, r); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("pid 0: got %v, want ErrBadInput", err)
	}
}
