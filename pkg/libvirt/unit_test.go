package libvirt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"testing/iotest"

	"github.com/ftctl/ftctl/pkg/qmp"
)

// xdrString appends an XDR string (length, bytes, padding to 4).
func xdrString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	b = append(b, s...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// monitorEvent builds libvirt's QEMU monitor event packet, with details
// (nil for a null details pointer).
func monitorEvent(event string, details *string) []byte {
	p := make([]byte, 4) // length, set below
	for _, w := range []uint32{qemuProgram, 1, qemuProcMonitorEvent, 1 /* message */, 0, 0} {
		p = binary.BigEndian.AppendUint32(p, w)
	}
	p = binary.BigEndian.AppendUint32(p, 7) // callbackID
	p = xdrString(p, "vm-name")
	p = append(p, bytes.Repeat([]byte{0xab}, 16)...) // uuid
	p = binary.BigEndian.AppendUint32(p, 3)          // id
	p = xdrString(p, event)
	p = binary.BigEndian.AppendUint64(p, 1795305751)
	p = binary.BigEndian.AppendUint32(p, 619309)
	if details == nil {
		p = binary.BigEndian.AppendUint32(p, 0)
	} else {
		p = binary.BigEndian.AppendUint32(p, 1)
		p = xdrString(p, *details)
	}
	binary.BigEndian.PutUint32(p, uint32(len(p)))
	return p
}

func TestFixConnRepairsNullDetailsOnly(t *testing.T) {
	data := `{"status":"completed"}`
	stop := monitorEvent("STOP", nil)
	mig := monitorEvent("MIGRATION", &data)
	other := monitorEvent("STOP", nil)
	binary.BigEndian.PutUint32(other[4:], 0x20008086) // the remote program: untouched
	in := append(append(append([]byte{}, stop...), mig...), other...)

	// One byte per write from libvirt's side, one-byte reads on
	// go-libvirt's side: packets are reassembled whole whatever the
	// chunking.
	srv, cli := net.Pipe()
	go func() {
		for i := range in {
			if _, err := srv.Write(in[i : i+1]); err != nil {
				return
			}
		}
		srv.Close()
	}()
	c := newFixConn(cli)
	defer c.Close()
	got, err := io.ReadAll(iotest.OneByteReader(io.LimitReader(c, 1<<20)))
	if err != nil {
		t.Fatal(err)
	}
	wantStop := append(append([]byte{}, stop...), 0, 0, 0, 0)
	binary.BigEndian.PutUint32(wantStop, uint32(len(wantStop)))
	want := append(append(append([]byte{}, wantStop...), mig...), other...)
	if !bytes.Equal(got, want) {
		t.Fatalf("repaired stream differs:\n got %x\nwant %x", got, want)
	}
}

func TestFixConnPassesGarbageThrough(t *testing.T) {
	for name, in := range map[string][]byte{
		"short length": {0, 0, 0, 3, 1, 2, 3},
		"huge length":  {0xff, 0xff, 0xff, 0xff, 9},
		"truncated":    {0, 0, 0, 40, 1, 2},
	} {
		var out []byte
		r := bytes.NewReader(in)
		for i := 0; i < 10; i++ {
			pkt, err := readPacket(r)
			out = append(out, pkt...)
			if err != nil {
				break
			}
			if len(pkt) == 4 { // untrusted length word: the rest is raw
				rest, _ := io.ReadAll(r)
				out = append(out, rest...)
				break
			}
		}
		if !bytes.Equal(out, in) {
			t.Errorf("%s: %x became %x", name, in, out)
		}
	}
	// An event packet with an unexpected layout is left alone.
	p := monitorEvent("STOP", nil)
	p = append(p, 0, 0, 0, 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(p, uint32(len(p)))
	if got := repairEvent(append([]byte{}, p...)); !bytes.Equal(got, p) {
		t.Errorf("odd layout was changed")
	}
}

func TestParseReply(t *testing.T) {
	ret, err := parseReply("query-status", []byte(`{"return":{"status":"running"},"id":"libvirt-9"}`))
	if err != nil || string(ret) != `{"status":"running"}` {
		t.Errorf("return: %s, %v", ret, err)
	}
	_, err = parseReply("cont", []byte(`{"error":{"class":"GenericError","desc":"nope"},"id":"libvirt-9"}`))
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Command != "cont" || qe.Class != "GenericError" || qe.Desc != "nope" {
		t.Errorf("error reply: %v", err)
	}
	for _, bad := range []string{`nonsense`, `{"id":"x"}`, ``} {
		if _, err := parseReply("x", []byte(bad)); err == nil {
			t.Errorf("reply %q accepted", bad)
		}
	}
}

func TestDialerFor(t *testing.T) {
	ctx := context.Background()
	cases := []struct {
		uri, socket, remote string
		remoteDialer        bool
	}{
		{"", DefaultSocket, "qemu:///system", false},
		{"/tmp/x/libvirt-sock", "/tmp/x/libvirt-sock", "qemu:///system", false},
		{"qemu:///system?socket=/run/a.sock", "/run/a.sock", "qemu:///system", false},
		{"qemu+unix:///system", DefaultSocket, "qemu:///system", false},
		{"qemu+tcp://hostb:16509/system", "", "qemu:///system", true},
		{"qemu+tls://hostb/system?pkipath=/etc/pki/ftctl", "", "qemu:///system", true},
		{"qemu://hostb/system", "", "qemu:///system", true},
	}
	for _, c := range cases {
		d, remote, err := dialerFor(ctx, c.uri)
		if err != nil {
			t.Errorf("%q: %v", c.uri, err)
			continue
		}
		if remote != c.remote {
			t.Errorf("%q: remote URI %q, want %q", c.uri, remote, c.remote)
		}
		switch dd := d.(type) {
		case ctxDialer:
			if dd.path != c.socket || c.remoteDialer {
				t.Errorf("%q: local socket %q, want %q", c.uri, dd.path, c.socket)
			}
		case fixDialer:
			if !c.remoteDialer {
				t.Errorf("%q: got a remote dialer", c.uri)
			}
		default:
			t.Errorf("%q: dialer %T", c.uri, d)
		}
	}
	if d, _, err := dialerFor(ctx, "qemu+ssh://root@hostb/system"); err != nil || d != nil {
		t.Errorf("ssh: dialer %v, %v; want go-libvirt's own", d, err)
	}
	if _, _, err := dialerFor(ctx, "qemu+tls://hostb/system?no_verify=maybe"); !errors.Is(err, ErrBadURI) {
		t.Errorf("bad no_verify: %v", err)
	}
}

func TestNames(t *testing.T) {
	if s := (State{Code: StatePaused, Reason: 1}).String(); s != "paused (user)" {
		t.Errorf("state %q", s)
	}
	if s := (State{Code: 42, Reason: 99}).String(); s != "state(42) (reason(99))" {
		t.Errorf("unknown state %q", s)
	}
	if s := (LifecycleEvent{Domain: "a", Type: EventStopped, Detail: StoppedDestroyed}).String(); s != "a: stopped (destroyed)" {
		t.Errorf("event %q", s)
	}
}
