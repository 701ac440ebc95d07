// Package testenv gives ftctl's tests what they need from the machine: QEMU,
// root, and the built-in guest image. A test that cannot have one of these
// skips and says why; CI installs everything (hack/deps.sh), so there the
// skips never happen.
package testenv

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/guestimage"
)

// RequireQEMU skips the test when qemu-system-x86_64 is not installed.
func RequireQEMU(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("needs qemu-system-x86_64 (install with hack/deps.sh):", err)
	}
}

// RequireRoot skips the test when not running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
}

var (
	guestOnce sync.Once
	guestImg  guestimage.Image
	guestErr  error
)

// Guest returns the built-in guest image, building it on first use. It
// fails (not skips) when the build fails with the inputs present, because
// then the image builder itself is broken.
func Guest(t testing.TB) guestimage.Image {
	t.Helper()
	RequireQEMU(t)
	guestOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		guestImg, guestErr = guestimage.Default(ctx)
	})
	if guestErr != nil {
		if _, err := os.Stat("/boot"); err != nil || noKernel() {
			t.Skip("needs linux-image-cloud-amd64 (install with hack/deps.sh):", guestErr)
		}
		t.Fatalf("building the built-in guest: %v", guestErr)
	}
	return guestImg
}

func noKernel() bool {
	m, _ := filepath.Glob("/boot/vmlinuz-*-cloud-amd64")
	return len(m) == 0
}

// Deadline returns a context bounded by the test's deadline minus a margin,
// or by d when the test has no deadline.
func Deadline(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	if tt, ok := t.(*testing.T); ok {
		if dl, ok := tt.Deadline(); ok && time.Until(dl) < d {
			cancel()
			ctx, cancel = context.WithDeadline(context.Background(), dl.Add(-5*time.Second))
		}
	}
	t.Cleanup(cancel)
	return ctx
}
