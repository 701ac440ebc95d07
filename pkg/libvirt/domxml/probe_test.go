package domxml

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// changedLines returns the lines a unified diff adds and removes.
func changedLines(diff string) (added, removed []string) {
	for _, l := range strings.Split(diff, "\n") {
		switch {
		case strings.HasPrefix(l, "+++") || strings.HasPrefix(l, "---"):
		case strings.HasPrefix(l, "+"):
			added = append(added, l[1:])
		case strings.HasPrefix(l, "-"):
			removed = append(removed, l[1:])
		}
	}
	return added, removed
}

func probeOf(t *testing.T, x string) *Probe {
	t.Helper()
	d, err := ParseDomain([]byte(x))
	if err != nil {
		t.Fatal(err)
	}
	if d.Metadata == nil || d.Metadata.Protection == nil {
		t.Fatal("no protection record")
	}
	return d.Metadata.Protection.Probe
}

func TestPrepareRecordsProbe(t *testing.T) {
	in := readSample(t, "plain.xml")
	opts := Options{SocketDir: "/s", Peer: "host-b:7480", ProbeAddrs: []string{"10.0.0.5", "FD00::5", "10.0.0.5"}, ProbeTCPPorts: []int{22, 80, 22}}
	out, diff, err := Prepare(in, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "<ftctl:probe addrs='10.0.0.5,fd00::5' tcp='22,80'/>") {
		t.Fatalf("no probe record in:\n%s", out)
	}
	if !strings.Contains(diff, "ftctl:probe") {
		t.Errorf("diff does not show the probe:\n%s", diff)
	}
	d, _ := ParseDomain([]byte(out))
	addrs, ports := d.Metadata.Protection.ProbeSpec()
	if !slices.Equal(addrs, []string{"10.0.0.5", "fd00::5"}) || !slices.Equal(ports, []int{22, 80}) {
		t.Errorf("ProbeSpec = %v %v", addrs, ports)
	}
	addrs[0] = "changed"
	if a, _ := d.Metadata.Protection.ProbeSpec(); a[0] != "10.0.0.5" {
		t.Error("ProbeSpec returned the record's own slice")
	}
	if a, p := (*Protection)(nil).ProbeSpec(); a != nil || p != nil {
		t.Error("ProbeSpec of nil protection")
	}
	if !strings.Contains(out, `<libosinfo:os id="http://debian.org/debian/12"/>`) {
		t.Error("other metadata lost")
	}

	// The same probe (spelled differently), or none given: no change.
	for _, o := range []Options{opts, {SocketDir: "/s"}, {SocketDir: "/s", ProbeAddrs: []string{"10.0.0.5", "fd00:0::5"}, ProbeTCPPorts: []int{22, 80}}} {
		again, diff, err := Prepare(out, o)
		if err != nil || diff != "" || again != out {
			t.Fatalf("Prepare %+v not a no-op (%v):\n%s", o, err, diff)
		}
	}

	// A new probe replaces the record in place: one line out, one in.
	changed, diff, err := Prepare(out, Options{SocketDir: "/s", ProbeAddrs: []string{"192.168.1.9"}})
	if err != nil {
		t.Fatal(err)
	}
	add, rm := changedLines(diff)
	if len(add) != 1 || len(rm) != 1 || !strings.Contains(add[0], "<ftctl:probe addrs='192.168.1.9'/>") || !strings.Contains(rm[0], "ftctl:probe") {
		t.Errorf("replacing the probe: +%q -%q", add, rm)
	}
	if p := probeOf(t, changed); !slices.Equal(p.Addrs, []string{"192.168.1.9"}) || p.TCPPorts != nil {
		t.Errorf("replaced probe %+v", p)
	}

	// An empty non-nil address list removes the record, and only it.
	cleared, diff, err := Prepare(changed, Options{SocketDir: "/s", ProbeAddrs: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	add, rm = changedLines(diff)
	if len(add) != 0 || len(rm) != 1 || !strings.Contains(rm[0], "ftctl:probe") {
		t.Errorf("clearing the probe: +%q -%q", add, rm)
	}
	if p := probeOf(t, cleared); p != nil {
		t.Errorf("probe after clearing: %+v", p)
	}
	// Clearing without output changes: the same as before the probe was
	// added, but for the peer.
	base, _, _ := Prepare(in, Options{SocketDir: "/s", Peer: "host-b:7480"})
	if cleared != base {
		t.Errorf("cleared domain differs from one prepared without a probe:\n%s", Unified("base", "cleared", base, cleared))
	}
	if again, diff, _ := Prepare(cleared, Options{SocketDir: "/s", ProbeAddrs: []string{}}); diff != "" || again != cleared {
		t.Errorf("clearing twice changed it:\n%s", diff)
	}
}

func TestProbeOnAlreadyPreparedDomain(t *testing.T) {
	// Devices prepared before, probe added later: only the record line
	// is new, inside ftctl's existing element.
	in := readSample(t, "multi.xml")
	out, _, err := Prepare(in, Options{SocketDir: "/s"})
	if err != nil {
		t.Fatal(err)
	}
	with, diff, err := Prepare(out, Options{SocketDir: "/s", ProbeAddrs: []string{"10.1.2.3"}, ProbeTCPPorts: []int{443}})
	if err != nil {
		t.Fatal(err)
	}
	add, rm := changedLines(diff)
	if len(add) != 1 || len(rm) != 0 || strings.TrimSpace(add[0]) != "<ftctl:probe addrs='10.1.2.3' tcp='443'/>" {
		t.Errorf("adding a probe to a prepared domain: +%q -%q", add, rm)
	}
	if p := probeOf(t, with); !slices.Equal(p.Addrs, []string{"10.1.2.3"}) || !slices.Equal(p.TCPPorts, []int{443}) {
		t.Errorf("probe %+v", p)
	}
}

func TestCheckProbeFindings(t *testing.T) {
	in := readSample(t, "plain.xml")
	find := func(fs []Finding) []Finding { return findArea(fs, "probe") }

	fs, err := CheckWith(in, Options{SocketDir: "/s", Peer: "host-b:7480"})
	if err != nil {
		t.Fatal(err)
	}
	pf := find(fs)
	if len(pf) != 1 || pf[0].Severity != Warning || !strings.Contains(pf[0].Why, "it will not promote on its own") ||
		!strings.Contains(pf[0].Fix, "--probe-addr") {
		t.Errorf("peer without probe: %v", pf)
	}
	fs, _ = CheckWith(in, Options{SocketDir: "/s"})
	if pf := find(fs); len(pf) != 1 || pf[0].Severity != Info || !strings.Contains(pf[0].Problem, "no probe") {
		t.Errorf("no peer, no probe: %v", pf)
	}
	fs, _ = CheckWith(in, Options{SocketDir: "/s", Peer: "host-b:7480", ProbeAddrs: []string{"10.0.0.5"}, ProbeTCPPorts: []int{22}})
	pf = find(fs)
	if len(pf) != 2 || pf[0].Severity != Change || !strings.Contains(pf[0].Fix, "10.0.0.5 (TCP 22)") ||
		pf[1].Severity != Info || !strings.Contains(pf[1].Problem, "probe 10.0.0.5 (TCP 22)") {
		t.Errorf("probe to record: %v", pf)
	}

	out, _, _ := Prepare(in, Options{SocketDir: "/s", Peer: "host-b:7480", ProbeAddrs: []string{"10.0.0.5"}})
	fs, _ = Check(out)
	if pf := find(fs); len(pf) != 1 || pf[0].Severity != Info || pf[0].Problem != "probe 10.0.0.5 (ICMP only)" {
		t.Errorf("recorded probe: %v", pf)
	}
	fs, _ = CheckWith(out, Options{SocketDir: "/s", ProbeAddrs: []string{}})
	if pf := find(fs); len(pf) != 2 || pf[0].Severity != Change || pf[0].Fix != "remove the probe record" || pf[1].Severity != Warning {
		t.Errorf("removing the probe of a paired domain: %v", pf)
	}
	fs, _ = CheckWith(in, Options{SocketDir: "/s", ProbeAddrs: []string{"127.0.0.1"}})
	if !has(fs, Warning, "probe", "loopback probe address 127.0.0.1") {
		t.Errorf("loopback probe: %v", find(fs))
	}
}

func TestBadProbeOptions(t *testing.T) {
	in := readSample(t, "plain.xml")
	cases := []struct {
		addrs []string
		ports []int
		name  string // what the error must name
	}{
		{[]string{"10.0.0.300"}, nil, "10.0.0.300"},
		{[]string{"host-b"}, nil, "host-b"},
		{[]string{"10.0.0.1,10.0.0.2"}, nil, "10.0.0.1,10.0.0.2"},
		{[]string{"10.0.0.1'"}, nil, "10.0.0.1'"},
		{[]string{""}, nil, `""`},
		{[]string{"0.0.0.0"}, nil, "0.0.0.0"},
		{[]string{"::"}, nil, `"::"`},
		{[]string{"224.0.0.1"}, nil, "224.0.0.1"},
		{[]string{"255.255.255.255"}, nil, "255.255.255.255"},
		{[]string{"10.0.0.1/24"}, nil, "10.0.0.1/24"},
		{[]string{"10.0.0.1"}, []int{0}, "port 0"},
		{[]string{"10.0.0.1"}, []int{22, 65536}, "65536"},
		{[]string{"10.0.0.1"}, []int{-1}, "-1"},
		{nil, []int{22}, "22"},
		{[]string{}, []int{22}, "22"},
	}
	for _, c := range cases {
		_, _, err := Prepare(in, Options{SocketDir: "/s", ProbeAddrs: c.addrs, ProbeTCPPorts: c.ports})
		if !errors.Is(err, ErrBadOptions) || !strings.Contains(err.Error(), c.name) {
			t.Errorf("probe %q ports %v: err %v, want ErrBadOptions naming %s", c.addrs, c.ports, err, c.name)
		}
		if _, err := CheckWith(in, Options{SocketDir: "/s", ProbeAddrs: c.addrs, ProbeTCPPorts: c.ports}); !errors.Is(err, ErrBadOptions) {
			t.Errorf("CheckWith probe %q ports %v: %v", c.addrs, c.ports, err)
		}
	}
	// A zone is an address too (link-local probes).
	if _, err := NewProbe([]string{"fe80::1%eth0"}, nil); err != nil {
		t.Errorf("zoned address: %v", err)
	}
}

// withProbeRecord puts a hand-written probe element into a prepared
// domain's ftctl record.
func withProbeRecord(t *testing.T, elem string) string {
	t.Helper()
	out, _, err := Prepare(readSample(t, "plain.xml"), Options{SocketDir: "/s"})
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(out, "</ftctl:protection>")
	if i < 0 {
		t.Fatal("no protection element")
	}
	return out[:i] + elem + out[i:]
}

func TestBadProbeRecord(t *testing.T) {
	cases := map[string]string{
		"<ftctl:probe addrs='10.0.0.300'/>":                              "10.0.0.300",
		"<ftctl:probe addrs='10.0.0.1' tcp='22,ssh'/>":                   `"ssh"`,
		"<ftctl:probe addrs='10.0.0.1' tcp='0'/>":                        `"0"`,
		"<ftctl:probe addrs='10.0.0.1' tcp='70000'/>":                    "70000",
		"<ftctl:probe tcp='22'/>":                                        "no addrs",
		"<ftctl:probe addrs=' , '/>":                                     "no addrs",
		"<ftctl:probe addrs='0.0.0.0'/>":                                 "0.0.0.0",
		"<ftctl:probe addrs='10.0.0.1'/><ftctl:probe addrs='10.0.0.2'/>": "more than one",
	}
	for elem, name := range cases {
		x := withProbeRecord(t, elem)
		_, err := ParseDomain([]byte(x))
		if !errors.Is(err, ErrBadXML) || !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "probe") {
			t.Errorf("%s: ParseDomain err %v, want ErrBadXML naming %s", elem, err, name)
		}
		if _, err := Check(x); !errors.Is(err, ErrBadXML) {
			t.Errorf("%s: Check err %v", elem, err)
		}
		if _, _, err := Prepare(x, Options{SocketDir: "/s"}); !errors.Is(err, ErrBadXML) {
			t.Errorf("%s: Prepare without probe options: %v", elem, err)
		}
		// New probe options repair it.
		fixed, diff, err := Prepare(x, Options{SocketDir: "/s", ProbeAddrs: []string{"10.9.9.9"}})
		if err != nil {
			t.Errorf("%s: repair: %v", elem, err)
			continue
		}
		if p := probeOf(t, fixed); p == nil || !slices.Equal(p.Addrs, []string{"10.9.9.9"}) || strings.Count(fixed, ":probe") != 1 {
			t.Errorf("%s: repaired probe %+v:\n%s", elem, p, diff)
		}
		fs, _ := CheckWith(x, Options{SocketDir: "/s", ProbeAddrs: []string{"10.9.9.9"}})
		if !has(fs, Change, "probe", "malformed probe record") {
			t.Errorf("%s: Check with a replacing probe: %v", elem, findArea(fs, "probe"))
		}
		cleared, _, err := Prepare(x, Options{SocketDir: "/s", ProbeAddrs: []string{}})
		if err != nil || strings.Contains(cleared, ":probe") {
			t.Errorf("%s: clearing a malformed record: %v", elem, err)
		}
	}
	// A probe element ftctl's tree cannot find under its prefix, though
	// it is in ftctl's namespace, is refused rather than duplicated.
	x := withProbeRecord(t, "<p:probe xmlns:p='"+Namespace+"' addrs='10.0.0.1'/>")
	if _, _, err := Prepare(x, Options{SocketDir: "/s", ProbeAddrs: []string{"10.0.0.2"}}); !errors.Is(err, ErrBadXML) {
		t.Errorf("probe under another prefix: %v", err)
	}
	// Unknown attributes on the record are ignored and survive a rewrite.
	x = withProbeRecord(t, "<ftctl:probe future='x' addrs='10.0.0.1'/>")
	out, _, err := Prepare(x, Options{SocketDir: "/s", ProbeAddrs: []string{"10.0.0.2"}})
	if err != nil || !strings.Contains(out, "<ftctl:probe future='x' addrs='10.0.0.2'/>") {
		t.Errorf("unknown probe attribute: %v\n%s", err, out)
	}
}

func TestStandbyAndPromotedKeepProbe(t *testing.T) {
	for _, name := range []string{"plain.xml", "multi.xml", "q35.xml"} {
		in := readSample(t, name)
		opts := Options{SocketDir: "/run/ftctl/vms/a", Peer: "host-b:7480", ProbeAddrs: []string{"10.0.0.5", "fd00::5"}, ProbeTCPPorts: []int{22}}
		prepared, _, err := Prepare(in, opts)
		if err != nil {
			t.Fatal(err)
		}
		want := probeOf(t, prepared)
		sb, err := Standby(prepared, StandbyOptions{SocketDir: "/run/ftctl/b/vm1", RAMFile: "/var/lib/ftctl/vm1.ram"})
		if err != nil {
			t.Fatal(err)
		}
		if got := probeOf(t, sb); !got.equal(want) {
			t.Errorf("%s: standby probe %+v, want %+v", name, got, want)
		}
		d, _ := ParseDomain([]byte(sb))
		disks := make([]string, len(d.Metadata.Protection.Disks))
		for i := range disks {
			disks[i] = "/var/lib/ftctl/replica.img"
		}
		pr, err := Promoted(sb, disks)
		if err != nil {
			t.Fatal(err)
		}
		if got := probeOf(t, pr); !got.equal(want) {
			t.Errorf("%s: promoted probe %+v, want %+v", name, got, want)
		}
		// Re-paired from B: the promoted domain needs only the peer.
		fs, _ := CheckWith(pr, Options{SocketDir: "/run/ftctl/b/vm1", Peer: "host-a:7480"})
		if !has(fs, Info, "probe", "probe 10.0.0.5, fd00::5 (TCP 22)") || has(fs, Warning, "probe", "") {
			t.Errorf("%s: promoted domain's probe findings: %v", name, findArea(fs, "probe"))
		}
		if again, diff, err := Prepare(pr, Options{SocketDir: "/run/ftctl/b/vm1", ProbeAddrs: want.Addrs, ProbeTCPPorts: want.TCPPorts}); err != nil || diff != "" || again != pr {
			t.Errorf("%s: Prepare of the promoted domain with its probe: %v\n%s", name, err, diff)
		}
	}
}
