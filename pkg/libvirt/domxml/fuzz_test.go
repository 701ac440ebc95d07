package domxml

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzPrepare: any input gives a result or an error, never a panic; a
// document that parses serialises back to itself; a successful Prepare is
// idempotent; Standby of the result and Promoted of that work or fail
// cleanly, and a promoted definition is a prepared one.
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
	f.Fuzz(func(t *testing.T, in string) {
		if doc, err := Parse([]byte(in)); err == nil && doc.String() != in {
			t.Fatalf("round trip changed the input")
		}
		_, _ = Check(in)
		out, _, err := Prepare(in, Options{SocketDir: "/s"})
		if err != nil {
			return
		}
		again, diff, err := Prepare(out, Options{SocketDir: "/s"})
		if err != nil || diff != "" || again != out {
			t.Fatalf("second Prepare: %v\n%s", err, diff)
		}
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
		disks := make([]string, len(d.Metadata.Protection.Disks))
		for i := range disks {
			disks[i] = "/b/replica.img"
		}
		pr, err := Promoted(sb, disks)
		if err != nil {
			t.Fatalf("Promoted of Standby's output: %v", err)
		}
		if again, diff, err := Prepare(pr, Options{SocketDir: "/b"}); err != nil || diff != "" || again != pr {
			t.Fatalf("Prepare of a promoted domain: %v\n%s", err, diff)
		}
	})
}
