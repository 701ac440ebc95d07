package vm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func touch(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestValidateNamesTheField(t *testing.T) {
	kernel := touch(t, "vmlinuz")
	good := Spec{Name: "a", MemoryMiB: 64, Kernel: kernel}
	if err := good.WithDefaults().Validate(); err != nil {
		t.Fatalf("good spec refused: %v", err)
	}
	cases := []struct {
		name  string
		edit  func(*Spec)
		field string
	}{
		{"missing kernel", func(s *Spec) { s.Kernel = "/nonexistent/vmlinuz" }, "kernel"},
		{"no boot source", func(s *Spec) { s.Kernel = "" }, "kernel"},
		{"zero memory", func(s *Spec) { s.MemoryMiB = 0 }, "memory_mib"},
		{"odd memory", func(s *Spec) { s.MemoryMiB = 63 }, "memory_mib"},
		{"unknown accel", func(s *Spec) { s.Accel = "hvf" }, "accel"},
		{"bad name", func(s *Spec) { s.Name = "a b" }, "name"},
		{"empty name", func(s *Spec) { s.Name = "" }, "name"},
		{"missing initrd", func(s *Spec) { s.Initrd = "/nonexistent/initrd" }, "initrd"},
		{"kernel and image", func(s *Spec) { s.Image = kernel }, "image"},
		{"disk without source", func(s *Spec) { s.Disks = []Disk{{}} }, "disks[0]"},
		{"missing disk", func(s *Spec) { s.Disks = []Disk{{Path: "/nonexistent.raw"}} }, "disks[0].path"},
		{"bad disk format", func(s *Spec) { s.Disks = []Disk{{Path: kernel, Format: "vmdk"}} }, "disks[0].format"},
		{"nbd without socket", func(s *Spec) { s.Disks = []Disk{{NBD: &NBD{}}} }, "disks[0].nbd.socket"},
		{"bad mac", func(s *Spec) { s.NICs = []NIC{{User: true, MAC: "zz"}} }, "nics[0].mac"},
		{"nic without backend", func(s *Spec) { s.NICs = []NIC{{}} }, "nics[0]"},
		{"bad fwd", func(s *Spec) { s.NICs = []NIC{{User: true, Fwd: []string{"80"}}} }, "nics[0].fwd"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := good
			c.edit(&s)
			err := s.Validate()
			if !errors.Is(err, ErrInvalidSpec) {
				t.Fatalf("Validate() = %v, want ErrInvalidSpec", err)
			}
			if !strings.Contains(err.Error(), c.field+":") {
				t.Fatalf("error %q does not name field %q", err, c.field)
			}
		})
	}
}

func TestStartRefusesBadSpecBeforeRunningAnything(t *testing.T) {
	_, err := Start(context.Background(), Spec{Name: "x", MemoryMiB: 0, Kernel: "/nonexistent"}, Options{})
	if !errors.Is(err, ErrInvalidSpec) {
		t.Fatalf("Start = %v, want ErrInvalidSpec", err)
	}
	_, err = Start(context.Background(), Spec{Name: "x", MemoryMiB: 64, Kernel: touch(t, "k"), Accel: "xen"}, Options{})
	if !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), "accel") {
		t.Fatalf("Start with unknown accel = %v", err)
	}
	_, err = Start(context.Background(), Spec{Name: "x", MemoryMiB: 64, Kernel: touch(t, "k")}, Options{Standby: true, ReplicaRAM: touch(t, "ram")})
	if !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), "replica RAM") {
		t.Fatalf("Start standby with wrong-size RAM = %v", err)
	}
}

func TestLoadSpecRejectsUnknownFields(t *testing.T) {
	p := filepath.Join(t.TempDir(), "spec.json")
	os.WriteFile(p, []byte(`{"name":"a","memory_mib":64,"memroy":1}`), 0o644)
	if _, err := LoadSpec(p); !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), "memroy") {
		t.Fatalf("LoadSpec = %v, want an error naming the unknown field", err)
	}
	os.WriteFile(p, []byte(`{"name":"a","memory_mib":64,"kernel":"/k","disks":[{"path":"/d"}]}`), 0o644)
	s, err := LoadSpec(p)
	if err != nil || s.Name != "a" || s.Disks[0].Path != "/d" {
		t.Fatalf("LoadSpec = %+v, %v", s, err)
	}
}

func TestArgvIsStableAcrossPrimaryAndStandby(t *testing.T) {
	s := Spec{Name: "a", MemoryMiB: 128, Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0",
		Disks: []Disk{{Path: "/d,1.raw"}, {NBD: &NBD{Socket: "/s", Export: "e"}}},
		NICs:  []NIC{{Stream: "/n.sock"}}}.WithDefaults()
	p := s.argv(argvOptions{accel: "tcg", ramFile: "/dev/shm/p.ram", serialLog: "/p/serial", qmpFD: 3})
	sb := s.argv(argvOptions{accel: "tcg", ramFile: "/dev/shm/r.ram", serialLog: "/r/serial", qmpFD: 3, standby: true})
	joined := strings.Join(p, " ")
	for _, want := range []string{
		"memory-backend-file,id=mem,size=128M,mem-path=/dev/shm/p.ram,share=on",
		"filename=/d,,1.raw", // commas in paths are escaped
		"driver=nbd,node-name=disk1,server.type=unix,server.path=/s",
		"stream,id=net0,server=off,addr.type=unix,addr.path=/n.sock",
		"virtio-net-pci,id=net0-dev,netdev=net0,mac=52:54:",
		"-nodefaults",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q:\n%s", want, joined)
		}
	}
	if strings.Contains(joined, "-incoming") {
		t.Error("primary argv has -incoming")
	}
	sbj := strings.Join(sb, " ")
	if !strings.Contains(sbj, "-incoming defer -S") {
		t.Errorf("standby argv lacks -incoming defer -S: %s", sbj)
	}
	// Everything but RAM path, serial path and the standby flags is equal:
	// the migration stream needs identical device ids.
	norm := func(a []string, ram, ser string) string {
		return strings.NewReplacer(ram, "RAM", ser, "SER", " -incoming defer -S", "").Replace(strings.Join(a, " "))
	}
	if norm(p, "/dev/shm/p.ram", "/p/serial") != norm(sb, "/dev/shm/r.ram", "/r/serial") {
		t.Errorf("primary and standby argv differ beyond RAM/serial/incoming:\n%s\n%s", joined, sbj)
	}
}

func TestDefaultMACIsStableAndLocal(t *testing.T) {
	a, b := defaultMAC("vm-a", 0), defaultMAC("vm-a", 0)
	if a != b || defaultMAC("vm-b", 0) == a {
		t.Fatalf("defaultMAC not stable/unique: %s %s %s", a, b, defaultMAC("vm-b", 0))
	}
	if !strings.HasPrefix(a, "52:54:") {
		t.Fatalf("MAC %s is not in QEMU's locally administered range", a)
	}
}
