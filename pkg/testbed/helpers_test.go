package testbed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// testPrefix keeps the tests' namespaces apart from other users'.
const testPrefix = "tbt"

// Timeouts: "ok" waits long enough for a loaded machine; "blocked" is how
// long a dial that must fail is given to (wrongly) succeed.
const (
	okTimeout      = 10 * time.Second
	blockedTimeout = 500 * time.Millisecond
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		t.Skip("needs network namespaces:", err)
	}
}

func newBed(t testing.TB, o Options) *Bed {
	t.Helper()
	requireRoot(t)
	if o.Prefix == "" {
		o.Prefix = testPrefix
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := New(ctx, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

// serve answers every connection to addr (port chosen by the kernel) in
// h's namespace with h's name, and returns the listening address.
func serve(t testing.TB, h *Host, addr netip.Addr) netip.AddrPort {
	t.Helper()
	l, err := h.Listen(context.Background(), "tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatalf("listen in %s on %v: %v", h.Name, addr, err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", h.Name)
			c.Close()
		}
	}()
	return netip.MustParseAddrPort(l.Addr().String())
}

// ask dials ap from h and returns the name the server answered with.
func ask(from *Host, ap netip.AddrPort, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", ap.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// mustReach asserts that from reaches the server at ap and that the
// server's host (want) answered.
func mustReach(t testing.TB, from *Host, ap netip.AddrPort, want string) {
	t.Helper()
	got, err := ask(from, ap, okTimeout)
	if err != nil {
		t.Fatalf("%s -> %v (%s): %v", from.Name, ap, want, err)
	}
	if got != want {
		t.Fatalf("%s -> %v: answered by %q, want %q", from.Name, ap, got, want)
	}
}

// mustNotReach asserts that from cannot talk to the server at ap.
func mustNotReach(t testing.TB, from *Host, ap netip.AddrPort) {
	t.Helper()
	got, err := ask(from, ap, blockedTimeout)
	if err == nil {
		t.Fatalf("%s -> %v: reached %q, want no connection", from.Name, ap, got)
	}
}

// ourLinkName reports whether a link name is one a bed makes.
func ourLinkName(n string) bool {
	if slices.Contains([]string{"lan0", "repl0", "mgmt0", BridgeName, "lan", "repl", "mgmt"}, n) {
		return true
	}
	for _, p := range []string{"fvm", "a-", "b-", "c-", "client-"} {
		if strings.HasPrefix(n, p) {
			return true
		}
	}
	return false
}

// state is what a bed may leave in the machine's own namespace and
// directories.
type state struct {
	rootLinks map[int]string
	netns     []string
	locks     []string
}

func snapshot(t testing.TB, prefix string) state {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	s := state{rootLinks: map[int]string{}}
	for _, l := range links {
		s.rootLinks[l.Attrs().Index] = l.Attrs().Name
	}
	s.netns = listDir(t, netnsDir, prefix+"-")
	s.locks = listDir(t, lockDir, prefix+"-")
	return s
}

func listDir(t testing.TB, dir, prefix string) []string {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names
}

// newRootLinks lists links of ours that appeared in the machine's own
// namespace since before. Links other programs add meanwhile are ignored.
func (s state) newRootLinks(before state) []string {
	var n []string
	for i, name := range s.rootLinks {
		if before.rootLinks[i] != name && ourLinkName(name) {
			n = append(n, name)
		}
	}
	return n
}

// mustLeaveNothing asserts that the state is back to before as far as
// this prefix is concerned.
func mustLeaveNothing(t testing.TB, before state, prefix string) {
	t.Helper()
	after := snapshot(t, prefix)
	if d := after.newRootLinks(before); len(d) > 0 {
		t.Errorf("links left in the root namespace: %v", d)
	}
	if !slices.Equal(after.netns, before.netns) {
		t.Errorf("namespaces: before %v, after %v", before.netns, after.netns)
	}
	if !slices.Equal(after.locks, before.locks) {
		t.Errorf("lock files: before %v, after %v", before.locks, after.locks)
	}
}
