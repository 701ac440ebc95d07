// Package guestimage builds ftctl's built-in test guest: Debian's cloud
// kernel plus an initramfs holding busybox, the virtio modules and our
// static workload program ftguest (cmd/ftguest), laid out by a generated
// /init. It owns the image's contents, its deterministic encoding and the
// on-disk cache of built images; launching the guest is pkg/vm's job.
//
// The same inputs always give the same bytes, and a build whose inputs
// hash to what the output directory already holds does not write anything.
package guestimage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// Sentinel errors; Build's errors wrap one of these or an I/O error.
var (
	// ErrNoKernel: no usable cloud kernel (or module tree) is installed.
	ErrNoKernel = errors.New("guestimage: no guest kernel")
	// ErrBadOptions: the Options ask for something impossible.
	ErrBadOptions = errors.New("guestimage: bad options")
	// ErrBadInput: an input file (modules.dep, busybox, ...) is unusable.
	ErrBadInput = errors.New("guestimage: bad input")
	// ErrBuild: building ftguest failed.
	ErrBuild = errors.New("guestimage: building ftguest failed")
)

// File is an extra file for the initramfs.
type File struct {
	HostPath  string      // file to copy from the host
	GuestPath string      // absolute path in the guest, e.g. "/bin/memsync.test"
	Mode      os.FileMode // permissions; 0 keeps the host file's
}

// Options select what goes into the image. The zero value is the default
// image.
type Options struct {
	// OutDir receives the image. Default: <repo root>/_output/guest, where
	// the repo root is the directory holding go.mod, found walking up from
	// the working directory. With the default OutDir, an image with
	// Modules, Extra, Init or KernelVersion set goes to a subdirectory
	// named after those options, so it never clobbers the default image.
	OutDir string
	// KernelVersion, e.g. "6.1.0-56-cloud-amd64". Default: the newest
	// installed *-cloud-amd64 with both /boot/vmlinuz-V and /lib/modules/V.
	KernelVersion string
	// Modules are extra kernel modules to include and load (e.g.
	// "sch_plug", "ifb"); their dependencies are added.
	Modules []string
	// Extra files for the initramfs (e.g. a Go test binary).
	Extra []File
	// Init, if set, is a shell command line /init runs after setup instead
	// of ftguest. Either way /init then prints "ftguest-exit=<code>" on the
	// console and powers off.
	Init string
}

// Image is a built guest.
type Image struct {
	Kernel, Initrd string // absolute paths
	// Cmdline is the base kernel command line; callers append ftguest.*
	// keys (ftguest.run=, ftguest.ip=ADDR/PREFIX, ftguest.gw=, ...). It has
	// panic=-1, so run QEMU with -no-reboot to make a guest panic end the
	// process. Give the guest -device virtio-rng-pci for entropy at boot.
	Cmdline string
	Hash    string // SHA-256 of all inputs, hex
}

// BaseCmdline is the kernel command line every image starts from.
const BaseCmdline = "console=ttyS0 panic=-1 quiet"

// File names inside an output directory.
const (
	KernelFile   = "vmlinuz"
	InitrdFile   = "initrd.img"
	ManifestFile = "manifest.json"
	ftguestFile  = "ftguest"
	lockFile     = ".lock"
	variantsDir  = "variants"
)

// formatVersion changes whenever the layout or the /init script changes
// in a way the input hash would not otherwise see.
const formatVersion = "guestimage/1"

// Host locations, variables so tests can point them at fixtures.
var (
	bootDir     = "/boot"
	modulesRoot = "/lib/modules"
	busyboxPath = "/bin/busybox"
)

// Default builds (or finds up to date) the default image, with ftguest
// built from this repository.
func Default(ctx context.Context) (Image, error) {
	return Build(ctx, Options{})
}

// Build builds the image opts describe, or returns the one already in the
// output directory when its input hash matches. Concurrent builds, also
// from several processes, are serialised by a lock file; each file is
// written to a temporary name and renamed into place.
func Build(ctx context.Context, opts Options) (Image, error) {
	root, err := repoRoot()
	if err != nil {
		return Image{}, err
	}
	base, dir, err := outputDirs(root, opts)
	if err != nil {
		return Image{}, err
	}
	for _, d := range []string{base, dir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return Image{}, fmt.Errorf("guestimage: output directory: %w", err)
		}
	}

	kver, err := findKernel(bootDir, modulesRoot, opts.KernelVersion)
	if err != nil {
		return Image{}, err
	}
	extras, err := readExtras(opts.Extra)
	if err != nil {
		return Image{}, err
	}
	if strings.ContainsRune(opts.Init, 0) {
		return Image{}, fmt.Errorf("%w: Init contains a NUL byte", ErrBadOptions)
	}

	unlock, err := lock(ctx, filepath.Join(base, lockFile))
	if err != nil {
		return Image{}, err
	}
	defer unlock()

	// ftguest is rebuilt (or found up to date by go build) on every call;
	// its bytes are an input like any other.
	ftguestPath := filepath.Join(base, ftguestFile)
	if err := buildFtguest(ctx, root, ftguestPath); err != nil {
		return Image{}, err
	}
	in, err := gatherInputs(kver, opts, extras, ftguestPath)
	if err != nil {
		return Image{}, err
	}

	img := Image{
		Kernel:  filepath.Join(dir, KernelFile),
		Initrd:  filepath.Join(dir, InitrdFile),
		Cmdline: BaseCmdline,
		Hash:    in.hash,
	}
	if upToDate(dir, in.hash) {
		return img, nil
	}

	var initrd bytes.Buffer
	if err := writeCPIO(&initrd, in.entries); err != nil {
		return Image{}, err
	}
	if err := writeFileAtomic(img.Initrd, initrd.Bytes()); err != nil {
		return Image{}, err
	}
	if err := writeFileAtomic(img.Kernel, in.kernel); err != nil {
		return Image{}, err
	}
	man, err := json.MarshalIndent(manifest{
		Format:        formatVersion,
		Hash:          in.hash,
		KernelVersion: kver,
		Kernel:        KernelFile,
		Initrd:        InitrdFile,
		Cmdline:       BaseCmdline,
		Modules:       in.moduleNames,
		Files:         in.fileNames,
		Init:          opts.Init,
	}, "", "  ")
	if err != nil {
		return Image{}, err
	}
	// The manifest goes last: it vouches for the files written before it.
	if err := writeFileAtomic(filepath.Join(dir, ManifestFile), append(man, '\n')); err != nil {
		return Image{}, err
	}
	return img, nil
}

// manifest records what an output directory holds.
type manifest struct {
	Format        string   `json:"format"`
	Hash          string   `json:"hash"`
	KernelVersion string   `json:"kernelVersion"`
	Kernel        string   `json:"kernel"`
	Initrd        string   `json:"initrd"`
	Cmdline       string   `json:"cmdline"`
	Modules       []string `json:"modules"`
	Files         []string `json:"files"`
	Init          string   `json:"init,omitempty"`
}

func upToDate(dir, hash string) bool {
	b, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		return false
	}
	var m manifest
	if json.Unmarshal(b, &m) != nil || m.Hash != hash || m.Format != formatVersion {
		return false
	}
	for _, f := range []string{KernelFile, InitrdFile} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || !st.Mode().IsRegular() {
			return false
		}
	}
	return true
}

// inputs is everything that goes into an image, read into memory.
type inputs struct {
	kernel      []byte
	entries     []entry
	moduleNames []string
	fileNames   []string
	hash        string
}

func gatherInputs(kver string, opts Options, extras []entry, ftguestPath string) (inputs, error) {
	var in inputs
	kpath := filepath.Join(bootDir, "vmlinuz-"+kver)
	kernel, err := os.ReadFile(kpath)
	if err != nil {
		return in, fmt.Errorf("%w: reading %s: %w", ErrNoKernel, kpath, err)
	}
	in.kernel = kernel

	moddir := filepath.Join(modulesRoot, kver)
	dep, err := os.Open(filepath.Join(moddir, "modules.dep"))
	if err != nil {
		return in, fmt.Errorf("%w: %w (run depmod %s?)", ErrNoKernel, err, kver)
	}
	defer dep.Close()
	var builtin io.Reader
	if f, err := os.Open(filepath.Join(moddir, "modules.builtin")); err == nil {
		defer f.Close()
		builtin = f
	}
	mods, err := resolveModules(dep, builtin, append(slices.Clone(baseModules), opts.Modules...))
	if err != nil {
		return in, err
	}

	busybox, err := readStaticBusybox(busyboxPath)
	if err != nil {
		return in, err
	}
	ftguest, err := os.ReadFile(ftguestPath)
	if err != nil {
		return in, err
	}
	in.entries = []entry{
		{name: guestInit, mode: modeRegular | 0o755, data: []byte(initScript(mods, opts.Init != ""))},
		{name: guestBusybox, mode: modeRegular | 0o755, data: busybox, fromSource: busyboxPath},
		{name: "bin/sh", mode: modeSymlink | 0o777, data: []byte("busybox")},
		{name: guestFtguest, mode: modeRegular | 0o755, data: ftguest, fromSource: "cmd/ftguest"},
		// The kernel opens /dev/console for /init's stdio before /init can
		// mount devtmpfs, so the node must be in the archive.
		{name: guestConsole, mode: modeCharDev | 0o600, rdevMajor: 5, rdevMinor: 1},
		{name: "proc", mode: modeDir | 0o555},
		{name: "sys", mode: modeDir | 0o555},
		{name: "tmp", mode: modeDir | 0o1777},
		{name: "root", mode: modeDir | 0o700},
	}
	if opts.Init != "" {
		in.entries = append(in.entries, entry{name: guestInitCmd, mode: modeRegular | 0o644, data: []byte(opts.Init + "\n")})
	}
	for _, m := range mods {
		p := filepath.Join(moddir, filepath.FromSlash(m.Path))
		b, err := os.ReadFile(p)
		if err != nil {
			return in, fmt.Errorf("%w: module %s: %w", ErrNoKernel, m.Name, err)
		}
		in.entries = append(in.entries, entry{name: path.Join(guestModDir, m.Name+".ko"), mode: modeRegular | 0o644, data: b, fromSource: p})
		in.moduleNames = append(in.moduleNames, m.Name)
	}
	reserved := map[string]bool{}
	for _, e := range in.entries {
		reserved[e.name] = true
	}
	for _, e := range extras {
		if reserved[e.name] || strings.HasPrefix(e.name, guestModDir+"/") {
			return in, fmt.Errorf("%w: Extra file %s (from %s) would replace the image's own /%s", ErrBadOptions, "/"+e.name, e.fromSource, e.name)
		}
		in.entries = append(in.entries, e)
	}
	for _, e := range in.entries {
		in.fileNames = append(in.fileNames, "/"+e.name)
	}
	slices.Sort(in.fileNames)

	// The hash covers the kernel and every archive entry (the /init script
	// embeds the module order and Init), so any input change shows.
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s\x00", formatVersion, kver, BaseCmdline)
	fmt.Fprintf(h, "kernel %x\x00", sha256.Sum256(kernel))
	sorted := slices.Clone(in.entries)
	slices.SortFunc(sorted, func(a, b entry) int { return strings.Compare(a.name, b.name) })
	for _, e := range sorted {
		fmt.Fprintf(h, "%s %o %d:%d %x\x00", e.name, e.mode, e.rdevMajor, e.rdevMinor, sha256.Sum256(e.data))
	}
	in.hash = hex.EncodeToString(h.Sum(nil))
	return in, nil
}

// readExtras loads Options.Extra into archive entries.
func readExtras(files []File) ([]entry, error) {
	var out []entry
	for i, f := range files {
		gp := f.GuestPath
		if !path.IsAbs(gp) || path.Clean(gp) != gp || gp == "/" {
			return nil, fmt.Errorf("%w: Extra[%d].GuestPath %q must be a clean absolute file path", ErrBadOptions, i, gp)
		}
		if f.HostPath == "" {
			return nil, fmt.Errorf("%w: Extra[%d].HostPath is empty (for %s)", ErrBadOptions, i, gp)
		}
		st, err := os.Stat(f.HostPath)
		if err != nil {
			return nil, fmt.Errorf("%w: Extra[%d].HostPath: %w", ErrBadOptions, i, err)
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("%w: Extra[%d].HostPath %s is not a regular file", ErrBadOptions, i, f.HostPath)
		}
		if f.Mode&^fs.ModePerm != 0 {
			return nil, fmt.Errorf("%w: Extra[%d].Mode %v has more than permission bits", ErrBadOptions, i, f.Mode)
		}
		b, err := os.ReadFile(f.HostPath)
		if err != nil {
			return nil, fmt.Errorf("%w: Extra[%d]: %w", ErrBadOptions, i, err)
		}
		mode := f.Mode
		if mode == 0 {
			mode = st.Mode().Perm()
		}
		out = append(out, entry{name: gp[1:], mode: modeRegular | uint32(mode), data: b, fromSource: f.HostPath})
	}
	return out, nil
}

// outputDirs returns the directory holding the lock and the ftguest
// build (base) and the one receiving the image (dir): the same, unless
// OutDir is defaulted and the options are not the default ones.
func outputDirs(root string, opts Options) (base, dir string, err error) {
	if opts.OutDir != "" {
		base, err = filepath.Abs(opts.OutDir)
		return base, base, err
	}
	base = filepath.Join(root, "_output", "guest")
	if opts.KernelVersion != "" || len(opts.Modules) > 0 || len(opts.Extra) > 0 || opts.Init != "" {
		return base, filepath.Join(base, variantsDir, variantName(opts)), nil
	}
	return base, base, nil
}

// variantName names the subdirectory of a non-default image after the
// options' shape (kernel, module names, guest paths, Init), not the file
// contents: rebuilding a changed test binary reuses its directory instead
// of piling up new ones, while different option sets stay apart.
func variantName(opts Options) string {
	h := sha256.New()
	fmt.Fprintf(h, "k=%s\x00", opts.KernelVersion)
	for _, m := range opts.Modules {
		fmt.Fprintf(h, "m=%s\x00", moduleName(m))
	}
	for _, f := range opts.Extra {
		fmt.Fprintf(h, "f=%s\x00", f.GuestPath)
	}
	fmt.Fprintf(h, "i=%s\x00", opts.Init)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// repoRoot is the nearest directory at or above the working directory
// holding go.mod.
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
			return "", fmt.Errorf("%w: no go.mod in %s or above; run from the ftctl repository", ErrBadOptions, wd)
		}
	}
}

// lock takes an exclusive flock on path, waiting for ctx.
func lock(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("guestimage: lock: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- syscall.Flock(int(f.Fd()), syscall.LOCK_EX) }()
	select {
	case err := <-done:
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("guestimage: lock %s: %w", path, err)
		}
		return func() { f.Close() }, nil
	case <-ctx.Done():
		// Closing the file does not wake a blocked flock; let the goroutine
		// release the lock whenever it gets it.
		go func() {
			<-done
			f.Close()
		}()
		return nil, fmt.Errorf("guestimage: waiting for %s: %w", path, ctx.Err())
	}
}

// writeFileAtomic writes data to a temporary file next to path and renames
// it into place, so readers see the old file or the new one, never half.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("guestimage: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("guestimage: writing %s: %w", path, err)
	}
	return nil
}
