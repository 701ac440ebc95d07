package guestimage

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"strings"
)

// baseModules are the drivers every guest needs: virtio PCI transport, the
// disk and the NIC (modules, not built in, in Debian's cloud kernel), and
// virtio_rng: without an entropy device the guest's CRNG takes about a
// second under TCG to initialise, and ftguest's first random disk payload
// waits for it.
var baseModules = []string{"virtio_pci", "virtio_blk", "virtio_net", "virtio_rng"}

// module is a kernel module to copy into the initramfs and load.
type module struct {
	Name string // normalised name: "virtio_pci"
	Path string // relative to /lib/modules/VER: "kernel/drivers/virtio/virtio_pci.ko"
}

// moduleName turns a modules.dep path or a user-given name into the name
// the kernel uses: no directory, no .ko, '-' folded to '_'.
func moduleName(p string) string {
	base := path.Base(p)
	for _, z := range []string{".xz", ".zst", ".gz"} {
		base = strings.TrimSuffix(base, z)
	}
	return strings.ReplaceAll(strings.TrimSuffix(base, ".ko"), "-", "_")
}

// resolveModules returns roots and everything they depend on, each module
// after all of its dependencies, read from a modules.dep (and the optional
// modules.builtin, whose modules need no loading). Every modules.dep line
// lists a module's complete dependency closure, the last entry loaded
// first; we still derive the order from each dependency's own line, as
// modprobe would, so a hand-written or partial file works too.
func resolveModules(dep, builtin io.Reader, roots []string) ([]module, error) {
	deps := map[string][]string{}
	paths := map[string]string{}
	sc := bufio.NewScanner(dep)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		p, rest, ok := strings.Cut(text, ":")
		if !ok {
			return nil, fmt.Errorf("%w: modules.dep line %d has no ':': %q", ErrBadInput, line, text)
		}
		name := moduleName(p)
		paths[name] = p
		for _, d := range strings.Fields(rest) {
			deps[name] = append(deps[name], moduleName(d))
			if _, ok := paths[moduleName(d)]; !ok {
				paths[moduleName(d)] = d
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading modules.dep: %w", err)
	}
	isBuiltin := map[string]bool{}
	if builtin != nil {
		sc := bufio.NewScanner(builtin)
		for sc.Scan() {
			if f := strings.TrimSpace(sc.Text()); f != "" {
				isBuiltin[moduleName(f)] = true
			}
		}
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("reading modules.builtin: %w", err)
		}
	}

	var order []module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("%w: module dependency cycle: %s", ErrBadInput, strings.Join(append(chain, name), " -> "))
		}
		p, ok := paths[name]
		if !ok {
			if isBuiltin[name] {
				state[name] = 2
				return nil
			}
			return fmt.Errorf("%w: kernel module %q is neither in modules.dep nor built in", ErrBadOptions, name)
		}
		if strings.HasSuffix(p, ".ko.xz") || strings.HasSuffix(p, ".ko.zst") || strings.HasSuffix(p, ".ko.gz") {
			return fmt.Errorf("%w: kernel module %s is compressed (%s); busybox insmod needs plain .ko files", ErrBadInput, name, p)
		}
		state[name] = 1
		d := deps[name]
		for i := len(d) - 1; i >= 0; i-- {
			if err := visit(d[i], append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, module{Name: name, Path: p})
		return nil
	}
	for _, r := range roots {
		if err := visit(moduleName(r), nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}
