package domxml

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestMemoryMiB(t *testing.T) {
	for _, c := range []struct {
		unit, value string
		want        int
	}{
		{"", "1048576", 1024},
		{"KiB", "131072", 128},
		{"k", "131073", 129}, // libvirt rounds up to a whole MiB
		{"MiB", "128", 128},
		{"M", " 64\n", 64},
		{"mib", "64", 64},
		{"GiB", "2", 2048},
		{"G", "1", 1024},
		{"b", "134217728", 128},
		{"bytes", "1", 1},
		{"MB", "1000", 954}, // 10^9 bytes = 953.67 MiB
		{"KB", "1024", 1},
		{"TiB", "1", 1 << 20},
	} {
		d := &Domain{Name: "x", Memory: &Memory{Unit: c.unit, Value: c.value}}
		got, err := d.MemoryMiB()
		if err != nil || got != c.want {
			t.Errorf("<memory unit=%q>%q: %d, %v; want %d", c.unit, c.value, got, err, c.want)
		}
	}
	for _, c := range []struct{ unit, value, inErr string }{
		{"parsecs", "1", "unknown unit"},
		{"MiB", "-1", "positive whole number"},
		{"MiB", "0", "positive whole number"},
		{"MiB", "1.5", "positive whole number"},
		{"MiB", "", "positive whole number"},
		{"EiB", "100", "overflows"},
		{"PiB", "1000", "beyond"},
	} {
		d := &Domain{Name: "x", Memory: &Memory{Unit: c.unit, Value: c.value}}
		if _, err := d.MemoryMiB(); !errors.Is(err, ErrBadXML) || !strings.Contains(err.Error(), c.inErr) {
			t.Errorf("<memory unit=%q>%q: error %v, want ErrBadXML saying %q", c.unit, c.value, err, c.inErr)
		}
	}
	if _, err := (&Domain{Name: "x"}).MemoryMiB(); !errors.Is(err, ErrBadXML) || !strings.Contains(err.Error(), "no <memory>") {
		t.Errorf("no <memory>: %v", err)
	}
	// Check and Prepare refuse such a domain, naming the memory.
	in := strings.Replace(readSample(t, "plain.xml"), "<memory unit='KiB'>1048576</memory>", "<memory unit='furlongs'>3</memory>", 1)
	if _, err := Check(in); !errors.Is(err, ErrBadXML) || !strings.Contains(err.Error(), "furlongs") {
		t.Errorf("Check with a bad unit: %v", err)
	}
	if _, _, err := Prepare(in, Options{}); !errors.Is(err, ErrBadXML) {
		t.Errorf("Prepare with a bad unit: %v", err)
	}
}

// TestPrepareResizesRAMFile: after the user changes <memory> of a
// prepared domain, Check says the backend no longer fits and Prepare
// resizes it in place, keeping one pair of arguments and one record.
func TestPrepareResizesRAMFile(t *testing.T) {
	opts := Options{SocketDir: "/s"}
	out, _, err := Prepare(readSample(t, "plain.xml"), opts)
	if err != nil {
		t.Fatal(err)
	}
	grown := strings.Replace(out, "<memory unit='KiB'>1048576</memory>", "<memory unit='GiB'>2</memory>", 1)
	fs, err := CheckWith(grown, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !has(fs, Change, "memory", "does not match <memory> of 2048 MiB") {
		t.Fatalf("no resize finding:\n%s", list(fs))
	}
	if _, err := Standby(grown, StandbyOptions{SocketDir: "/b", RAMFile: "/b/r.ram"}); !errors.Is(err, ErrBadXML) || !strings.Contains(err.Error(), "2048 MiB") {
		t.Errorf("Standby of a domain whose backend does not fit: %v", err)
	}
	fixed, diff, err := Prepare(grown, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(diff, "+    <qemu:arg value='memory-backend-file,id=ftmem,size=2048M,mem-path=/s/guest.ram,share=on'/>") {
		t.Errorf("diff:\n%s", diff)
	}
	if strings.Count(fixed, "id=ftmem") != 1 || strings.Count(fixed, "memory-backend=ftmem") != 1 || strings.Count(fixed, ":memory ") != 1 {
		t.Errorf("duplicated ftmem arguments or records:\n%s", fixed)
	}
	d, _ := ParseDomain([]byte(fixed))
	if m := d.Metadata.Protection.Memory; m == nil || m.SizeMiB != 2048 || m.File != "/s/guest.ram" {
		t.Errorf("record %+v", m)
	}
	if !hasArgPair(d, "-object", "memory-backend-file,id=ftmem,size=2048M,mem-path=/s/guest.ram,share=on") {
		t.Errorf("-object not followed by the resized backend")
	}
	if again, diff, err := Prepare(fixed, opts); err != nil || diff != "" || again != fixed {
		t.Errorf("resized domain not stable (%v):\n%s", err, diff)
	}
}

// TestPrepareUpgradesOldPreparation: a domain prepared before ftmem
// existed (file-backed shared <memoryBacking>, no memory record) gets the
// backend added and nothing else changed.
func TestPrepareUpgradesOldPreparation(t *testing.T) {
	opts := Options{SocketDir: "/s"}
	out, _, err := Prepare(readSample(t, "multi.xml"), opts)
	if err != nil {
		t.Fatal(err)
	}
	old := out
	for _, s := range []string{
		"\t\t\t<ftctl:memory id='ftmem' file='/s/guest.ram' size-mib='512'/>\n",
		"\t\t<qemu:arg value='-object'/>\n\t\t<qemu:arg value='memory-backend-file,id=ftmem,size=512M,mem-path=/s/guest.ram,share=on'/>\n\t\t<qemu:arg value='-machine'/>\n\t\t<qemu:arg value='memory-backend=ftmem'/>\n",
	} {
		if !strings.Contains(old, s) {
			t.Fatalf("test assumption: %q not in\n%s", s, old)
		}
		old = strings.Replace(old, s, "", 1)
	}
	fs, _ := CheckWith(old, opts)
	if !has(fs, Change, "memory", "libvirt's own memory backend") {
		t.Fatalf("findings:\n%s", list(fs))
	}
	again, _, err := Prepare(old, opts)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := ParseDomain([]byte(again))
	if m := d.Metadata.Protection.Memory; m == nil || m.SizeMiB != 512 {
		t.Errorf("record %+v", m)
	}
	if strings.Count(again, "id=ftmem") != 1 {
		t.Errorf("ftmem args:\n%s", again)
	}
}

func TestStandbyAndPromoted(t *testing.T) {
	for _, name := range []string{"plain.xml", "multi.xml", "q35.xml"} {
		t.Run(name, func(t *testing.T) {
			in := readSample(t, name)
			prepared, _, err := Prepare(in, Options{SocketDir: "/run/ftctl/vms/a", Peer: "host-b:7480", Policy: PolicyAuto})
			if err != nil {
				t.Fatal(err)
			}
			pd, _ := ParseDomain([]byte(prepared))
			o := StandbyOptions{SocketDir: "/run/ftctl/b/vm1", RAMFile: "/var/lib/ftctl/replica/vm1.ram"}
			sb, err := Standby(prepared, o)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(sb, "/run/ftctl/vms/a") {
				t.Errorf("standby still names A's socket dir:\n%s", sb)
			}
			sd, err := ParseDomain([]byte(sb))
			if err != nil {
				t.Fatal(err)
			}
			prot := sd.Metadata.Protection
			if prot.Role != RoleStandby || prot.Peer != "" || prot.Policy != "" {
				t.Errorf("standby protection role %q peer %q policy %q", prot.Role, prot.Peer, prot.Policy)
			}
			if EffectivePolicy(prot) != PolicyManual {
				t.Errorf("standby's effective policy %s", EffectivePolicy(prot))
			}
			size, _ := sd.MemoryMiB()
			if m := prot.Memory; m == nil || m.File != o.RAMFile || m.SizeMiB != size {
				t.Errorf("memory record %+v", m)
			}
			if !hasArgPair(sd, "-object", memoryObjectArg(size, o.RAMFile)) || !hasArgPair(sd, "-machine", "memory-backend=ftmem") {
				t.Errorf("ftmem not on the replica file")
			}
			if !hasArgPair(sd, "-incoming", "defer") {
				t.Errorf("no -incoming defer")
			}
			if prot.QMP.Socket != o.SocketDir+"/qmp.sock" || !sd.hasArg("socket,id=ftqmp,path="+o.SocketDir+"/qmp.sock,server=on,wait=off") {
				t.Errorf("QMP socket not moved: %+v", prot.QMP)
			}
			for i, rec := range prot.Disks {
				want := fmt.Sprintf("%s/nbd%d.sock", o.SocketDir, i)
				if rec.Socket != want || rec.Source != pd.Metadata.Protection.Disks[i].Source {
					t.Errorf("disk record %+v", rec)
				}
				ok := false
				for _, d := range sd.Devices.Disks {
					ok = ok || d.Target.Dev == rec.Target && d.Source != nil && len(d.Source.Hosts) == 1 && d.Source.Hosts[0].Socket == want
				}
				if !ok {
					t.Errorf("disk %s not on %s", rec.Target, want)
				}
			}
			for i, rec := range prot.NICs {
				want := fmt.Sprintf("%s/nic%d.sock", o.SocketDir, i)
				if rec.Socket != want || !sd.hasArg(fmt.Sprintf("stream,id=ftnet%d,server=off,addr.type=unix,addr.path=%s", i, want)) {
					t.Errorf("NIC %d not moved to %s: %+v", i, want, rec)
				}
			}
			// Everything else is as prepared: the diff touches only the
			// lines naming what moved, and the role line and the new args.
			for _, l := range strings.Split(Unified("p", "s", prepared, sb), "\n") {
				if strings.HasPrefix(l, "-") && !strings.HasPrefix(l, "---") &&
					!strings.Contains(l, "/run/ftctl/vms/a") && !strings.Contains(l, "protection xmlns") {
					t.Errorf("standby changed an unrelated line: %s", l)
				}
			}
			if _, err := Standby(sb, o); !errors.Is(err, ErrBadXML) {
				t.Errorf("Standby of a standby: %v", err)
			}

			// Promotion.
			var disks []string
			for i := range prot.Disks {
				disks = append(disks, fmt.Sprintf("/var/lib/ftctl/replica/vm1-%d.img", i))
			}
			if _, err := Promoted(sb, disks[1:]); !errors.Is(err, ErrBadOptions) {
				t.Errorf("Promoted with too few disks: %v", err)
			}
			if _, err := Promoted(prepared, disks); !errors.Is(err, ErrBadXML) {
				t.Errorf("Promoted of a primary: %v", err)
			}
			pr, err := Promoted(sb, disks)
			if err != nil {
				t.Fatal(err)
			}
			prd, _ := ParseDomain([]byte(pr))
			pp := prd.Metadata.Protection
			if pp.Role != "" || prd.hasArg("-incoming") {
				t.Errorf("promoted still a standby: role %q", pp.Role)
			}
			for i, rec := range pp.Disks {
				if rec.Source != disks[i] || rec.Format != "raw" || rec.Type != "file" {
					t.Errorf("promoted disk record %+v", rec)
				}
			}
			// The promoted definition is a prepared domain: nothing to do.
			again, diff, err := Prepare(pr, Options{SocketDir: o.SocketDir})
			if err != nil || diff != "" || again != pr {
				t.Errorf("Prepare of the promoted domain is not a no-op (%v):\n%s", err, diff)
			}
			if strings.Count(pr, "-incoming") != 0 || strings.Contains(pr, "\n\n") != strings.Contains(prepared, "\n\n") {
				t.Errorf("promoted XML layout:\n%s", pr)
			}
		})
	}
}

func TestStandbyRefuses(t *testing.T) {
	good, _, err := Prepare(readSample(t, "plain.xml"), Options{SocketDir: "/s"})
	if err != nil {
		t.Fatal(err)
	}
	o := StandbyOptions{SocketDir: "/b", RAMFile: "/b/r.ram"}
	if _, err := Standby(good, o); err != nil {
		t.Fatalf("good: %v", err)
	}
	client, _, err := Prepare(readSample(t, "plain.xml"), Options{SocketDir: "/s", NIC: NICClient, NICPort: 7100})
	if err != nil {
		t.Fatal(err)
	}
	passthrough, _, err := Prepare(readSample(t, "plain.xml"), Options{SocketDir: "/s", QMP: QMPPassthrough})
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		xml   string
		o     StandbyOptions
		sent  error
		inErr string
	}{
		"not prepared":   {readSample(t, "plain.xml"), o, ErrBadXML, "no ftctl metadata"},
		"not xml":        {"<domain>", o, ErrBadXML, ""},
		"client nic":     {client, o, ErrBadXML, "mode \"client\""},
		"passthrough":    {passthrough, o, ErrBadXML, "QMP"},
		"no ftmem args":  {strings.Replace(good, "memory-backend=ftmem", "memory-backend=pc.ram", 1), o, ErrBadXML, "-machine memory-backend=ftmem"},
		"no ftmem rec":   {strings.Replace(good, "<ftctl:memory ", "<ftctl:memoryx ", 1), o, ErrBadXML, "ftmem backend"},
		"moved disk":     {strings.Replace(good, "<host transport='unix' socket='/s/nbd0.sock'/>", "<host transport='unix' socket='/x/nbd0.sock'/>", 1), o, ErrBadXML, "disk vda"},
		"lost nic":       {strings.Replace(good, "addr.path=/s/nic0.sock", "addr.path=/x", 1), o, ErrBadXML, "NIC 52:54:00:6b:3c:58"},
		"size mismatch":  {strings.Replace(good, "size-mib='1024'", "size-mib='512'", 1), o, ErrBadXML, ""},
		"relative dir":   {good, StandbyOptions{SocketDir: "b", RAMFile: "/b/r"}, ErrBadOptions, "socket directory"},
		"no ram file":    {good, StandbyOptions{SocketDir: "/b"}, ErrBadOptions, "RAM file"},
		"comma ram file": {good, StandbyOptions{SocketDir: "/b", RAMFile: "/b/r,share=off"}, ErrBadOptions, "comma"},
	} {
		_, err := Standby(c.xml, c.o)
		if !errors.Is(err, c.sent) || !strings.Contains(err.Error(), c.inErr) {
			t.Errorf("%s: error %v, want %v saying %q", name, err, c.sent, c.inErr)
		}
	}
}
