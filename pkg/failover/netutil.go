package failover

import (
	"errors"
	"syscall"
)

// isTransient reports socket errors that a later attempt may not see: the
// kernel relays an ICMP error from an earlier datagram on the next call.
func isTransient(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTDOWN)
}
