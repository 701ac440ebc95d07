package libvirt_test

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/internal/testenv"
	"github.com/ftctl/ftctl/pkg/guestimage"
	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
	"github.com/ftctl/ftctl/pkg/qmp"
)

// preparedVM is a domain prepared by domxml.Prepare, defined in a private
// libvirtd and running, with stand-ins for the agent: qemu-nbd serving the
// original raw image on the prepared NBD socket, and a listener on the
// NIC's stream socket.
type preparedVM struct {
	d      *libvirttest.Daemon
	c      *libvirt.Conn
	name   string
	qmp    *qmp.Client // the prepared dedicated socket
	image  string
	serial string
	frames chan []byte // frames the guest sent on its NIC
}

const testMAC = "52:54:00:fe:01:02"

// userDomain is the domain as a user would have it: a plain raw file
// disk, a bridge NIC, and no <memoryBacking> (protection no longer needs
// one). libvirt fills in PCI addresses and defaults on define.
func userDomain(img guestimage.Image, name, image, serial string) string {
	orig := libvirttest.GuestDomain{
		Name: name, Kernel: img.Kernel, Initrd: img.Initrd, Serial: serial,
		Cmdline: img.Cmdline + " ftguest.run=counter,disk ftguest.interval=100ms ftguest.diskinterval=20ms",
		Devices: "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='" + image + "'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n" +
			"    <interface type='bridge'>\n      <mac address='" + testMAC + "'/>\n      <source bridge='br-nonexistent'/>\n      <model type='virtio'/>\n    </interface>\n",
	}
	return regexp.MustCompile(`(?s)  <memoryBacking>.*?</memoryBacking>\n`).ReplaceAllString(orig.XML(), "")
}

func startPrepared(t testing.TB, ctx context.Context, name string) *preparedVM {
	t.Helper()
	if _, err := exec.LookPath("qemu-nbd"); err != nil {
		t.Skip("needs qemu-nbd (install with hack/deps.sh):", err)
	}
	img := testenv.Guest(t)
	d := libvirttest.Start(t, libvirttest.Options{})
	c := d.Conn(t)
	// A short directory: these are unix socket paths.
	dir, err := os.MkdirTemp("", "ftlvp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	vm := &preparedVM{d: d, c: c, name: name, image: filepath.Join(dir, "disk.img"), serial: filepath.Join(dir, "serial.log")}
	if err := os.WriteFile(vm.image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(vm.image, 8<<20); err != nil {
		t.Fatal(err)
	}

	x := userDomain(img, name, vm.image, vm.serial)
	if err := c.Define(ctx, x); err != nil {
		t.Fatal(err)
	}
	defined, err := c.XML(ctx, name, true)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := domxml.Check(defined)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"memory", "disk vda", "nic " + testMAC, "qmp"} {
		found := false
		for _, f := range fs {
			found = found || (f.Severity == domxml.Change && f.Area == want)
		}
		if !found {
			t.Errorf("Check of libvirt's XML: no change for %s in %v", want, fs)
		}
	}
	opts := domxml.Options{SocketDir: dir}
	prepared, diff, err := domxml.Prepare(defined, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("prepare diff:\n%s", diff)
	if err := c.Define(ctx, prepared); err != nil {
		t.Fatalf("libvirt refused the prepared XML: %v\n%s", err, prepared)
	}
	// libvirt reformats what it stores; Prepare must see it as done.
	stored, err := c.XML(ctx, name, true)
	if err != nil {
		t.Fatal(err)
	}
	if again, diff, err := domxml.Prepare(stored, opts); err != nil || diff != "" || again != stored {
		t.Fatalf("Prepare of libvirt's stored prepared XML is not a no-op (%v):\n%s", err, diff)
	}
	fs, _ = domxml.CheckWith(stored, opts)
	for _, f := range fs {
		if f.Severity == domxml.Change || f.Severity == domxml.Blocker {
			t.Errorf("after prepare, libvirt's XML still needs: %s", f)
		}
	}

	vm.frames = standIns(ctx, t, dir, vm.image)
	if err := c.Start(ctx, name, false); err != nil {
		t.Fatalf("start: %v\n%s", err, d.QEMULog(name))
	}
	t.Cleanup(func() { c.Destroy(context.Background(), name) })
	vm.qmp, err = qmp.Dial(ctx, "unix", filepath.Join(dir, "qmp.sock"))
	if err != nil {
		t.Fatalf("dedicated QMP socket: %v\n%s", err, d.QEMULog(name))
	}
	t.Cleanup(func() { vm.qmp.Close() })
	return vm
}

// standIns stand in for the agent's devices in dir: qemu-nbd serving the
// raw image on nbd0.sock, and a listener on nic0.sock that passes the
// guest's frames to the returned channel.
func standIns(ctx context.Context, t testing.TB, dir, image string) chan []byte {
	t.Helper()
	nbdSock := filepath.Join(dir, "nbd0.sock")
	nbd := exec.Command("qemu-nbd", "--socket="+nbdSock, "--export-name=disk", "--format=raw", "--persistent", "--cache=none", image)
	nbd.Stderr = os.Stderr
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nbd.Process.Kill(); nbd.Wait() })
	ln, err := net.Listen("unix", filepath.Join(dir, "nic0.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	frames := make(chan []byte, 1024)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		for {
			var hdr [4]byte
			if _, err := io.ReadFull(conn, hdr[:]); err != nil {
				return
			}
			f := make([]byte, binary.BigEndian.Uint32(hdr[:]))
			if _, err := io.ReadFull(conn, f); err != nil {
				return
			}
			select {
			case frames <- f:
			default: // the test reads only a few
			}
		}
	}()
	t.Cleanup(wg.Wait) // after ln.Close and the domain's destroy (cleanups run last-in first)
	waitFor(ctx, t, "qemu-nbd socket", func() bool { _, err := os.Stat(nbdSock); return err == nil })
	return frames
}

var diskSeqRE = regexp.MustCompile(`ftguest disk seq=(\d+)`)

func TestLivePreparedDomainRuns(t *testing.T) {
	ctx := testenv.Deadline(t, 3*time.Minute)
	vm := startPrepared(t, ctx, "prep1")
	c := vm.c

	st, err := vm.qmp.QueryStatus(ctx)
	if err != nil || st.Status != "running" {
		t.Fatalf("query-status on the dedicated socket: %+v, %v", st, err)
	}
	// Guest RAM is in ftctl's file, not libvirt's backend: QEMU maps
	// the file the metadata names, and the guest's kernel is in it.
	var memPath string
	if err := vm.qmp.Execute(ctx, "qom-get", map[string]any{"path": "/objects/ftmem", "property": "mem-path"}, &memPath); err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(filepath.Dir(vm.image), "guest.ram"); memPath != want {
		t.Errorf("ftmem mem-path %q, want %q", memPath, want)
	}
	var memdev string
	if err := vm.qmp.Execute(ctx, "qom-get", map[string]any{"path": "/machine", "property": "memory-backend"}, &memdev); err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(memdev, "ftmem") {
		t.Errorf("machine memory-backend %q, want ftmem", memdev)
	}
	if fi, err := os.Stat(memPath); err != nil || fi.Size() != 128<<20 {
		t.Errorf("RAM file: %v %v", fi, err)
	}

	// The live XML is libvirt's view: no <interface> (the NIC is ours),
	// the NBD disk, the RAM file's backend.
	live, err := c.XML(ctx, vm.name, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"protocol='nbd'", "memory-backend-file,id=ftmem,size=128M,mem-path=" + memPath + ",share=on"} {
		if !strings.Contains(live, s) {
			t.Errorf("live XML lacks %s", s)
		}
	}
	ld, err := domxml.ParseDomain([]byte(live))
	if err != nil {
		t.Fatal(err)
	}
	if len(ld.Devices.Interfaces) != 0 {
		t.Errorf("live XML has an <interface>; the stream NIC should be invisible to libvirt")
	}
	if p := ld.Metadata.Protection; p == nil || len(p.NICs) != 1 || !strings.Contains(p.NICs[0].Original.Inner, "br-nonexistent") {
		t.Errorf("libvirt lost ftctl's record of the original NIC: %+v", p)
	}

	// The guest's NIC is on the agent's socket: announce-self sends RARP
	// frames from the guest's MAC through it.
	if err := vm.qmp.Execute(ctx, "announce-self", map[string]any{"initial": 50, "max": 100, "rounds": 2, "step": 50}, nil); err != nil {
		t.Fatal(err)
	}
	mac, _ := net.ParseMAC(testMAC)
	waitFor(ctx, t, "a RARP frame from the guest's MAC", func() bool {
		for {
			select {
			case f := <-vm.frames:
				if len(f) >= 14 && string(f[6:12]) == string(mac) && f[12] == 0x80 && f[13] == 0x35 {
					return true
				}
			default:
				return false
			}
		}
	})

	// stop and cont on the dedicated socket: libvirt's view follows.
	if err := vm.qmp.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "libvirt to see the domain paused", func() bool {
		s, err := c.State(ctx, vm.name)
		return err == nil && s.Code == libvirt.StatePaused
	})
	if err := vm.qmp.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "libvirt to see the domain running", func() bool {
		s, err := c.State(ctx, vm.name)
		return err == nil && s.Code == libvirt.StateRunning
	})

	// The guest writes its disk through the NBD socket.
	var lastSeq uint64
	waitFor(ctx, t, "guest disk records", func() bool {
		b, _ := os.ReadFile(vm.serial)
		m := diskSeqRE.FindAllSubmatch(b, -1)
		if len(m) == 0 {
			return false
		}
		lastSeq, _ = strconv.ParseUint(string(m[len(m)-1][1]), 10, 64)
		return lastSeq >= 10
	})
	// The guest has booted: its kernel (decompressed by now) is in the
	// RAM file.
	if ram, err := os.ReadFile(memPath); err != nil || !strings.Contains(string(ram), "Linux version") {
		t.Errorf("the guest kernel is not in the RAM file %s (%v)", memPath, err)
	}
	if err := c.Destroy(ctx, vm.name); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(vm.image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rep, err := diskrec.Verify(f, 8<<20)
	if err != nil {
		t.Fatalf("disk chain: %v (%+v)", err, rep)
	}
	if rep.LastSeq < lastSeq {
		t.Errorf("image holds records up to seq %d; the guest reported %d written", rep.LastSeq, lastSeq)
	}
}

// BenchmarkQMPPath measures the cost of the QMP commands of a checkpoint
// (stop, cont, and a query as the lightest round trip) through libvirt's
// pass-through against the dedicated socket Prepare adds, on the same
// domain in the same run, and reports the ratio.
func BenchmarkQMPPath(b *testing.B) {
	ctx := testenv.Deadline(b, 10*time.Minute)
	vm := startPrepared(b, ctx, "bench1")
	type path struct {
		name string
		run  func(cmd string) error
		dur  time.Duration
	}
	paths := []*path{
		{name: "socket", run: func(cmd string) error { return vm.qmp.Execute(ctx, cmd, nil, nil) }},
		{name: "passthrough", run: func(cmd string) error {
			_, err := vm.c.QMP(ctx, vm.name, []byte(`{"execute":"`+cmd+`"}`))
			return err
		}},
	}
	for _, cmds := range [][]string{{"query-status"}, {"stop", "cont"}} {
		b.Run(strings.Join(cmds, "+"), func(b *testing.B) {
			for _, p := range paths {
				p.dur = 0
			}
			for i := 0; i < b.N; i++ {
				for _, p := range paths {
					t0 := time.Now()
					for _, cmd := range cmds {
						if err := p.run(cmd); err != nil {
							b.Fatal(p.name, cmd, err)
						}
					}
					p.dur += time.Since(t0)
				}
			}
			for _, p := range paths {
				b.ReportMetric(float64(p.dur.Microseconds())/float64(b.N), p.name+"-µs/op")
			}
			b.ReportMetric(float64(paths[1].dur)/float64(paths[0].dur), "passthrough/socket")
		})
	}
}

// TestLiveStandbyXML: the definition domxml.Standby makes from a
// prepared domain is accepted by libvirt, starts paused with QEMU in
// "inmigrate" on the standby's sockets, mapping the given replica RAM
// file; and domxml.Promoted of libvirt's stored standby definition is
// accepted too, as a prepared domain with nothing left to do.
func TestLiveStandbyXML(t *testing.T) {
	if _, err := exec.LookPath("qemu-nbd"); err != nil {
		t.Skip("needs qemu-nbd (install with hack/deps.sh):", err)
	}
	ctx := testenv.Deadline(t, 2*time.Minute)
	img := testenv.Guest(t)
	d := libvirttest.Start(t, libvirttest.Options{})
	c := d.Conn(t)
	dir, err := os.MkdirTemp("", "ftlvs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	dirA, dirB := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, p := range []string{dirA, dirB} {
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	image := filepath.Join(dirB, "replica.img")
	if err := os.WriteFile(image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(image, 8<<20); err != nil {
		t.Fatal(err)
	}
	prepared, _, err := domxml.Prepare(userDomain(img, "sb1", filepath.Join(dirA, "disk.img"), filepath.Join(dirB, "serial.log")),
		domxml.Options{SocketDir: dirA, Peer: "127.0.0.1:7480"})
	if err != nil {
		t.Fatal(err)
	}
	replica := filepath.Join(dirB, "replica.ram")
	sb, err := domxml.Standby(prepared, domxml.StandbyOptions{SocketDir: dirB, RAMFile: replica})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Define(ctx, sb); err != nil {
		t.Fatalf("libvirt refused the standby XML: %v\n%s", err, sb)
	}
	standIns(ctx, t, dirB, image)
	if err := c.Start(ctx, "sb1", true); err != nil {
		t.Fatalf("start the standby paused: %v\n%s", err, d.QEMULog("sb1"))
	}
	t.Cleanup(func() { c.Destroy(context.Background(), "sb1") })
	if st, err := c.State(ctx, "sb1"); err != nil || st.Code != libvirt.StatePaused {
		t.Errorf("standby is %v (%v), want paused", st, err)
	}
	q, err := qmp.Dial(ctx, "unix", filepath.Join(dirB, "qmp.sock"))
	if err != nil {
		t.Fatalf("standby's QMP socket: %v\n%s", err, d.QEMULog("sb1"))
	}
	defer q.Close()
	if st, err := q.QueryStatus(ctx); err != nil || st.Status != "inmigrate" {
		t.Errorf("standby QEMU status %+v %v, want inmigrate", st, err)
	}
	var memPath string
	if err := q.Execute(ctx, "qom-get", map[string]any{"path": "/objects/ftmem", "property": "mem-path"}, &memPath); err != nil {
		t.Fatal(err)
	}
	if memPath != replica {
		t.Errorf("standby maps %q, want the replica %q", memPath, replica)
	}
	if fi, err := os.Stat(replica); err != nil || fi.Size() != 128<<20 {
		t.Errorf("replica RAM file: %v %v", fi, err)
	}

	// The standby's stored definition, as the agent reads it back.
	stored, err := c.XML(ctx, "sb1", true)
	if err != nil {
		t.Fatal(err)
	}
	pr, err := domxml.Promoted(stored, []string{image})
	if err != nil {
		t.Fatalf("Promoted of libvirt's stored standby: %v\n%s", err, stored)
	}
	if err := c.Define(ctx, pr); err != nil {
		t.Fatalf("libvirt refused the promoted XML: %v\n%s", err, pr)
	}
	stored, err = c.XML(ctx, "sb1", true)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(stored, "-incoming") || strings.Contains(stored, "role=") {
		t.Errorf("promoted definition still a standby:\n%s", stored)
	}
	if again, diff, err := domxml.Prepare(stored, domxml.Options{SocketDir: dirB}); err != nil || diff != "" || again != stored {
		t.Errorf("promoted definition is not a prepared domain (%v):\n%s", err, diff)
	}
}
