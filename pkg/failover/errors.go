package failover

import "errors"

// Sentinel errors. Every error this package returns wraps one of them, so
// callers branch with errors.Is and still print the specific reason.
var (
	// ErrConfig means a configuration value was missing or out of range.
	ErrConfig = errors.New("failover: bad configuration")
	// ErrAuth means a packet or message failed authentication.
	ErrAuth = errors.New("failover: authentication failed")
	// ErrReplay means an authentic packet was seen before (or is too old).
	ErrReplay = errors.New("failover: replayed packet")
	// ErrMalformed means a packet or message could not be decoded.
	ErrMalformed = errors.New("failover: malformed packet")
	// ErrClosed means the component was closed.
	ErrClosed = errors.New("failover: closed")
	// ErrDead is what a Liveness check wraps when the subject is certainly
	// gone (its process exited), as opposed to merely not answering in time.
	ErrDead = errors.New("failover: subject is dead")
	// ErrProbe means a probe could not be carried out (no socket, no route,
	// no such interface), so it says nothing about the VM.
	ErrProbe = errors.New("failover: probe could not run")
	// ErrUnreachable means the witness could not be reached or did not answer.
	ErrUnreachable = errors.New("failover: witness unreachable")
	// ErrFenced is returned by PrimaryGuard.Run after it fenced the primary.
	ErrFenced = errors.New("failover: primary fenced")
	// ErrUnsafe means an operation would risk two running copies of the VM,
	// such as probing the LAN after the local standby was promoted.
	ErrUnsafe = errors.New("failover: unsafe")
)
