package testbed

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where iproute2 keeps named namespaces, so `ip netns` and
// `nsenter --net=` see ours too.
const netnsDir = "/var/run/netns"

func netnsPath(name string) string { return filepath.Join(netnsDir, name) }

// inNetns runs fn on a fresh OS thread moved into the namespace at path.
// The thread stays locked and is never unlocked, so when the goroutine ends
// Go discards it instead of letting other goroutines run in the switched
// namespace. File descriptors fn creates (sockets, taps) keep their
// namespace and work from any thread afterwards; goroutines fn starts do
// not run in the namespace.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := netns.GetFromPath(path)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", path, err)
			return
		}
		err = netns.Set(ns)
		ns.Close()
		if err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// createNetns creates the named namespace (a bind mount at netnsPath) with
// its loopback up, IP forwarding off (it is inherited from the machine's
// namespace otherwise, and a host must not route between the LAN and its
// private links) and IPv6 off (no link-local chatter, no DAD delays).
// It fails if the name exists, and leaves nothing behind when it fails.
func createNetns(name string) error {
	path := netnsPath(name)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see inNetns
		errc <- func() error {
			if err := os.MkdirAll(netnsDir, 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
			if err != nil {
				return err
			}
			f.Close()
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				os.Remove(path)
				return fmt.Errorf("unshare: %w", err)
			}
			self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
			if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
				os.Remove(path)
				return fmt.Errorf("bind mount %s: %w", path, err)
			}
			if err := setupHere(); err != nil {
				removeNetns(name, false)
				return err
			}
			return nil
		}()
	}()
	if err := <-errc; err != nil {
		return fmt.Errorf("create netns %s: %w", name, err)
	}
	return nil
}

// setupHere configures the calling thread's (new) namespace.
func setupHere() error {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	// /proc/sys/net shows the namespace of the thread that opens it.
	for file, val := range map[string]string{
		"/proc/sys/net/ipv4/ip_forward":                "0",
		"/proc/sys/net/ipv6/conf/all/disable_ipv6":     "1",
		"/proc/sys/net/ipv6/conf/default/disable_ipv6": "1",
	} {
		err := os.WriteFile(file, []byte(val), 0)
		if errors.Is(err, fs.ErrNotExist) && filepath.Base(filepath.Dir(file)) != "ipv4" {
			continue // a kernel without IPv6
		}
		if err != nil {
			return fmt.Errorf("sysctl %s: %w", file, err)
		}
	}
	return nil
}

// removeNetns deletes the named namespace, with all its links first if
// flush is set. The links matter because a namespace outlives its name
// while any socket or process still refers to it; veths would then keep it
// connected to others. Deleting a veth end removes its peer in the other
// namespace too. A name that does not exist is not an error.
func removeNetns(name string, flush bool) error {
	path := netnsPath(name)
	var errs []error
	if flush {
		if err := flushLinks(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		// EINVAL: not a mount point, e.g. the file of a half-made namespace.
		errs = append(errs, fmt.Errorf("unmount %s: %w", path, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}

// linkGroup marks every link a bed makes (IFLA_GROUP), so that one
// RTM_DELLINK per namespace deletes them together: the kernel then waits
// for its RCU grace periods once per batch, not once per device (here the
// switch's links went from about 240 ms one by one to 60 ms).
const linkGroup = 0xd5

// deleteGroup deletes the links of linkGroup in the namespace at path.
func deleteGroup(path string) error {
	return inNetns(path, func() error {
		req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
		req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
		req.AddData(nl.NewRtAttr(unix.IFLA_GROUP, nl.Uint32Attr(linkGroup)))
		_, err := req.Execute(unix.NETLINK_ROUTE, 0)
		if err != nil && !errors.Is(err, unix.ENODEV) { // ENODEV: the group is empty
			return fmt.Errorf("delete links in %s: %w", path, err)
		}
		return nil
	})
}

// flushLinks deletes every link but the loopback in the namespace at path:
// first the bed's own in one batch, then any others (a VM's tap, say).
func flushLinks(path string) error {
	if err := deleteGroup(path); err != nil {
		return err
	}
	h, err := handleAt(path)
	if err != nil {
		return err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("list links in %s: %w", path, err)
	}
	var errs []error
	for _, l := range links {
		if l.Attrs().Name == "lo" {
			continue
		}
		// ENODEV: the peer of a veth deleted a moment ago.
		if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete link %s in %s: %w", l.Attrs().Name, path, err))
		}
	}
	return errors.Join(errs...)
}

// handleAt opens a netlink handle that works in the namespace at path
// without moving any thread.
func handleAt(path string) (*netlink.Handle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", path, err)
	}
	return h, nil
}
