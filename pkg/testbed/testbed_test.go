package testbed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	if p := os.Getenv(crashHelperEnv); p != "" {
		crashHelper(p)
		return
	}
	os.Exit(m.Run())
}

func TestTopology(t *testing.T) {
	before := snapshot(t, testPrefix)
	b := newBed(t, Options{})

	// The address plan: every address in its bed's subnets.
	for _, h := range b.Hosts {
		if !b.LANNet.Contains(h.LANAddr) || !b.ReplNet.Contains(h.ReplAddr) || !b.MgmtNet.Contains(h.MgmtAddr) {
			t.Errorf("host %s addresses %v %v %v outside %v %v %v", h.Name, h.LANAddr, h.ReplAddr, h.MgmtAddr, b.LANNet, b.ReplNet, b.MgmtNet)
		}
	}
	if !b.LANNet.Contains(b.Client.LANAddr) || b.Client.ReplAddr.IsValid() || b.Client.MgmtAddr.IsValid() {
		t.Errorf("client addresses %v %v %v", b.Client.LANAddr, b.Client.ReplAddr, b.Client.MgmtAddr)
	}
	if b.LANNet.Overlaps(b.ReplNet) || b.LANNet.Overlaps(b.MgmtNet) || b.ReplNet.Overlaps(b.MgmtNet) {
		t.Errorf("overlapping subnets %v %v %v", b.LANNet, b.ReplNet, b.MgmtNet)
	}

	aLAN := serve(t, b.A, b.A.LANAddr)
	bLAN := serve(t, b.B, b.B.LANAddr)
	aRepl := serve(t, b.A, b.A.ReplAddr)
	bRepl := serve(t, b.B, b.B.ReplAddr)
	aMgmt := serve(t, b.A, b.A.MgmtAddr)
	bMgmt := serve(t, b.B, b.B.MgmtAddr)
	cLAN := serve(t, b.Client, b.Client.LANAddr)

	mustReach(t, b.Client, aLAN, "a")
	mustReach(t, b.Client, bLAN, "b")
	mustReach(t, b.A, cLAN, "client")
	mustReach(t, b.A, bRepl, "b")
	mustReach(t, b.B, aRepl, "a")
	mustReach(t, b.A, bMgmt, "b")
	mustReach(t, b.B, aMgmt, "a")
	mustReach(t, b.A, bLAN, "b")

	// The client has no way onto the private networks...
	for _, ap := range []netip.AddrPort{aRepl, bRepl, aMgmt, bMgmt} {
		mustNotReach(t, b.Client, ap)
	}
	// ... not even through a host acting as a router: hosts do not forward.
	for _, n := range []netip.Prefix{b.ReplNet, b.MgmtNet} {
		addRoute(t, b.Client, n, b.A.LANAddr)
	}
	mustNotReach(t, b.Client, bRepl)
	mustNotReach(t, b.Client, bMgmt)

	// Nothing of the bed is in the machine's own namespace: no link, no
	// address, no route. (Nothing is dialled from there: the machine's
	// default route would carry the packets off the machine.)
	if d := snapshot(t, testPrefix).newRootLinks(before); len(d) > 0 {
		t.Errorf("bed links in the root namespace: %v", d)
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && (b.LANNet.Contains(ip.Unmap()) || b.ReplNet.Contains(ip.Unmap()) || b.MgmtNet.Contains(ip.Unmap())) {
			t.Errorf("root namespace has bed address %v on link %d", a.IPNet, a.LinkIndex)
		}
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue // the default route leads off the machine, not into the bed
		}
		// Broader routes (a 10.0.0.0/8 of the machine's) are not the bed's.
		p, _ := netip.ParsePrefix(r.Dst.String())
		for _, n := range []netip.Prefix{b.LANNet, b.ReplNet, b.MgmtNet} {
			if p.Overlaps(n) && p.Bits() >= n.Bits() {
				t.Errorf("root namespace routes %v into the bed (link %d)", p, r.LinkIndex)
			}
		}
	}

	// Command runs inside the namespace.
	out, err := b.A.Command(context.Background(), "ip", "-4", "-o", "addr", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr in A: %v: %s", err, out)
	}
	for _, want := range []string{BridgeName + "    inet " + b.A.LANAddr.String() + "/24", "repl0    inet " + b.A.ReplAddr.String() + "/24"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("ip addr in A lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(string(out), "eth0") {
		t.Errorf("A sees the machine's eth0:\n%s", out)
	}
}

// addRoute adds a route to dst via gw in h's namespace.
func addRoute(t testing.TB, h *Host, dst netip.Prefix, gw netip.Addr) {
	t.Helper()
	nh, err := handleAt(h.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	if err := nh.RouteAdd(&netlink.Route{Dst: ipNet(dst.Addr(), dst.Bits()), Gw: gw.AsSlice()}); err != nil {
		t.Fatalf("route %v via %v in %s: %v", dst, gw, h.Name, err)
	}
}

func TestFakeVMMovesBetweenHosts(t *testing.T) {
	b := newBed(t, Options{})
	ctx := context.Background()
	vm, err := b.AddFakeVM(ctx, 3, b.A)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := b.VMAddr(3)
	if vm.Addr != want || vm.LANAddr != want.Addr() || vm.On() != b.A {
		t.Fatalf("VM at %v (%v) on %s, want %v on a", vm.Addr, vm.LANAddr, vm.On().Name, want)
	}
	svc := serve(t, vm.Host, vm.LANAddr)
	mustReach(t, b.Client, svc, "vm3")

	// The VM's traffic goes through A: cutting A off the LAN cuts it off.
	if err := b.Cut(b.A, NetLAN); err != nil {
		t.Fatal(err)
	}
	mustNotReach(t, b.Client, svc)
	if err := b.Restore(b.A, NetLAN); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b.Client, svc, "vm3")

	if err := vm.MoveTo(ctx, b.B); err != nil {
		t.Fatal(err)
	}
	if vm.On() != b.B {
		t.Fatalf("VM on %s after move, want b", vm.On().Name)
	}
	// The announcement alone taught the switch the new port.
	if port := fdbPort(t, b, vm.MAC.String()); port != "b-lan" {
		t.Errorf("switch sends the VM's MAC to %q, want b-lan", port)
	}
	if err := b.Cut(b.A, NetLAN); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b.Client, svc, "vm3")
	if err := b.Restore(b.A, NetLAN); err != nil {
		t.Fatal(err)
	}
	// And back.
	if err := vm.MoveTo(ctx, b.A); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b.Client, svc, "vm3")

	if _, err := b.AddFakeVM(ctx, 3, b.B); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("second VM 3: %v, want ErrInvalidOptions", err)
	}
	if _, err := b.AddFakeVM(ctx, 4, b.Client); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("VM on the client: %v, want ErrInvalidOptions", err)
	}
	if err := vm.MoveTo(ctx, b.LAN); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("VM to the switch: %v, want ErrInvalidOptions", err)
	}
}

// fdbPort names the switch port the LAN bridge forwards mac to.
func fdbPort(t testing.TB, b *Bed, mac string) string {
	t.Helper()
	sw, err := handleAt(b.LAN.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	neighs, err := sw.NeighList(0, unix.AF_BRIDGE)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		if n.HardwareAddr.String() != mac {
			continue
		}
		l, err := sw.LinkByIndex(n.LinkIndex)
		if err == nil && l.Attrs().MasterIndex != 0 {
			if br, err := sw.LinkByIndex(l.Attrs().MasterIndex); err == nil && br.Attrs().Name == string(NetLAN) {
				return l.Attrs().Name
			}
		}
	}
	return ""
}

func TestCuts(t *testing.T) {
	b := newBed(t, Options{})
	bLAN := serve(t, b.B, b.B.LANAddr)
	bRepl := serve(t, b.B, b.B.ReplAddr)
	bMgmt := serve(t, b.B, b.B.MgmtAddr)
	aLAN := serve(t, b.A, b.A.LANAddr)

	// A connection over repl, open across the cut: a silent cut loses
	// nothing that TCP cannot retransmit once the link is back.
	l, err := b.B.Listen(context.Background(), "tcp", netip.AddrPortFrom(b.B.ReplAddr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), okTimeout)
	defer cancel()
	ca, err := b.A.Dial(ctx, "tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cb, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()

	if err := b.CutReplication(); err != nil {
		t.Fatal(err)
	}
	mustNotReach(t, b.A, bRepl)
	mustReach(t, b.A, bLAN, "b")
	mustReach(t, b.A, bMgmt, "b")
	mustReach(t, b.Client, bLAN, "b")
	if _, err := ca.Write([]byte("x")); err != nil {
		t.Fatalf("write during cut: %v (a silent cut must not fail a write)", err)
	}
	buf := make([]byte, 1)
	cb.SetReadDeadline(time.Now().Add(blockedTimeout))
	if n, err := cb.Read(buf); err == nil {
		t.Fatalf("read %q across a cut link", buf[:n])
	}
	if err := b.RestoreReplication(); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b.A, bRepl, "b")
	cb.SetReadDeadline(time.Now().Add(okTimeout))
	if _, err := cb.Read(buf); err != nil || buf[0] != 'x' {
		t.Fatalf("after restore, read %q, %v; want the byte sent during the cut", buf, err)
	}

	if err := b.CutMgmt(); err != nil {
		t.Fatal(err)
	}
	mustNotReach(t, b.A, bMgmt)
	mustReach(t, b.A, bRepl, "b")
	if err := b.RestoreMgmt(); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b.A, bMgmt, "b")

	// A host "dies": nothing reaches it, the rest of the LAN goes on.
	if err := b.IsolateHost(b.A); err != nil {
		t.Fatal(err)
	}
	mustNotReach(t, b.Client, aLAN)
	mustNotReach(t, b.A, bRepl)
	mustNotReach(t, b.A, bMgmt)
	mustReach(t, b.Client, bLAN, "b")
	if err := b.Rejoin(b.A); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b.Client, aLAN, "a")
	mustReach(t, b.A, bRepl, "b")
	mustReach(t, b.A, bMgmt, "b")

	// Cut works per host, and refuses links a host does not have.
	if err := b.Cut(b.B, NetRepl); err != nil {
		t.Fatal(err)
	}
	mustNotReach(t, b.A, bRepl)
	if err := b.Restore(b.B, NetRepl); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b.A, bRepl, "b")
	for _, c := range []struct {
		h *Host
		n Net
	}{{b.Client, NetRepl}, {b.LAN, NetLAN}, {nil, NetLAN}, {b.A, Net("wan")}} {
		if err := b.Cut(c.h, c.n); !errors.Is(err, ErrNoLink) {
			t.Errorf("Cut(%s, %s) = %v, want ErrNoLink", hostName(c.h), c.n, err)
		}
	}
	if err := b.IsolateHost(b.LAN); !errors.Is(err, ErrNoLink) {
		t.Errorf("IsolateHost(switch) = %v, want ErrNoLink", err)
	}
}

func TestCloseRemovesEverything(t *testing.T) {
	requireRoot(t)
	const prefix = "tbclose"
	before := snapshot(t, prefix)
	b, err := New(context.Background(), Options{Prefix: prefix, Hosts: 3})
	if err != nil {
		t.Fatal(err)
	}
	vm, err := b.AddFakeVM(context.Background(), 0, b.Hosts[2])
	if err != nil {
		t.Fatal(err)
	}
	svc := serve(t, vm.Host, vm.LANAddr)
	mustReach(t, b.Client, svc, "vm0")
	mustReach(t, b.Hosts[2], svc, "vm0")
	during := snapshot(t, prefix)
	wantNS := []string{b.Hosts[0].NSName, b.Hosts[1].NSName, b.Hosts[2].NSName, b.Client.NSName, b.LAN.NSName, nsName(prefix, b.Slot, "vm0")}
	for _, n := range wantNS {
		if !slices.Contains(during.netns, n) {
			t.Errorf("namespace %s missing while the bed is up: %v", n, during.netns)
		}
	}
	if len(during.locks) != len(before.locks)+1 {
		t.Errorf("lock files while up: %v", during.locks)
	}
	// A socket keeps its namespace alive after Close; the bed's links
	// must go anyway.
	held, err := b.A.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	aNS, err := os.Open(b.A.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer aNS.Close()

	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	mustLeaveNothing(t, before, prefix)
	if err := b.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := b.A.Do(func() error { return nil }); !errors.Is(err, ErrClosed) {
		t.Errorf("Do after Close = %v, want ErrClosed", err)
	}
	if err := b.CutReplication(); !errors.Is(err, ErrClosed) {
		t.Errorf("CutReplication after Close = %v, want ErrClosed", err)
	}
	var left []string
	err = inNetns(fmt.Sprintf("/proc/self/fd/%d", aNS.Fd()), func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			left = append(left, l.Attrs().Name)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// What is left connects to nothing: no veth, a bridge without ports.
	slices.Sort(left)
	if !slices.Equal(left, []string{BridgeName, "lo"}) {
		t.Errorf("links left in a closed host still referenced by a socket: %v", left)
	}
}

func TestFailedNewLeavesNothing(t *testing.T) {
	requireRoot(t)
	const prefix = "tbfail"
	before := snapshot(t, prefix)
	for _, s := range []string{"netns lan", "netns a", "netns b", "netns client", "switch", "wire a", "wire b", "wire client"} {
		b, err := New(context.Background(), Options{Prefix: prefix, failStep: s})
		if err == nil {
			b.Close()
			t.Fatalf("New with a failure at %q succeeded: no such step?", s)
		}
		if !strings.Contains(err.Error(), "injected") || strings.Contains(err.Error(), "cleaning up") {
			t.Fatalf("failure at %q: %v", s, err)
		}
		mustLeaveNothing(t, before, prefix)
	}
	// A cancelled context stops New too.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := New(ctx, Options{Prefix: prefix}); !errors.Is(err, context.Canceled) {
		t.Errorf("New with a cancelled context: %v", err)
	}
	mustLeaveNothing(t, before, prefix)
}

func TestTwoBedsAtOnce(t *testing.T) {
	requireRoot(t)
	beds := make([]*Bed, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range beds {
		wg.Go(func() { beds[i], errs[i] = New(context.Background(), Options{Prefix: testPrefix}) })
	}
	wg.Wait()
	for i, b := range beds {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		t.Cleanup(func() { b.Close() })
	}
	x, y := beds[0], beds[1]
	if x.Slot == y.Slot || x.LANNet == y.LANNet || x.ReplNet == y.ReplNet || x.A.NSName == y.A.NSName {
		t.Fatalf("beds collide: slots %d %d, LANs %v %v", x.Slot, y.Slot, x.LANNet, y.LANNet)
	}
	xa, ya := serve(t, x.A, x.A.LANAddr), serve(t, y.A, y.A.LANAddr)
	mustReach(t, x.Client, xa, "a")
	mustReach(t, y.Client, ya, "a")
	// One bed's client cannot see the other bed.
	mustNotReach(t, x.Client, ya)
	if err := x.Close(); err != nil {
		t.Fatal(err)
	}
	mustReach(t, y.Client, ya, "a")
}

const crashHelperEnv = "TESTBED_CRASH_HELPER_PREFIX"

// crashHelper runs in a child process: it makes a bed, says which
// namespaces it has, and waits to be killed.
func crashHelper(prefix string) {
	b, err := New(context.Background(), Options{Prefix: prefix})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("up", b.Slot, strings.Join(b.netns, " "))
	time.Sleep(time.Minute) // bounded, in case the parent dies first
	b.Close()
}

func TestCleanupStaleAfterCrash(t *testing.T) {
	requireRoot(t)
	const prefix = "tbstale"
	before := snapshot(t, prefix)
	live := newBed(t, Options{Prefix: prefix})
	liveSvc := serve(t, live.A, live.A.LANAddr)

	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), crashHelperEnv+"="+prefix)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "up ") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper: %q, %v", line, err)
	}
	fields := strings.Fields(line)
	crashed := slices.Sorted(slices.Values(fields[2:]))
	if len(crashed) != 4 {
		t.Fatalf("helper made namespaces %v", crashed)
	}
	// Its bed is alive while it runs: CleanupStale leaves it alone.
	if removed, err := CleanupStale(context.Background(), prefix); err != nil || len(removed) != 0 {
		t.Fatalf("CleanupStale with both beds alive removed %v, %v", removed, err)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if got := listDir(t, netnsDir, prefix+"-"); len(got) != len(crashed)+4 {
		t.Fatalf("after the crash, namespaces %v; want the crashed bed's too", got)
	}

	// And a bed that died before making any namespace left only its lock.
	orphanLock := lockPath(prefix, (live.Slot+NumSlots/2)%NumSlots)
	if err := os.WriteFile(orphanLock, []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	removed, err := CleanupStale(context.Background(), prefix)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(orphanLock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("orphan lock file %s still there: %v", orphanLock, err)
	}
	if !slices.Equal(removed, crashed) {
		t.Errorf("CleanupStale removed %v, want %v", removed, crashed)
	}
	for _, n := range crashed {
		if _, err := os.Stat(netnsPath(n)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("namespace %s still there: %v", n, err)
		}
	}
	mustReach(t, live.Client, liveSvc, "a")
	if err := live.Close(); err != nil {
		t.Fatal(err)
	}
	mustLeaveNothing(t, before, prefix)
}

func TestStaleSlotIsReclaimed(t *testing.T) {
	// A bed whose process died leaves its slot locked by nobody; the next
	// bed that lands on that slot removes the leftovers first.
	requireRoot(t)
	const prefix = "tbslot"
	before := snapshot(t, prefix)
	old := newBed(t, Options{Prefix: prefix})
	oldNS := slices.Clone(old.netns)
	var oldA unix.Stat_t
	if err := unix.Stat(old.A.NetNS, &oldA); err != nil {
		t.Fatal(err)
	}
	old.lock.f.Close() // as the kernel does when the process dies
	old.lock = nil
	old.netns = nil

	last, err := New(context.Background(), Options{Prefix: prefix, slotHint: old.Slot + 1})
	if err != nil {
		t.Fatal(err)
	}
	defer last.Close()
	if last.Slot != old.Slot {
		t.Fatalf("got slot %d, want the stale slot %d", last.Slot, old.Slot)
	}
	// Same names, but new namespaces: the old ones were removed first.
	if !slices.Equal(slices.Sorted(slices.Values(last.netns)), slices.Sorted(slices.Values(oldNS))) {
		t.Fatalf("reused slot made %v, old bed had %v", last.netns, oldNS)
	}
	var newA unix.Stat_t
	if err := unix.Stat(last.A.NetNS, &newA); err != nil {
		t.Fatal(err)
	}
	if newA.Ino == oldA.Ino {
		t.Fatalf("namespace %s is still the stale one (inode %d)", last.A.NSName, newA.Ino)
	}
	svc := serve(t, last.A, last.A.LANAddr)
	mustReach(t, last.Client, svc, "a")
	if err := last.Close(); err != nil {
		t.Fatal(err)
	}
	os.Remove(lockPath(prefix, old.Slot)) // the dead bed's file, unlocked
	mustLeaveNothing(t, before, prefix)
}

func TestAttachTap(t *testing.T) {
	b := newBed(t, Options{})
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("needs /dev/net/tun:", err)
	}
	// A persistent tap, as a VM launcher would make for QEMU.
	err := b.A.Do(func() error {
		return netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tap7"}, Mode: netlink.TUNTAP_MODE_TAP})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.A.Attach("tap7"); err != nil {
		t.Fatal(err)
	}
	nh, err := handleAt(b.A.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	tap, err := nh.LinkByName("tap7")
	if err != nil {
		t.Fatal(err)
	}
	br, err := nh.LinkByName(BridgeName)
	if err != nil {
		t.Fatal(err)
	}
	if tap.Attrs().MasterIndex != br.Attrs().Index || tap.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("tap7: master %d (want %s, %d), flags %v", tap.Attrs().MasterIndex, BridgeName, br.Attrs().Index, tap.Attrs().Flags)
	}
	if err := b.A.Attach("nosuch0"); err == nil || !strings.Contains(err.Error(), "nosuch0") {
		t.Errorf("Attach of a missing interface: %v", err)
	}
	if err := b.Client.Attach("lan0"); !errors.Is(err, ErrNoLink) {
		t.Errorf("Attach on the client: %v, want ErrNoLink", err)
	}
}
