package domxml

import (
	"errors"
	"strings"
	"testing"
)

func findArea(fs []Finding, area string) []Finding {
	var out []Finding
	for _, f := range fs {
		if f.Area == area {
			out = append(out, f)
		}
	}
	return out
}

func TestPrepareRecordsPeerAndPolicy(t *testing.T) {
	in := readSample(t, "plain.xml")
	out, diff, err := Prepare(in, Options{SocketDir: "/run/ftctl/vms/web", Peer: "host-b:7480"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(diff, `peer="host-b:7480"`) && !strings.Contains(diff, `peer='host-b:7480'`) {
		t.Errorf("diff does not show the peer:\n%s", diff)
	}
	d, err := ParseDomain([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	prot := d.Metadata.Protection
	if prot == nil || prot.Peer != "host-b:7480" || prot.Policy != "" {
		t.Fatalf("protection after prepare: %+v", prot)
	}
	if got := EffectivePolicy(prot); got != PolicyAuto {
		t.Errorf("effective policy with a peer = %q, want auto", got)
	}
	// The other application's metadata stays.
	if !strings.Contains(out, `<libosinfo:os id="http://debian.org/debian/12"/>`) {
		t.Error("libosinfo metadata lost")
	}

	// Same options again: nothing to do.
	again, diff, err := Prepare(out, Options{SocketDir: "/run/ftctl/vms/web", Peer: "host-b:7480"})
	if err != nil || diff != "" || again != out {
		t.Fatalf("second prepare not a no-op (%v):\n%s", err, diff)
	}
	// No peer option keeps the recorded one.
	again, diff, err = Prepare(out, Options{SocketDir: "/run/ftctl/vms/web"})
	if err != nil || diff != "" || again != out {
		t.Fatalf("prepare without --peer changed the domain (%v):\n%s", err, diff)
	}
	// A new peer and policy on an already prepared domain change only the
	// attributes.
	changed, diff, err := Prepare(out, Options{SocketDir: "/run/ftctl/vms/web", Peer: "[fd00::2]:7480", Policy: PolicyManual})
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(diff, "\n+") - 1; n != 1 { // not +++
		t.Errorf("diff adds %d lines, want 1 (the protection element):\n%s", n, diff)
	}
	d, _ = ParseDomain([]byte(changed))
	if p := d.Metadata.Protection; p.Peer != "[fd00::2]:7480" || p.Policy != "manual" || len(p.Disks) != 1 {
		t.Errorf("protection after re-prepare: %+v", p)
	}
	if got := EffectivePolicy(d.Metadata.Protection); got != PolicyManual {
		t.Errorf("effective policy = %q, want manual", got)
	}
	fs, err := CheckWith(changed, Options{SocketDir: "/run/ftctl/vms/web"})
	if err != nil {
		t.Fatal(err)
	}
	if pf := findArea(fs, "pairing"); len(pf) != 1 || pf[0].Severity != Info || !strings.Contains(pf[0].Problem, "policy manual") {
		t.Errorf("pairing findings: %v", pf)
	}
}

func TestPeerOnlyOnPreparedDomain(t *testing.T) {
	// A domain whose devices are all prepared, with no metadata element
	// for the peer yet: Prepare must create ftctl's element just for it.
	in := readSample(t, "plain.xml")
	out, _, err := Prepare(in, Options{SocketDir: "/s"})
	if err != nil {
		t.Fatal(err)
	}
	fs, _ := CheckWith(out, Options{SocketDir: "/s"})
	if pf := findArea(fs, "pairing"); len(pf) != 1 || !strings.Contains(pf[0].Problem, "no peer") {
		t.Errorf("pairing findings without a peer: %v", pf)
	}
	fs, _ = CheckWith(out, Options{SocketDir: "/s", Peer: "10.0.0.2:7480"})
	if pf := findArea(fs, "pairing"); len(pf) != 2 || pf[0].Severity != Change {
		t.Errorf("pairing findings with a new peer: %v", pf)
	}
}

func TestBadPeerAndPolicy(t *testing.T) {
	in := readSample(t, "plain.xml")
	for _, peer := range []string{"host-b", "host-b:", ":7480", "host-b:port", "host-b:70000", "a'b:1", "a b:1", "x\"y:2"} {
		if _, _, err := Prepare(in, Options{Peer: peer}); !errors.Is(err, ErrBadOptions) || !strings.Contains(err.Error(), "peer") {
			t.Errorf("peer %q: err %v, want ErrBadOptions naming the peer", peer, err)
		}
	}
	if _, _, err := Prepare(in, Options{Policy: "sometimes"}); !errors.Is(err, ErrBadOptions) || !strings.Contains(err.Error(), "sometimes") {
		t.Errorf("bad policy: %v", err)
	}
	if EffectivePolicy(nil) != PolicyManual || EffectivePolicy(&Protection{}) != PolicyManual {
		t.Error("no protection record must mean manual")
	}
}
