package domxml

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func readSample(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func samples(t *testing.T) []string {
	t.Helper()
	m, err := filepath.Glob("testdata/*.xml")
	if err != nil || len(m) < 4 {
		t.Fatalf("testdata samples: %v %v", m, err)
	}
	for i := range m {
		m[i] = filepath.Base(m[i])
	}
	return m
}

func TestRoundTripIsByteExact(t *testing.T) {
	for _, name := range samples(t) {
		in := readSample(t, name)
		doc, err := Parse([]byte(in))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if out := doc.String(); out != in {
			t.Errorf("%s: round trip changed the document:\n%s", name, Unified("in", "out", in, out))
		}
	}
}

func TestParseRejectsBadInput(t *testing.T) {
	cases := map[string]string{
		"empty":         "",
		"not xml":       "hello",
		"unclosed":      "<domain><name>x</name>",
		"mismatched":    "<domain><name>x</nam></domain>",
		"two roots":     "<domain><name>x</name></domain><domain/>",
		"text outside":  "<domain><name>x</name></domain>junk",
		"repeated attr": "<domain type='kvm' type='qemu'><name>x</name></domain>",
	}
	for name, in := range cases {
		if _, err := Parse([]byte(in)); !errors.Is(err, ErrBadXML) {
			t.Errorf("%s: Parse error %v, want ErrBadXML", name, err)
		}
	}
	for name, in := range map[string]string{
		"not a domain": "<network><name>x</name></network>",
		"no name":      "<domain type='kvm'></domain>",
		"bad name":     "<domain type='kvm'><name>../etc</name></domain>",
	} {
		if _, err := Check(in); !errors.Is(err, ErrBadXML) {
			t.Errorf("%s: Check error %v, want ErrBadXML", name, err)
		}
		if _, _, err := Prepare(in, Options{}); !errors.Is(err, ErrBadXML) {
			t.Errorf("%s: Prepare error %v, want ErrBadXML", name, err)
		}
	}
}

func TestBadOptions(t *testing.T) {
	in := readSample(t, "plain.xml")
	for name, o := range map[string]Options{
		"relative dir":   {SocketDir: "run/ftctl"},
		"comma in dir":   {SocketDir: "/run/a,b"},
		"client no port": {NIC: NICClient},
		"unknown nic":    {NIC: "tap"},
		"unknown qmp":    {QMP: "telnet"},
	} {
		if _, _, err := Prepare(in, o); !errors.Is(err, ErrBadOptions) {
			t.Errorf("%s: error %v, want ErrBadOptions", name, err)
		}
	}
}

// has reports whether fs has a finding of severity sev whose area starts
// with area and whose problem contains problem.
func has(fs []Finding, sev Severity, area, problem string) bool {
	for _, f := range fs {
		if f.Severity == sev && strings.HasPrefix(f.Area, area) && strings.Contains(f.Problem, problem) {
			return true
		}
	}
	return false
}

func TestCheckFindings(t *testing.T) {
	type want struct {
		sev           Severity
		area, problem string
	}
	cases := map[string][]want{
		"plain.xml": {
			{Change, "memory", "guest RAM in libvirt's own memory backend"},
			{Change, "disk vda", "file /var/lib/libvirt/images/web.img"},
			{Change, "nic 52:54:00:6b:3c:58", "interface type network"},
			{Change, "qmp", "no QMP socket"},
			{Info, "domain", "type kvm"},
			{Warning, "device video", "video model cirrus"},
		},
		"multi.xml": {
			{Change, "disk vda", "file /srv/vm/db-root.img"},
			{Change, "disk vdb", "block /dev/vg0/db-data"},
			{Warning, "disk hdc", "read-only cdrom /srv/iso/tools.iso"},
			{Change, "nic 52:54:00:aa:00:01", "interface type bridge"},
			{Change, "nic #1", "interface type network"},
			{Info, "nic #1", "no MAC"},
		},
		"q35-memfd.xml": {
			{Blocker, "memory", "2 NUMA cell(s)"},
			{Warning, "cpu", "host-passthrough"},
		},
		"q35.xml": {
			{Change, "memory", "guest RAM in libvirt's own memory backend"},
			{Warning, "cpu", "host-passthrough"},
		},
		"qcow2.xml": {
			{Change, "memory", "guest RAM in libvirt's own memory backend"},
			{Blocker, "disk vda", "image format qcow2"},
			{Blocker, "disk vdb", "network disk (rbd)"},
			{Blocker, "device hostdev", "1 passed-through"},
			{Blocker, "nic 52:54:00:00:00:99", "interface type hostdev"},
		},
	}
	for name, wants := range cases {
		fs, err := Check(readSample(t, name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, w := range wants {
			if !has(fs, w.sev, w.area, w.problem) {
				t.Errorf("%s: no [%s] %s: %q finding in:\n%s", name, w.sev, w.area, w.problem, list(fs))
			}
		}
		if name != "qcow2.xml" && name != "q35-memfd.xml" && len(Blockers(fs)) > 0 {
			t.Errorf("%s: unexpected blockers:\n%s", name, list(Blockers(fs)))
		}
	}
}

func list(fs []Finding) string {
	var b strings.Builder
	for _, f := range fs {
		b.WriteString("  " + f.String() + "\n")
	}
	return b.String()
}

func TestPrepareRefusesBlockers(t *testing.T) {
	_, _, err := Prepare(readSample(t, "qcow2.xml"), Options{})
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Prepare error %v, want ErrUnsupported", err)
	}
	for _, part := range []string{"qcow2", "rbd", "hostdev"} {
		if !strings.Contains(err.Error(), part) {
			t.Errorf("error %q does not name %s", err, part)
		}
	}
}

// elementsAndComments lists every element start tag and comment of a
// document, as written, so a test can assert they survive a rewrite.
var tagRE = regexp.MustCompile(`<[A-Za-z!][^>]*>`)

func TestPrepareEachSample(t *testing.T) {
	for _, name := range []string{"plain.xml", "multi.xml", "q35.xml"} {
		for _, mode := range []NICMode{NICStream, NICClient} {
			t.Run(name+"/"+string(mode), func(t *testing.T) {
				in := readSample(t, name)
				opts := Options{SocketDir: "/run/ftctl/vms/x", NIC: mode, NICPort: 7100}
				out, diff, err := Prepare(in, opts)
				if err != nil {
					t.Fatal(err)
				}
				if diff == "" || out == in {
					t.Fatal("Prepare changed nothing")
				}
				if got := applyUnified(t, in, diff); got != out {
					t.Fatalf("applying the diff does not give the new XML:\n%s", Unified("applied", "prepared", got, out))
				}
				checkPrepared(t, in, out, opts)

				// Idempotent: a second Prepare changes nothing.
				out2, diff2, err := Prepare(out, opts)
				if err != nil {
					t.Fatal(err)
				}
				if out2 != out || diff2 != "" {
					t.Fatalf("second Prepare changed the XML:\n%s", diff2)
				}
				// Nothing left to change.
				fs, err := CheckWith(out, opts)
				if err != nil {
					t.Fatal(err)
				}
				for _, f := range fs {
					if f.Severity == Change || f.Severity == Blocker {
						t.Errorf("after Prepare: %s", f)
					}
				}
			})
		}
	}
}

// checkPrepared asserts, from the typed view of the new XML, that each
// requirement holds, and that what Prepare did not own survived.
func checkPrepared(t *testing.T, in, out string, opts Options) {
	t.Helper()
	before, err := ParseDomain([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	d, err := ParseDomain([]byte(out))
	if err != nil {
		t.Fatalf("prepared XML does not parse: %v\n%s", err, out)
	}
	if d.Metadata == nil || d.Metadata.Protection == nil {
		t.Fatalf("no ftctl metadata in:\n%s", out)
	}
	prot := d.Metadata.Protection
	// Guest RAM: the ftmem backend, sized like <memory>, in the socket
	// directory, recorded; libvirt's own <memoryBacking> as it was.
	size, err := before.MemoryMiB()
	if err != nil {
		t.Fatal(err)
	}
	ram := opts.SocketDir + "/guest.ram"
	if m := prot.Memory; m == nil || m.ID != "ftmem" || m.File != ram || m.SizeMiB != size {
		t.Errorf("memory record %+v, want ftmem %s %d MiB", m, ram, size)
	}
	obj := fmt.Sprintf("memory-backend-file,id=ftmem,size=%dM,mem-path=%s,share=on", size, ram)
	if !hasArgPair(d, "-object", obj) || !hasArgPair(d, "-machine", "memory-backend=ftmem") {
		t.Errorf("no -object %s / -machine memory-backend=ftmem in %+v", obj, d.Commandline)
	}
	mbRE := regexp.MustCompile(`(?s)<memoryBacking.*?</memoryBacking>`)
	if a, b := mbRE.FindString(in), mbRE.FindString(out); a != b {
		t.Errorf("memoryBacking changed: %q -> %q", a, b)
	}
	if prot.QMP == nil || prot.QMP.Socket != opts.SocketDir+"/qmp.sock" {
		t.Errorf("QMP record %+v", prot.QMP)
	}
	if !d.hasArg("socket,id=ftqmp,path=" + opts.SocketDir + "/qmp.sock,server=on,wait=off") {
		t.Errorf("no QMP chardev argument")
	}

	// Every writable disk of the original is now NBD, recorded with its
	// original source.
	var wantDisks int
	for i, bd := range before.Devices.Disks {
		nd := d.Devices.Disks[i]
		if bd.Device == "cdrom" || bd.ReadOnly != nil {
			if nd.Type != bd.Type {
				t.Errorf("read-only disk %s changed type to %s", bd.Target.Dev, nd.Type)
			}
			continue
		}
		wantDisks++
		if nd.Type != "network" || nd.Source == nil || nd.Source.Protocol != "nbd" || len(nd.Source.Hosts) != 1 {
			t.Errorf("disk %s not NBD: %+v", bd.Target.Dev, nd.Source)
			continue
		}
		var rec *ProtectedDisk
		for i := range prot.Disks {
			if prot.Disks[i].Target == bd.Target.Dev {
				rec = &prot.Disks[i]
			}
		}
		if rec == nil || rec.Socket != nd.Source.Hosts[0].Socket || rec.Source != bd.Source.File+bd.Source.Dev || rec.Type != bd.Type {
			t.Errorf("disk %s: record %+v, source %+v", bd.Target.Dev, rec, nd.Source.Hosts[0])
		}
		if nd.Driver == nil || nd.Driver.Type != "raw" || nd.Driver.IO == "native" {
			t.Errorf("disk %s driver %+v", bd.Target.Dev, nd.Driver)
		}
	}
	if len(prot.Disks) != wantDisks {
		t.Errorf("%d disk records, want %d", len(prot.Disks), wantDisks)
	}
	if strings.Contains(out, "<backingStore") {
		t.Errorf("backingStore left on an NBD disk")
	}

	// NICs.
	if len(prot.NICs) != len(before.Devices.Interfaces) {
		t.Fatalf("%d NIC records for %d interfaces", len(prot.NICs), len(before.Devices.Interfaces))
	}
	for i, rec := range prot.NICs {
		if !strings.Contains(rec.Original.Inner, "<interface") {
			t.Errorf("NIC %d: original interface not recorded: %q", i, rec.Original.Inner)
		}
		if bi := before.Devices.Interfaces[i]; bi.MAC != nil && !strings.EqualFold(bi.MAC.Address, rec.MAC) {
			t.Errorf("NIC %d: MAC %s, was %s", i, rec.MAC, bi.MAC.Address)
		}
		switch opts.NIC {
		case NICStream:
			if len(d.Devices.Interfaces) != 0 {
				t.Errorf("stream mode left %d <interface> elements", len(d.Devices.Interfaces))
			}
			if !d.hasArg(fmt.Sprintf("stream,id=ftnet%d,server=off,addr.type=unix,addr.path=%s", i, rec.Socket)) {
				t.Errorf("NIC %d: no -netdev stream for %s", i, rec.Socket)
			}
			if !d.hasArgContaining(fmt.Sprintf("netdev=ftnet%d,mac=%s,bus=", i, rec.MAC)) {
				t.Errorf("NIC %d: no -device with mac %s", i, rec.MAC)
			}
		case NICClient:
			ni := d.Devices.Interfaces[i]
			if ni.Type != "client" || ni.Source == nil || ni.Source.Address != "127.0.0.1" || ni.Source.Port != strconv.Itoa(opts.NICPort+i) {
				t.Errorf("NIC %d: %+v / %+v", i, ni, ni.Source)
			}
			if ni.MAC == nil || !strings.EqualFold(ni.MAC.Address, rec.MAC) {
				t.Errorf("NIC %d: MAC lost", i)
			}
		}
	}

	// What Prepare does not own survives verbatim: every start tag and
	// comment of the original outside the replaced devices.
	replaced := regexp.MustCompile(`^<(disk type=.(file|block). device=.disk.|source|/?backingStore|driver|interface|mac|model|boot|bandwidth|inbound|address|target dev='vnet|alias name='net|domain|\?xml|metadata)`)
	for _, tag := range tagRE.FindAllString(in, -1) {
		if replaced.MatchString(tag) {
			continue
		}
		if !strings.Contains(out, tag) {
			t.Errorf("lost %s", tag)
		}
	}
}

func TestPrepareStreamNICKeepsPCIAddressAndBoot(t *testing.T) {
	out, _, err := Prepare(readSample(t, "plain.xml"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	d, _ := ParseDomain([]byte(out))
	if !d.hasArgContaining("virtio-net-pci,id=ftnet0-dev,netdev=ftnet0,mac=52:54:00:6b:3c:58,bus=pci.0,addr=0x03") {
		t.Errorf("NIC not at its original slot 0x03:\n%s", out)
	}
	if !d.hasArg("stream,id=ftnet0,server=off,addr.type=unix,addr.path=/run/ftctl/vms/web/nic0.sock") {
		t.Errorf("default socket dir not used")
	}
	// The hand-written domain: no addresses; a free high slot, and the
	// boot order moved to bootindex.
	out, _, err = Prepare(readSample(t, "multi.xml"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	d, _ = ParseDomain([]byte(out))
	if !d.hasArgContaining("mac=52:54:00:aa:00:01,bus=pci.0,addr=0x1e,bootindex=2") {
		t.Errorf("first NIC placement:\n%s", out)
	}
	if !d.hasArgContaining("e1000,id=ftnet1-dev,netdev=ftnet1,mac=" + derivedMAC("db", 1) + ",bus=pci.0,addr=0x1d") {
		t.Errorf("second NIC placement:\n%s", out)
	}
	// q35: a NIC behind root port 1 stays there.
	out, _, err = Prepare(readSample(t, "q35.xml"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	d, _ = ParseDomain([]byte(out))
	if !d.hasArgContaining("mac=52:54:00:10:20:30,bus=pci.1,addr=0x00") {
		t.Errorf("q35 NIC placement:\n%s", out)
	}
	// The user's own qemu:commandline arguments and env stay first.
	if d.Commandline == nil || len(d.Commandline.Args) < 2 || d.Commandline.Args[0].Value != "-fw_cfg" {
		t.Errorf("user's qemu args lost: %+v", d.Commandline)
	}
	if !strings.Contains(out, "<qemu:env name='QEMU_AUDIO_DRV' value='none'/>") {
		t.Errorf("qemu:env lost")
	}
	if strings.Count(out, "xmlns:qemu=") != 1 {
		t.Errorf("qemu namespace declared %d times", strings.Count(out, "xmlns:qemu="))
	}
}

func TestPreparePassthroughAddsNoQMPSocket(t *testing.T) {
	out, _, err := Prepare(readSample(t, "plain.xml"), Options{QMP: QMPPassthrough})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "ftqmp") || strings.Contains(out, ":qmp ") {
		t.Errorf("passthrough mode added a QMP socket")
	}
	fs, _ := CheckWith(out, Options{QMP: QMPPassthrough})
	if !has(fs, Info, "qmp", "pass-through") {
		t.Errorf("no pass-through finding:\n%s", list(fs))
	}
}

func TestPrepareKeepsOtherMetadataAndUnknownFtctlElements(t *testing.T) {
	in := strings.Replace(readSample(t, "plain.xml"), "  </metadata>",
		"    <ft:protection xmlns:ft='"+Namespace+"'>\n      <ft:peer host='b.example'/>\n    </ft:protection>\n  </metadata>", 1)
	out, _, err := Prepare(in, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"<ft:peer host='b.example'/>", `<libosinfo:os id="http://debian.org/debian/12"/>`, "<ft:disk target='vda'", "<ft:qmp "} {
		if !strings.Contains(out, s) {
			t.Errorf("missing %s in:\n%s", s, out)
		}
	}
	if strings.Count(out, "protection xmlns") != 1 {
		t.Errorf("a second protection element was added:\n%s", out)
	}
}

func TestMissingMetadataAndDevicesOrder(t *testing.T) {
	in := "<domain type='qemu'>\n  <name>tiny</name>\n  <memory unit='MiB'>64</memory>\n  <devices>\n    <disk type='file' device='disk'>\n      <source file='/tmp/tiny.img'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n  </devices>\n</domain>\n"
	out, diff, err := Prepare(in, Options{SocketDir: "/s"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"  <name>tiny</name>\n  <metadata>\n    <ftctl:protection xmlns:ftctl='" + Namespace + "'>\n",
		"      <ftctl:memory id='ftmem' file='/s/guest.ram' size-mib='64'/>\n",
		"    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source protocol='nbd' name='disk'>\n        <host transport='unix' socket='/s/nbd0.sock'/>\n      </source>\n      <target dev='vda' bus='virtio'/>\n",
		"  </devices>\n  <qemu:commandline>\n    <qemu:arg value='-object'/>\n    <qemu:arg value='memory-backend-file,id=ftmem,size=64M,mem-path=/s/guest.ram,share=on'/>\n    <qemu:arg value='-machine'/>\n    <qemu:arg value='memory-backend=ftmem'/>\n    <qemu:arg value='-chardev'/>\n",
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("missing, with this indentation:\n%s\nin:\n%s", w, out)
		}
	}
	if !strings.HasPrefix(diff, "--- a/tiny.xml\n+++ b/tiny.xml\n@@ ") {
		t.Errorf("diff header: %q", diff[:min(len(diff), 60)])
	}
}

func TestUnifiedAppliesOnRandomInput(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	gen := func(n int) string {
		var b strings.Builder
		for i := 0; i < n; i++ {
			fmt.Fprintf(&b, "l%d\n", r.Intn(6))
		}
		return b.String()
	}
	for i := 0; i < 300; i++ {
		a, b := gen(r.Intn(30)), gen(r.Intn(30))
		d := Unified("a", "b", a, b)
		if a == b {
			if d != "" {
				t.Fatalf("equal inputs gave a diff")
			}
			continue
		}
		if got := applyUnified(t, a, d); got != b {
			t.Fatalf("case %d: applying\n%s\nto\n%s\ngave\n%s\nwant\n%s", i, d, a, got, b)
		}
	}
}

// applyUnified applies a unified diff strictly: context and removed lines
// must match a exactly, at the positions the hunk headers give.
func applyUnified(t *testing.T, a, diff string) string {
	t.Helper()
	src := splitLines(a)
	var out []string
	pos := 0
	hdr := regexp.MustCompile(`^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@$`)
	lines := splitLines(diff)
	if len(lines) < 2 || !strings.HasPrefix(lines[0], "--- ") || !strings.HasPrefix(lines[1], "+++ ") {
		t.Fatalf("bad diff header:\n%s", diff)
	}
	for _, l := range lines[2:] {
		if m := hdr.FindStringSubmatch(l); m != nil {
			start, _ := strconv.Atoi(m[1])
			n := 1
			if m[2] != "" {
				n, _ = strconv.Atoi(m[2])
			}
			if n > 0 {
				start--
			}
			if start < pos {
				t.Fatalf("hunk %q goes backwards", l)
			}
			out = append(out, src[pos:start]...)
			pos = start
			continue
		}
		if l == "" {
			t.Fatalf("empty diff line")
		}
		switch l[0] {
		case ' ', '-':
			if pos >= len(src) || src[pos] != l[1:] {
				t.Fatalf("diff line %q does not match source line %d", l, pos+1)
			}
			if l[0] == ' ' {
				out = append(out, src[pos])
			}
			pos++
		case '+':
			out = append(out, l[1:])
		default:
			t.Fatalf("bad diff line %q", l)
		}
	}
	out = append(out, src[pos:]...)
	s := strings.Join(out, "\n")
	if len(out) > 0 && (a == "" || strings.HasSuffix(a, "\n")) {
		s += "\n"
	}
	return s
}

// hasArgPair reports whether the domain's qemu:commandline has flag
// immediately followed by value.
func hasArgPair(d *Domain, flag, value string) bool {
	if d.Commandline == nil {
		return false
	}
	a := d.Commandline.Args
	for i := 0; i+1 < len(a); i++ {
		if a[i].Value == flag && a[i+1].Value == value {
			return true
		}
	}
	return false
}

func TestCheckVideo(t *testing.T) {
	base := readSample(t, "plain.xml")
	cirrus := regexp.MustCompile(`(?s)<video>.*?</video>`)
	if !cirrus.MatchString(base) {
		t.Fatal("plain.xml has no <video>")
	}
	cases := map[string]string{
		"<video><model type='none'/></video>":                                        "",
		"<video><model type='qxl' ram='65536' vram='65536' vgamem='16384'/></video>": "video model qxl: its 144 MiB of video RAM",
		"<video/>": "video model default: its video RAM",
		"<video><model type='vga' vram='bogus'/></video>": "video model vga: its video RAM",
	}
	for video, want := range cases {
		fs, err := Check(cirrus.ReplaceAllString(base, video))
		if err != nil {
			t.Fatalf("%s: %v", video, err)
		}
		var got []string
		for _, f := range fs {
			if f.Area == "device video" {
				if f.Severity != Warning {
					t.Errorf("%s: severity %s, want warning", video, f.Severity)
				}
				got = append(got, f.Problem+": "+f.Why)
			}
		}
		switch {
		case want == "" && len(got) != 0:
			t.Errorf("%s: video findings %q, want none", video, got)
		case want != "" && (len(got) != 1 || !strings.HasPrefix(got[0], want)):
			t.Errorf("%s: video findings %q, want one starting %q", video, got, want)
		}
	}
}
