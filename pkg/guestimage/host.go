package guestimage

import (
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
)

const installKernel = "install linux-image-cloud-amd64 (hack/deps.sh)"

// findKernel picks the kernel version: want if given (both files must
// exist), else the newest *-cloud-amd64 with a vmlinuz and a module tree.
func findKernel(boot, modRoot, want string) (string, error) {
	usable := func(v string) error {
		for _, p := range []string{filepath.Join(boot, "vmlinuz-"+v), filepath.Join(modRoot, v, "modules.dep")} {
			if _, err := os.Stat(p); err != nil {
				return err
			}
		}
		return nil
	}
	if want != "" {
		if strings.ContainsAny(want, "/\x00") {
			return "", fmt.Errorf("%w: KernelVersion %q is not a version", ErrBadOptions, want)
		}
		if err := usable(want); err != nil {
			return "", fmt.Errorf("%w: kernel %s: %w; %s", ErrNoKernel, want, err, installKernel)
		}
		return want, nil
	}
	matches, err := filepath.Glob(filepath.Join(boot, "vmlinuz-*-cloud-amd64"))
	if err != nil {
		return "", err
	}
	best := ""
	for _, m := range matches {
		v := strings.TrimPrefix(filepath.Base(m), "vmlinuz-")
		if usable(v) != nil {
			continue
		}
		if best == "" || compareVersions(v, best) > 0 {
			best = v
		}
	}
	if best == "" {
		return "", fmt.Errorf("%w: no %s/vmlinuz-*-cloud-amd64 with a matching %s/VERSION/modules.dep; %s",
			ErrNoKernel, boot, modRoot, installKernel)
	}
	return best, nil
}

// compareVersions orders kernel versions: runs of digits compare as
// numbers ("6.1.0-56" > "6.1.0-9"), everything else byte by byte.
func compareVersions(a, b string) int {
	for a != "" && b != "" {
		ra, restA := versionRun(a)
		rb, restB := versionRun(b)
		if c := compareRun(ra, rb); c != 0 {
			return c
		}
		a, b = restA, restB
	}
	return len(a) - len(b)
}

func versionRun(s string) (run, rest string) {
	digit := s[0] >= '0' && s[0] <= '9'
	i := 1
	for i < len(s) && (s[i] >= '0' && s[i] <= '9') == digit {
		i++
	}
	return s[:i], s[i:]
}

func compareRun(a, b string) int {
	na, errA := strconv.ParseUint(a, 10, 64)
	nb, errB := strconv.ParseUint(b, 10, 64)
	switch {
	case errA == nil && errB == nil:
		if na != nb {
			if na < nb {
				return -1
			}
			return 1
		}
		return 0
	case errA == nil: // digits sort after letters
		return 1
	case errB == nil:
		return -1
	}
	return strings.Compare(a, b)
}

// readStaticBusybox reads busybox and checks that it needs no dynamic
// loader, which the initramfs does not have.
func readStaticBusybox(p string) ([]byte, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("%w: busybox: %w; install busybox-static (hack/deps.sh)", ErrBadInput, err)
	}
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not an ELF binary: %w", ErrBadInput, p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("%w: %s is dynamically linked; install busybox-static (hack/deps.sh)", ErrBadInput, p)
		}
	}
	if f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("%w: %s is for %v, the guest is x86-64", ErrBadInput, p, f.Machine)
	}
	return b, nil
}

// buildFtguest builds cmd/ftguest as a static x86-64 binary at out. The
// output path stays the same between builds, so go build finds it up to
// date and skips the link when nothing changed.
func buildFtguest(ctx context.Context, root, out string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, serr := os.Stat(goBin); serr != nil {
			return fmt.Errorf("%w: need the go command to build cmd/ftguest: %w", ErrBuild, err)
		}
	}
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w",
		"-o", out, "./cmd/ftguest")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS="+guestGoflags(os.Getenv("GOFLAGS")))
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%w: go build ./cmd/ftguest in %s: %w\n%s", ErrBuild, root, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// guestGoflags drops flags from GOFLAGS that cannot build a static guest
// binary (the race detector needs cgo).
func guestGoflags(goflags string) string {
	var keep []string
	for _, f := range strings.Fields(goflags) {
		if f == "-race" || f == "-msan" || f == "-asan" {
			continue
		}
		keep = append(keep, f)
	}
	return strings.Join(keep, " ")
}
