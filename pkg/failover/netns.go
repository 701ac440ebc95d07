package failover

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// InNetns runs fn on an OS thread inside the network namespace at path
// (such as /var/run/netns/NAME or /proc/PID/ns/net); an empty path runs fn
// in the caller's namespace. Sockets fn opens belong to that namespace for
// their whole life and may be used from any goroutine afterwards, which is
// how the probes and heartbeat endpoints are placed on the right network.
func InNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: when the goroutine ends, Go
		// discards it instead of reusing a thread in a foreign namespace.
		runtime.LockOSThread()
		ns, err := netns.GetFromPath(path)
		if err != nil {
			errc <- fmt.Errorf("%w: open netns %s: %v", ErrConfig, path, err)
			return
		}
		err = netns.Set(ns)
		ns.Close()
		if err != nil {
			errc <- fmt.Errorf("%w: enter netns %s: %v", ErrConfig, path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
