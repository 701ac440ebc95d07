package libvirttest_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/libvirt"
	"github.com/ftctl/ftctl/pkg/libvirt/libvirttest"
)

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func daemonPid(t *testing.T, d *libvirttest.Daemon) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.Dir, "libvirtd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// Two daemons are two hosts: separate state, separate sockets; one of
// them can live in its own network namespace. Stop really stops them.
func TestTwoDaemonsAreIndependent(t *testing.T) {
	if why := libvirttest.Requirements(); why != "" {
		t.Skip(why)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip (iproute2):", err)
	}
	ns := fmt.Sprintf("ftlvt%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "delete", ns).Run() })

	a := libvirttest.Start(t, libvirttest.Options{})
	b := libvirttest.Start(t, libvirttest.Options{NetNS: "/run/netns/" + ns})
	if a.Socket == b.Socket {
		t.Fatalf("both daemons on %s", a.Socket)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ca, cb := a.Conn(t), b.Conn(t)
	dom := libvirttest.GuestDomain{Name: "only-on-a", Kernel: "/nonexistent/vmlinuz", Initrd: "/nonexistent/initrd"}
	if err := ca.Define(ctx, dom.XML()); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.State(ctx, "only-on-a"); err != nil {
		t.Errorf("A does not know its own domain: %v", err)
	}
	if _, err := cb.State(ctx, "only-on-a"); !errors.Is(err, libvirt.ErrNoDomain) {
		t.Errorf("B sees A's domain: %v", err)
	}
	// A's definition is in A's directory, nowhere near the system's.
	if _, err := os.Stat(filepath.Join(a.Dir, "etc", "qemu", "only-on-a.xml")); err != nil {
		t.Errorf("A's definition not under its directory: %v", err)
	}
	if _, err := os.Stat("/etc/libvirt/qemu/only-on-a.xml"); err == nil {
		t.Errorf("the definition leaked into the system's /etc/libvirt")
	}

	// B runs in the namespace it was given, A in ours.
	pidA, pidB := daemonPid(t, a), daemonPid(t, b)
	if got, want := nsInode(t, fmt.Sprintf("/proc/%d/ns/net", pidB)), nsInode(t, "/run/netns/"+ns); got != want {
		t.Errorf("B's libvirtd is in net namespace %d, want %d", got, want)
	}
	if got, want := nsInode(t, fmt.Sprintf("/proc/%d/ns/net", pidA)), nsInode(t, "/proc/self/ns/net"); got != want {
		t.Errorf("A's libvirtd is in net namespace %d, want ours %d", got, want)
	}

	a.Stop()
	if err := syscall.Kill(pidA, 0); err == nil {
		t.Errorf("A's libvirtd (pid %d) still runs after Stop", pidA)
	}
	if _, err := cb.State(ctx, "only-on-a"); !errors.Is(err, libvirt.ErrNoDomain) {
		t.Errorf("B is not answering after A stopped: %v", err)
	}
}

func TestGuestDomainXMLEscapes(t *testing.T) {
	x := libvirttest.GuestDomain{Name: "a<b", Kernel: "/k'", Initrd: "/i", Cmdline: "x=1 & y", QEMUArgs: []string{"-x", "a'b"}}.XML()
	for _, s := range []string{"<name>a&lt;b</name>", "<kernel>/k&#39;</kernel>", "<cmdline>x=1 &amp; y</cmdline>", "<qemu:arg value='a&#39;b'/>", "<source type='file'/>"} {
		if !strings.Contains(x, s) {
			t.Errorf("missing %s in:\n%s", s, x)
		}
	}
}
