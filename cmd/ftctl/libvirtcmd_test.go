package main

import (
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v3"

	"github.com/ftctl/ftctl/pkg/libvirt/domxml"
)

// runPrepareOptions runs `ftctl libvirt SUB args...` with the
// subcommand's action replaced by prepareOptions, so flag handling is
// tested without a libvirt daemon.
func runPrepareOptions(t *testing.T, sub string, args ...string) (domxml.Options, error) {
	t.Helper()
	app := newApp()
	app.ExitErrHandler = func(context.Context, *cli.Command, error) {} // not os.Exit
	app.Writer, app.ErrWriter = io.Discard, io.Discard
	var got domxml.Options
	found := false
	for _, c := range app.Commands {
		if c.Name != "libvirt" {
			continue
		}
		for _, s := range c.Commands {
			if s.Name == sub {
				found = true
				s.Action = func(ctx context.Context, cmd *cli.Command) error {
					var err error
					got, err = prepareOptions(cmd)
					return err
				}
			}
		}
	}
	if !found {
		t.Fatalf("no ftctl libvirt %s", sub)
	}
	err := app.Run(context.Background(), append([]string{"ftctl", "libvirt", sub}, args...))
	return got, err
}

func TestProbeFlags(t *testing.T) {
	for _, sub := range []string{"check", "prepare"} {
		o, err := runPrepareOptions(t, sub, "--probe-addr", "10.0.0.5", "--probe-addr", "fd00::5", "--probe-tcp", "22", "--probe-tcp", "80,443", "vm1")
		if err != nil {
			t.Fatalf("%s: %v", sub, err)
		}
		if !slices.Equal(o.ProbeAddrs, []string{"10.0.0.5", "fd00::5"}) || !slices.Equal(o.ProbeTCPPorts, []int{22, 80, 443}) {
			t.Errorf("%s: options %q %v", sub, o.ProbeAddrs, o.ProbeTCPPorts)
		}
		// No probe flag keeps the recorded probe: nil, not empty.
		o, err = runPrepareOptions(t, sub, "vm1")
		if err != nil || o.ProbeAddrs != nil || o.ProbeTCPPorts != nil {
			t.Errorf("%s without probe flags: %v %#v", sub, err, o.ProbeAddrs)
		}
		o, err = runPrepareOptions(t, sub, "--no-probe", "vm1")
		if err != nil || o.ProbeAddrs == nil || len(o.ProbeAddrs) != 0 {
			t.Errorf("%s --no-probe: %v %#v", sub, err, o.ProbeAddrs)
		}
	}
}

func TestBadProbeFlags(t *testing.T) {
	cases := []struct {
		args []string
		name string // what the message must name
	}{
		{[]string{"--probe-addr", "10.0.0.300"}, "10.0.0.300"},
		{[]string{"--probe-addr", "host-b"}, "host-b"},
		{[]string{"--probe-addr", "0.0.0.0"}, "0.0.0.0"},
		{[]string{"--probe-addr", "10.0.0.5", "--probe-tcp", "ssh"}, `"ssh"`},
		{[]string{"--probe-addr", "10.0.0.5", "--probe-tcp", "0"}, `"0"`},
		{[]string{"--probe-addr", "10.0.0.5", "--probe-tcp", "65536"}, "65536"},
		{[]string{"--probe-tcp", "22"}, "--probe-addr"},
		{[]string{"--no-probe", "--probe-addr", "10.0.0.5"}, "--no-probe"},
	}
	for _, sub := range []string{"check", "prepare"} {
		for _, c := range cases {
			_, err := runPrepareOptions(t, sub, append(c.args, "vm1")...)
			var ec cli.ExitCoder
			if !errors.As(err, &ec) || ec.ExitCode() != 2 || !strings.Contains(err.Error(), c.name) {
				t.Errorf("%s %q: %v, want exit 2 naming %s", sub, c.args, err, c.name)
			}
		}
	}
}
