package guesttest_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/guestimage"
)

// inGuestRun selects what runs inside the guest: everything that needs
// soft-dirty, plus the probe and the mapping discovery, plus the scan
// benchmark. The conformance suite and the pre-copy test both skip on a
// kernel without soft-dirty, which is why the checks below demand PASS.
const inGuestRun = `^(TestSoftDirtyConformance|TestSoftDirtyFindsMapping|TestNewChoosesByProbe|TestPreCopyAndCheckpointsSoftDirty|TestShadowConformance)$`

// mustPass are the tests whose "--- PASS" line must appear: a SKIP (for
// example because the probe failed inside the guest) fails this test.
var mustPass = []string{
	"TestSoftDirtyConformance",
	"TestSoftDirtyConformance/RandomWrites",
	"TestSoftDirtyConformance/SameValueWrites",
	"TestSoftDirtyFindsMapping",
	"TestNewChoosesByProbe",
	"TestPreCopyAndCheckpointsSoftDirty",
	"TestShadowConformance",
}

func TestMemsyncInGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a test binary and boots a guest under TCG; skipped with -short")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("needs qemu-system-x86_64 (hack/deps.sh):", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "memsync.test")
	goCmd := filepath.Join(runtime.GOROOT(), "bin", "go")
	build := exec.CommandContext(ctx, goCmd, "test", "-c", "-o", bin, "./pkg/memsync")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build memsync test binary: %v\n%s", err, out)
	}
	init := fmt.Sprintf("/bin/memsync.test -test.v -test.count=1 -test.timeout=8m -test.run '%s' -test.bench '^BenchmarkSoftDirtyScan$' -test.benchtime=5x", inGuestRun)
	img, err := guestimage.Build(ctx, guestimage.Options{
		Extra: []guestimage.File{{HostPath: bin, GuestPath: "/bin/memsync.test", Mode: 0o755}},
		Init:  init,
	})
	if errors.Is(err, guestimage.ErrNoKernel) {
		t.Skip("needs linux-image-cloud-amd64 (hack/deps.sh):", err)
	}
	if err != nil {
		t.Fatal(err)
	}

	log := filepath.Join(dir, "serial.log")
	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg", "-machine", "pc", "-nodefaults", "-vga", "none", "-display", "none",
		"-m", "512", "-no-reboot",
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", img.Cmdline,
		"-chardev", "file,id=s0,path="+log, "-serial", "chardev:s0")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	err = cmd.Run()
	b, _ := os.ReadFile(log)
	console := strings.ReplaceAll(string(b), "\r", "")
	t.Logf("guest ran %v; console:\n%s", time.Since(start).Round(time.Millisecond), console)
	if err != nil {
		t.Fatalf("QEMU: %v: %s", err, stderr.String())
	}
	if m := regexp.MustCompile(`(?m)^ftguest-exit=(\d+)$`).FindStringSubmatch(console); m == nil || m[1] != "0" {
		t.Fatalf("memsync tests inside the guest did not exit 0 (exit line %v)", m)
	}
	for _, name := range mustPass {
		if !regexp.MustCompile(`(?m)^\s*--- PASS: ` + regexp.QuoteMeta(name) + ` `).MatchString(console) {
			t.Errorf("%s did not PASS inside the guest (skipped or missing)", name)
		}
	}
	if !regexp.MustCompile(`(?m)^BenchmarkSoftDirtyScan\S*\s+\d+.*softdirty-ms/GiB`).MatchString(console) {
		t.Errorf("BenchmarkSoftDirtyScan did not report inside the guest")
	}
}

func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("no go.mod above %s", wd)
		}
	}
}
