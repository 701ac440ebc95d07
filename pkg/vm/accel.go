package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// The probe boot sector writes "K\n" to COM1 and halts. A KVM that can run
// it has taken a guest through SeaBIOS into the boot loader, which is what a
// real guest needs; /dev/kvm merely existing proves nothing (on some nested
// or paravirtual hosts the device opens but guests never get past the BIOS).
var probeBootSector = func() []byte {
	code := []byte{
		0xba, 0xf8, 0x03, // mov dx, 0x3f8
		0xb0, 'K', 0xee, // mov al, 'K'; out dx, al
		0xb0, '\n', 0xee, // mov al, '\n'; out dx, al
		0xfa, 0xf4, // cli; hlt
		0xeb, 0xfe, // jmp $
	}
	b := make([]byte, 512)
	copy(b, code)
	b[510], b[511] = 0x55, 0xaa
	return b
}()

// probeTimeout bounds how long a KVM probe may take; SeaBIOS reaches the boot
// sector in well under a second on a working KVM host.
const probeTimeout = 4 * time.Second

var probeCache sync.Map // qemu binary -> probeResult

type probeResult struct {
	ok     bool
	detail string
}

// ProbeKVM reports whether qemu can run a guest under KVM on this host, and
// why not when it cannot. Results are cached per process and, keyed by the
// boot id and the QEMU binary, in a file under os.TempDir(), because a
// failing probe costs seconds.
func ProbeKVM(ctx context.Context, qemu string) (bool, string) {
	if r, ok := probeCache.Load(qemu); ok {
		return r.(probeResult).ok, r.(probeResult).detail
	}
	r := probeKVMCached(ctx, qemu)
	probeCache.Store(qemu, r)
	return r.ok, r.detail
}

func probeKVMCached(ctx context.Context, qemu string) probeResult {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return probeResult{false, fmt.Sprintf("/dev/kvm unusable: %v", err)}
	}
	f.Close()
	bin, err := exec.LookPath(qemu)
	if err != nil {
		return probeResult{false, fmt.Sprintf("%s not found: %v", qemu, err)}
	}
	cacheFile := ""
	if boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		if fi, err := os.Stat(bin); err == nil {
			h := sha256.Sum256(fmt.Appendf(nil, "%s|%s|%d|%d", strings.TrimSpace(string(boot)), bin, fi.Size(), fi.ModTime().UnixNano()))
			cacheFile = filepath.Join(os.TempDir(), "ftctl-kvm-probe-"+hex.EncodeToString(h[:8]))
			if b, err := os.ReadFile(cacheFile); err == nil {
				ok, detail, _ := strings.Cut(string(b), "\n")
				return probeResult{ok == "ok", detail}
			}
		}
	}
	r := runKVMProbe(ctx, bin)
	if cacheFile != "" && ctx.Err() == nil {
		word := "no"
		if r.ok {
			word = "ok"
		}
		tmp := cacheFile + fmt.Sprintf(".%d", os.Getpid())
		if os.WriteFile(tmp, []byte(word+"\n"+r.detail), 0o644) == nil {
			os.Rename(tmp, cacheFile)
		}
	}
	return r
}

func runKVMProbe(ctx context.Context, bin string) probeResult {
	dir, err := os.MkdirTemp("", "ftctl-kvm-probe-")
	if err != nil {
		return probeResult{false, err.Error()}
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "boot.img")
	out := filepath.Join(dir, "serial")
	if err := os.WriteFile(img, probeBootSector, 0o644); err != nil {
		return probeResult{false, err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-accel", "kvm", "-nodefaults", "-no-user-config",
		"-vga", "none", "-display", "none", "-m", "16",
		"-drive", "file="+quote(img)+",format=raw,if=floppy",
		"-serial", "file:"+out)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return probeResult{false, err.Error()}
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return probeResult{false, "qemu -accel kvm exited: " + strings.TrimSpace(stderr.String())}
		case <-ctx.Done():
			<-done
			return probeResult{false, fmt.Sprintf("a KVM guest did not reach its boot sector within %v", probeTimeout)}
		case <-tick.C:
			if b, _ := os.ReadFile(out); bytes.Contains(b, []byte("K\n")) {
				cmd.Process.Kill()
				<-done
				return probeResult{true, "KVM ran a probe guest"}
			}
		}
	}
}

// ResolveAccel turns "auto" into kvm or tcg using ProbeKVM; explicit values
// pass through, with kvm refused early when the probe says it cannot work.
func ResolveAccel(ctx context.Context, accel, qemu string) (string, error) {
	switch accel {
	case "", AccelAuto:
		if ok, _ := ProbeKVM(ctx, qemu); ok {
			return AccelKVM, nil
		}
		return AccelTCG, nil
	case AccelTCG:
		return AccelTCG, nil
	case AccelKVM:
		if ok, why := ProbeKVM(ctx, qemu); !ok {
			return "", fmt.Errorf("%w: accel: kvm requested but %s (use accel tcg or auto)", ErrInvalidSpec, why)
		}
		return AccelKVM, nil
	}
	return "", invalid("accel", "unknown accelerator %q (want auto, kvm or tcg)", accel)
}
