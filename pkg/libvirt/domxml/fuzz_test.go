package domxml

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzPrepare: any input gives a result or an error, never a panic; a
// document that parses serialises back to itself; a successful Prepare is
// idempotent; Standby of the result and Promoted of that work or fail
// cleanly, and a promoted definition is a prepared one; a probe record
// survives Standby and Promoted unchanged.
func FuzzPrepare(f *testing.F) {
	m, _ := filepath.Glob("testdata/*.xml")
	for _, p := range m {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
	f.Add("<domain><name>x</name><devices><interface/><disk/></devices></domain>")
	f.Add("<domain type='kvm'><name>x</name><memory>1024</memory><metadata><ftctl:protection xmlns:ftctl='" + Namespace +
		"'><ftctl:probe addrs='10.0.0.5,fd00::5' tcp='22'/></ftctl:protection></metadata><devices/></domain>")
	f.Fuzz(func(t *testing.T, in string) {
		if doc, err := Parse([]byte(in)); err == nil && doc.String() != in {
			t.Fatalf("round trip changed the input")
		}
		_, _ = Check(in)
		// Probe options replace whatever the input records, which must
		// end up as one well-formed record.
		probe := Options{SocketDir: "/s", ProbeAddrs: []string{"10.0.0.5"}, ProbeTCPPorts: []int{22}}
		if out, _, err := Prepare(in, probe); err == nil {
			d, err := ParseDomain([]byte(out))
			if err != nil {
				t.Fatalf("Prepare with a probe gave XML that does not parse: %v", err)
			}
			if a, p := d.Metadata.Protection.ProbeSpec(); len(a) != 1 || a[0] != "10.0.0.5" || len(p) != 1 || p[0] != 22 {
				t.Fatalf("probe after Prepare: %v %v", a, p)
			}
			if again, diff, err := Prepare(out, probe); err != nil || diff != "" || again != out {
				t.Fatalf("second Prepare with a probe: %v\n%s", err, diff)
			}
		}
		out, _, err := Prepare(in, Options{SocketDir: "/s"})
		if err != nil {
			return
		}
		again, diff, err := Prepare(out, Options{SocketDir: "/s"})
		if err != nil || diff != "" || again != out {
			t.Fatalf("second Prepare: %v\n%s", err, diff)
		}
		pd, _ := ParseDomain([]byte(out))
		_, _ = Standby(in, StandbyOptions{SocketDir: "/b", RAMFile: "/b/r.ram"})
		_, _ = Promoted(in, nil)
		sb, err := Standby(out, StandbyOptions{SocketDir: "/b", RAMFile: "/b/r.ram"})
		if err != nil {
			return
		}
		d, err := ParseDomain([]byte(sb))
		if err != nil || d.Metadata.Protection.Role != RoleStandby {
			t.Fatalf("standby XML: %v", err)
		}
		if !d.Metadata.Protection.Probe.equal(pd.Metadata.Protection.Probe) {
			t.Fatalf("Standby changed the probe: %+v", d.Metadata.Protection.Probe)
		}
		disks := make([]string, len(d.Metadata.Protection.Disks))
		for i := range disks {
			disks[i] = "/b/replica.img"
		}
		pr, err := Promoted(sb, disks)
		if err != nil {
			t.Fatalf("Promoted of Standby's output: %v", err)
		}
		if pp, err := ParseDomain([]byte(pr)); err != nil || !pp.Metadata.Protection.Probe.equal(pd.Metadata.Protection.Probe) {
			t.Fatalf("Promoted changed the probe (%v)", err)
		}
		if again, diff, err := Prepare(pr, Options{SocketDir: "/b"}); err != nil || diff != "" || again != pr {
			t.Fatalf("Prepare of a promoted domain: %v\n%s", err, diff)
		}
	})
}
