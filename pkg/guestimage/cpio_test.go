package guestimage

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// readCPIO parses a newc archive back, independently of writeCPIO.
func readCPIO(t *testing.T, b []byte) []entry {
	t.Helper()
	var out []entry
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off+110 > len(b) {
			t.Fatalf("truncated header at %d", off)
		}
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			t.Fatalf("bad magic %q at %d", h[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatalf("field %d at %d: %v", i, off, err)
			}
			return uint32(v)
		}
		if field(2) != 0 || field(3) != 0 || field(5) != 0 {
			t.Fatalf("uid/gid/mtime not zero at %d", off)
		}
		mode, size, namesize := field(1), int(field(6)), int(field(11))
		name := string(b[off+110 : off+110+namesize-1])
		if b[off+110+namesize-1] != 0 {
			t.Fatalf("name %q not NUL-terminated", name)
		}
		off = align(off + 110 + namesize)
		if name == "TRAILER!!!" {
			if len(b)%512 != 0 {
				t.Fatalf("archive length %d not a multiple of 512", len(b))
			}
			return out
		}
		out = append(out, entry{name: name, mode: mode, data: bytes.Clone(b[off : off+size]), rdevMajor: field(9), rdevMinor: field(10)})
		off = align(off + size)
	}
}

func TestCPIORoundTrip(t *testing.T) {
	in := []entry{
		{name: "init", mode: modeRegular | 0o755, data: []byte("#!/bin/sh\necho hi\n")},
		{name: "bin/sh", mode: modeSymlink | 0o777, data: []byte("busybox")},
		{name: "bin/busybox", mode: modeRegular | 0o755, data: bytes.Repeat([]byte{1, 2, 3}, 1001)},
		{name: "lib/modules/a.ko", mode: modeRegular | 0o644, data: []byte("x")},
		{name: "dev/console", mode: modeCharDev | 0o600, rdevMajor: 5, rdevMinor: 1},
		{name: "empty", mode: modeRegular | 0o600},
		{name: "tmp", mode: modeDir | 0o1777},
	}
	var buf bytes.Buffer
	if err := writeCPIO(&buf, in); err != nil {
		t.Fatal(err)
	}
	got := readCPIO(t, buf.Bytes())
	var names []string
	byName := map[string]entry{}
	for _, e := range got {
		names = append(names, e.name)
		byName[e.name] = e
	}
	want := []string{"bin", "bin/busybox", "bin/sh", "dev", "dev/console", "empty", "init", "lib", "lib/modules", "lib/modules/a.ko", "tmp"}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("entries %v, want %v (sorted, parents added)", names, want)
	}
	for _, e := range in {
		g := byName[e.name]
		if g.mode != e.mode || !bytes.Equal(g.data, e.data) || g.rdevMajor != e.rdevMajor || g.rdevMinor != e.rdevMinor {
			t.Errorf("%s: got mode %o len %d rdev %d:%d, want mode %o len %d rdev %d:%d",
				e.name, g.mode, len(g.data), g.rdevMajor, g.rdevMinor, e.mode, len(e.data), e.rdevMajor, e.rdevMinor)
		}
	}
	if byName["lib"].mode != modeDir|0o755 {
		t.Errorf("implicit dir mode %o", byName["lib"].mode)
	}

	// Same entries in another order: same bytes.
	rev := append([]entry(nil), in...)
	sort.Slice(rev, func(i, j int) bool { return rev[i].name > rev[j].name })
	var again bytes.Buffer
	if err := writeCPIO(&again, rev); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("input order changed the archive bytes")
	}

	// GNU cpio agrees with our reading of the format.
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio not installed:", err)
	}
	dir := t.TempDir()
	archive := filepath.Join(dir, "a.cpio")
	os.WriteFile(archive, buf.Bytes(), 0o644)
	list, err := exec.Command("sh", "-c", "cpio -t --quiet < "+archive).CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v\n%s", err, list)
	}
	if got := strings.Fields(string(list)); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("cpio -t lists %v, want %v", got, want)
	}
	ext := filepath.Join(dir, "x")
	os.Mkdir(ext, 0o755)
	cmd := exec.Command("sh", "-c", "cpio -i -d --quiet --no-absolute-filenames bin/busybox bin/sh init < "+archive)
	cmd.Dir = ext
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(ext, "bin/busybox")); !bytes.Equal(b, in[2].data) {
		t.Error("cpio -i extracted different bin/busybox bytes")
	}
	if l, err := os.Readlink(filepath.Join(ext, "bin/sh")); err != nil || l != "busybox" {
		t.Errorf("bin/sh link %q %v", l, err)
	}
	if st, err := os.Stat(filepath.Join(ext, "init")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("init: %v %v", st, err)
	}
}

func TestCPIORejectsBadEntries(t *testing.T) {
	for _, tc := range []struct {
		entries []entry
		want    string
	}{
		{[]entry{{name: "/abs", mode: modeRegular}}, `bad initramfs path "/abs"`},
		{[]entry{{name: "a/../b", mode: modeRegular}}, "bad initramfs path"},
		{[]entry{{name: "../up", mode: modeRegular}}, "bad initramfs path"},
		{[]entry{{name: "", mode: modeRegular}}, "bad initramfs path"},
		{[]entry{{name: "x", mode: modeRegular}, {name: "x", mode: modeRegular}}, "two initramfs entries named /x"},
		{[]entry{{name: "f", mode: modeRegular}, {name: "f/g", mode: modeRegular}}, "/f is a file"},
	} {
		err := writeCPIO(&bytes.Buffer{}, tc.entries)
		if !errors.Is(err, ErrBadOptions) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err %v, want %q", tc.entries[0].name, err, tc.want)
		}
	}
}

func TestResolveModules(t *testing.T) {
	dep := `kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/sched/sch_plug.ko:
kernel/drivers/x/packed.ko.xz:
`
	builtin := "kernel/drivers/net/ifb.ko\n"
	mods, err := resolveModules(strings.NewReader(dep), strings.NewReader(builtin),
		[]string{"virtio_pci", "virtio_blk", "virtio_net", "sch_plug", "virtio-rng", "ifb", "virtio_net"})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	pos := map[string]int{}
	for i, m := range mods {
		names = append(names, m.Name)
		pos[m.Name] = i
	}
	want := "virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net sch_plug virtio_rng"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("order %q, want %q", got, want)
	}
	if mods[pos["virtio_rng"]].Path != "kernel/drivers/char/hw_random/virtio-rng.ko" {
		t.Errorf("virtio_rng path %q", mods[pos["virtio_rng"]].Path)
	}
	// Dependencies first, derived from each dependency's own line even
	// when a line lists only direct dependencies.
	partial := "a.ko: b.ko\nb.ko: c.ko\nc.ko:\nd.ko: a.ko\n"
	mods, err = resolveModules(strings.NewReader(partial), nil, []string{"d"})
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(mods); got != "[{c c.ko} {b b.ko} {a a.ko} {d d.ko}]" {
		t.Errorf("partial deps: %s", got)
	}

	for _, tc := range []struct{ dep, root, want string }{
		{dep, "nosuch", `kernel module "nosuch" is neither in modules.dep nor built in`},
		{dep, "packed", "compressed"},
		{"a.ko: b.ko\nb.ko: a.ko\n", "a", "cycle: a -> b -> a"},
		{"garbage line\n", "a", "line 1 has no ':'"},
	} {
		_, err := resolveModules(strings.NewReader(tc.dep), nil, []string{tc.root})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("root %s: err %v, want %q", tc.root, err, tc.want)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		sign int
	}{
		{"6.1.0-56-cloud-amd64", "6.1.0-9-cloud-amd64", 1},
		{"6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", -1},
		{"6.10.0-1-cloud-amd64", "6.9.0-1-cloud-amd64", 1},
		{"6.1.0-56-cloud-amd64", "6.1.0-56-cloud-amd64", 0},
		{"6.1.0-56-cloud-amd64", "6.1.0-56a-cloud-amd64", -1},
	} {
		got := compareVersions(tc.a, tc.b)
		if (got > 0) != (tc.sign > 0) || (got < 0) != (tc.sign < 0) {
			t.Errorf("compare(%s, %s) = %d, want sign %d", tc.a, tc.b, got, tc.sign)
		}
	}
}

func TestFindKernel(t *testing.T) {
	boot, mods := t.TempDir(), t.TempDir()
	add := func(v string, withMods bool) {
		os.WriteFile(filepath.Join(boot, "vmlinuz-"+v), []byte("k"), 0o644)
		if withMods {
			os.MkdirAll(filepath.Join(mods, v), 0o755)
			os.WriteFile(filepath.Join(mods, v, "modules.dep"), nil, 0o644)
		}
	}
	if _, err := findKernel(boot, mods, ""); !errors.Is(err, ErrNoKernel) || !strings.Contains(err.Error(), "install linux-image-cloud-amd64 (hack/deps.sh)") {
		t.Fatalf("empty /boot: err %v", err)
	}
	add("6.1.0-9-cloud-amd64", true)
	add("6.1.0-56-cloud-amd64", true)
	add("6.1.0-99-cloud-amd64", false) // modules missing: unusable
	add("6.5.0-1-amd64", true)         // not a cloud kernel
	if v, err := findKernel(boot, mods, ""); err != nil || v != "6.1.0-56-cloud-amd64" {
		t.Fatalf("newest: %q %v", v, err)
	}
	if v, err := findKernel(boot, mods, "6.1.0-9-cloud-amd64"); err != nil || v != "6.1.0-9-cloud-amd64" {
		t.Fatalf("explicit: %q %v", v, err)
	}
	if _, err := findKernel(boot, mods, "6.1.0-99-cloud-amd64"); !errors.Is(err, ErrNoKernel) || !strings.Contains(err.Error(), "modules.dep") {
		t.Fatalf("explicit without modules: %v", err)
	}
	if _, err := findKernel(boot, mods, "../etc"); !errors.Is(err, ErrBadOptions) {
		t.Fatalf("path as version: %v", err)
	}
}

func TestGuestGoflags(t *testing.T) {
	if got := guestGoflags("-race -mod=mod  -tags=x"); got != "-mod=mod -tags=x" {
		t.Errorf("got %q", got)
	}
}

func TestInitScript(t *testing.T) {
	s := initScript([]module{{Name: "virtio_ring"}, {Name: "virtio"}}, false)
	for _, want := range []string{"for m in virtio_ring virtio; do", "insmod /lib/modules/$m.ko", "\n/bin/ftguest\n", `echo "ftguest-exit=$rc"`, "poweroff -f", "ftguest.ip=*"} {
		if !strings.Contains(s, want) {
			t.Errorf("init script lacks %q", want)
		}
	}
	if s := initScript(nil, true); !strings.Contains(s, "\n/bin/sh /etc/ftguest-init.sh\n") || strings.Contains(s, "\n/bin/ftguest\n") {
		t.Errorf("custom init script runs the wrong program:\n%s", s)
	}
	// busybox sh must at least parse it.
	if _, err := exec.LookPath("busybox"); err == nil {
		f := filepath.Join(t.TempDir(), "init")
		os.WriteFile(f, []byte(initScript([]module{{Name: "a"}}, false)), 0o755)
		if out, err := exec.Command("busybox", "sh", "-n", f).CombinedOutput(); err != nil {
			t.Errorf("busybox sh -n: %v\n%s", err, out)
		}
	}
}
