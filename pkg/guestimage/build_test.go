package guestimage

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func requireHostInputs(t *testing.T) {
	t.Helper()
	if _, err := findKernel(bootDir, modulesRoot, ""); err != nil {
		t.Skip("needs linux-image-cloud-amd64 (hack/deps.sh):", err)
	}
	if _, err := readStaticBusybox(busyboxPath); err != nil {
		t.Skip("needs busybox-static (hack/deps.sh):", err)
	}
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

func TestBuildDeterministicAndCached(t *testing.T) {
	requireHostInputs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	opts := Options{OutDir: dir}

	img, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if img.Kernel != filepath.Join(dir, KernelFile) || img.Initrd != filepath.Join(dir, InitrdFile) || img.Cmdline != BaseCmdline || len(img.Hash) != 64 {
		t.Fatalf("image %+v", img)
	}
	first, err := os.ReadFile(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	entries := readCPIO(t, first)
	names := map[string]entry{}
	for _, e := range entries {
		names[e.name] = e
	}
	for _, want := range []string{"init", "bin/busybox", "bin/ftguest", "dev/console", "lib/modules/virtio_ring.ko", "lib/modules/virtio_net.ko", "lib/modules/virtio_blk.ko"} {
		if _, ok := names[want]; !ok {
			t.Errorf("initramfs lacks /%s", want)
		}
	}
	if !bytes.HasPrefix(names["bin/ftguest"].data, []byte("\x7fELF")) {
		t.Error("/bin/ftguest is not an ELF binary")
	}
	kernel, _ := os.ReadFile(img.Kernel)
	hostKernel, _ := os.ReadFile(filepath.Join(bootDir, "vmlinuz-"+mustKernel(t)))
	if !bytes.Equal(kernel, hostKernel) {
		t.Error("vmlinuz is not a copy of the host's cloud kernel")
	}

	// Same inputs: a cache hit that rewrites nothing.
	ino := inode(t, img.Initrd)
	again, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if again != img || inode(t, img.Initrd) != ino {
		t.Fatalf("second build was not a cache hit: %+v vs %+v", again, img)
	}

	// Forced rebuild (manifest gone): byte-identical output.
	os.Remove(filepath.Join(dir, ManifestFile))
	rebuilt, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	second, _ := os.ReadFile(rebuilt.Initrd)
	if rebuilt.Hash != img.Hash || !bytes.Equal(first, second) || inode(t, img.Initrd) == ino {
		t.Fatalf("rebuild differs: hash %s vs %s, same bytes %v", rebuilt.Hash, img.Hash, bytes.Equal(first, second))
	}

	// Other inputs: other hash, and the extra file and module are inside.
	extra := filepath.Join(t.TempDir(), "hello")
	os.WriteFile(extra, []byte("#!/bin/sh\necho hello\n"), 0o700)
	withExtra := Options{OutDir: dir, Extra: []File{{HostPath: extra, GuestPath: "/usr/bin/hello"}}, Modules: []string{"sch_plug"}}
	xi, err := Build(ctx, withExtra)
	if err != nil {
		t.Fatal(err)
	}
	if xi.Hash == img.Hash {
		t.Fatal("adding an extra file did not change the hash")
	}
	xb, _ := os.ReadFile(xi.Initrd)
	found := false
	for _, e := range readCPIO(t, xb) {
		if e.name == "usr/bin/hello" {
			found = e.mode == modeRegular|0o700 && string(e.data) == "#!/bin/sh\necho hello\n"
		}
		if e.name == "init" && !strings.Contains(string(e.data), " sch_plug;") {
			t.Error("/init does not load sch_plug")
		}
	}
	if !found {
		t.Error("initramfs lacks /usr/bin/hello with mode 0700 and its content")
	}
	os.WriteFile(extra, []byte("#!/bin/sh\necho changed\n"), 0o700)
	if ci, err := Build(ctx, withExtra); err != nil || ci.Hash == xi.Hash {
		t.Fatalf("changing an extra file's content: hash %s (was %s), err %v", ci.Hash, xi.Hash, err)
	}
	if ii, err := Build(ctx, Options{OutDir: dir, Init: "exit 3"}); err != nil || ii.Hash == img.Hash {
		t.Fatalf("setting Init: hash %s, err %v", ii.Hash, err)
	}
	if back, err := Build(ctx, opts); err != nil || back.Hash != img.Hash {
		t.Fatalf("back to the default options: hash %s, want %s, err %v", back.Hash, img.Hash, err)
	}
}

func mustKernel(t *testing.T) string {
	v, err := findKernel(bootDir, modulesRoot, "")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestBuildRejectsBadOptions(t *testing.T) {
	requireHostInputs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	host := filepath.Join(dir, "f")
	os.WriteFile(host, []byte("x"), 0o644)
	for _, tc := range []struct {
		name string
		opts Options
		is   error
		want string
	}{
		{"relative guest path", Options{Extra: []File{{HostPath: host, GuestPath: "bin/x"}}}, ErrBadOptions, `Extra[0].GuestPath "bin/x"`},
		{"missing host file", Options{Extra: []File{{HostPath: host + ".nope", GuestPath: "/x"}}}, ErrBadOptions, "Extra[0].HostPath"},
		{"directory as host file", Options{Extra: []File{{HostPath: dir, GuestPath: "/x"}}}, ErrBadOptions, "not a regular file"},
		{"mode with type bits", Options{Extra: []File{{HostPath: host, GuestPath: "/x", Mode: os.ModeDir | 0o755}}}, ErrBadOptions, "Extra[0].Mode"},
		{"replaces /init", Options{Extra: []File{{HostPath: host, GuestPath: "/init"}}}, ErrBadOptions, "would replace the image's own /init"},
		{"replaces a module", Options{Extra: []File{{HostPath: host, GuestPath: "/lib/modules/virtio.ko"}}}, ErrBadOptions, "would replace"},
		{"unknown module", Options{Modules: []string{"no_such_module"}}, ErrBadOptions, `"no_such_module"`},
		{"unknown kernel", Options{KernelVersion: "0.0.1-cloud-amd64"}, ErrNoKernel, "0.0.1-cloud-amd64"},
	} {
		tc.opts.OutDir = dir
		_, err := Build(ctx, tc.opts)
		if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want %v mentioning %q", tc.name, err, tc.is, tc.want)
		}
	}
}

func TestBuildWithoutKernelPackage(t *testing.T) {
	saved := bootDir
	bootDir = t.TempDir()
	defer func() { bootDir = saved }()
	_, err := Build(context.Background(), Options{OutDir: t.TempDir()})
	if !errors.Is(err, ErrNoKernel) || !strings.Contains(err.Error(), "install linux-image-cloud-amd64 (hack/deps.sh)") {
		t.Fatalf("err %v, want the install hint", err)
	}
}

func TestOutputDirs(t *testing.T) {
	root := "/repo"
	base, dir, err := outputDirs(root, Options{})
	if err != nil || base != "/repo/_output/guest" || dir != base {
		t.Fatalf("default: %s %s %v", base, dir, err)
	}
	a := Options{Extra: []File{{HostPath: "/tmp/a.test", GuestPath: "/bin/a.test"}}}
	_, da, _ := outputDirs(root, a)
	if !strings.HasPrefix(da, "/repo/_output/guest/variants/") {
		t.Fatalf("variant dir %s", da)
	}
	sameShape := Options{Extra: []File{{HostPath: "/elsewhere/a.test", GuestPath: "/bin/a.test"}}}
	if _, d, _ := outputDirs(root, sameShape); d != da {
		t.Errorf("same guest layout got another dir: %s vs %s", d, da)
	}
	for _, o := range []Options{
		{Extra: []File{{HostPath: "/tmp/a.test", GuestPath: "/bin/b.test"}}},
		{Modules: []string{"ifb"}},
		{Init: "true"},
		{KernelVersion: "6.1.0-56-cloud-amd64"},
	} {
		if _, d, _ := outputDirs(root, o); d == da || d == base {
			t.Errorf("%+v shares dir %s", o, d)
		}
	}
	if b, d, _ := outputDirs(root, Options{OutDir: "/x/y", Init: "true"}); b != "/x/y" || d != "/x/y" {
		t.Errorf("explicit OutDir: %s %s", b, d)
	}
}

func TestConcurrentBuilds(t *testing.T) {
	requireHostInputs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	errs := make(chan error, 3)
	hashes := make(chan string, 3)
	for range 3 {
		go func() {
			img, err := Build(ctx, Options{OutDir: dir})
			errs <- err
			hashes <- img.Hash
		}()
	}
	var first string
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		h := <-hashes
		if first == "" {
			first = h
		} else if h != first {
			t.Fatalf("concurrent builds disagree: %s vs %s", h, first)
		}
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, ".*.tmp*"))
	if len(leftovers) != 0 {
		t.Fatalf("temporary files left: %v", leftovers)
	}
}
