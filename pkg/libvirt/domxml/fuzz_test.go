package domxml

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzPrepare: any input gives a result or an error, never a panic; a
// document that parses serialises back to itself; and a successful
// Prepare is idempotent.
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
	})
}
