package agent

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
)

// sampleDomain is a domain with a raw disk, a bridged NIC and a serial
// file, as a user might define it.
func sampleDomain() string {
	return libvirttest.GuestDomain{
		Name: "web", MemoryMiB: 192, Kernel: "/boot/vmlinuz", Initrd: "/boot/initrd", Serial: "/var/log/web.serial",
		Devices: `    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/web.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
`,
	}.XML()
}

func prepare(t *testing.T, o domxml.Options) string {
	t.Helper()
	if o.SocketDir == "" {
		o.SocketDir = "/run/ftctl/vms/web"
	}
	x, _, err := domxml.Prepare(sampleDomain(), o)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func TestParsePrepared(t *testing.T) {
	x := prepare(t, domxml.Options{})
	pd, err := parsePrepared("web", []byte(x))
	if err != nil {
		t.Fatal(err)
	}
	if pd.spec.Name != "web" || pd.spec.MemoryMiB != 192 || pd.accel != "tcg" {
		t.Errorf("spec %+v, accel %s", pd.spec, pd.accel)
	}
	if len(pd.spec.Disks) != 1 || pd.spec.Disks[0].Path != "/images/web.raw" || pd.spec.Disks[0].Format != "raw" {
		t.Errorf("disks %+v", pd.spec.Disks)
	}
	if len(pd.spec.NICs) != 1 || pd.spec.NICs[0].MAC != "52:54:00:12:34:56" {
		t.Errorf("NICs %+v", pd.spec.NICs)
	}
	if pd.prot.QMP == nil || pd.prot.QMP.Socket != "/run/ftctl/vms/web/qmp.sock" {
		t.Errorf("QMP %+v", pd.prot.QMP)
	}
	if pd.prot.Memory == nil || !strings.HasPrefix(pd.prot.Memory.File, "/run/ftctl/vms/web/") {
		t.Errorf("memory %+v", pd.prot.Memory)
	}
	if pd.serial != "/var/log/web.serial" {
		t.Errorf("serial %q", pd.serial)
	}
}

// TestParsePreparedProbe: the LAN probe recorded by prepare --probe-addr
// becomes the adopted VM's probe, which travels to the secondary's arbiter.
func TestParsePreparedProbe(t *testing.T) {
	pd, err := parsePrepared("web", []byte(prepare(t, domxml.Options{})))
	if err != nil {
		t.Fatal(err)
	}
	if len(pd.probe.Addrs) != 0 || len(pd.probe.TCPPorts) != 0 {
		t.Errorf("no probe recorded, got %+v", pd.probe)
	}
	x := prepare(t, domxml.Options{ProbeAddrs: []string{"10.0.0.5", "FD00::5"}, ProbeTCPPorts: []int{22, 80}})
	if pd, err = parsePrepared("web", []byte(x)); err != nil {
		t.Fatal(err)
	}
	if want := []string{"10.0.0.5", "fd00::5"}; !slices.Equal(pd.probe.Addrs, want) {
		t.Errorf("probe addresses %v, want %v", pd.probe.Addrs, want)
	}
	if want := []int{22, 80}; !slices.Equal(pd.probe.TCPPorts, want) {
		t.Errorf("probe ports %v, want %v", pd.probe.TCPPorts, want)
	}
}

func TestParsePreparedRefuses(t *testing.T) {
	prepared := prepare(t, domxml.Options{})
	standby, err := domxml.Standby(prepared, domxml.StandbyOptions{SocketDir: "/run/ftctl/replicas/web", RAMFile: "/dev/shm/r.ram"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, domain, xml, want string
	}{
		{"not XML", "web", "<domain", "bad request"},
		{"another domain", "db", prepared, `describes "web"`},
		{"not prepared", "web", sampleDomain(), "ftctl libvirt prepare"},
		{"a standby", "web", standby, "standby"},
		{"client NIC", "web", prepare(t, domxml.Options{NIC: domxml.NICClient, NICPort: 47000}), "not supported yet"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parsePrepared(tc.domain, []byte(tc.xml))
			if !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrBadRequest mentioning %q", err, tc.want)
			}
		})
	}
}

func TestSerialFile(t *testing.T) {
	for _, tc := range []struct{ xml, want string }{
		{sampleDomain(), "/var/log/web.serial"},
		{"<domain><name>x</name><devices><serial type='pty'/></devices></domain>", ""},
		{"<domain><name>x</name><devices><serial type='pty'/><serial type='file'><source path='/b'/></serial></devices></domain>", "/b"},
		{"not xml", ""},
	} {
		if got := serialFile([]byte(tc.xml)); got != tc.want {
			t.Errorf("serialFile(%.40q) = %q, want %q", tc.xml, got, tc.want)
		}
	}
}
