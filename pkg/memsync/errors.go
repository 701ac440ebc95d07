package memsync

import "errors"

// Sentinel errors; every error from this package wraps one of them (or a
// context error) so callers can branch with errors.Is.
var (
	// ErrBadInput means an argument or file was unusable: a size that is not
	// a whole number of pages, a page index out of range, a bad option.
	ErrBadInput = errors.New("memsync: bad input")
	// ErrUnsupported means the kernel or process lacks what a tracker needs
	// (for example a kernel without CONFIG_MEM_SOFT_DIRTY).
	ErrUnsupported = errors.New("memsync: unsupported")
	// ErrCorrupt means an encoded frame, page or journal failed validation.
	ErrCorrupt = errors.New("memsync: corrupt data")
	// ErrClosed means the object was used after Close.
	ErrClosed = errors.New("memsync: closed")
	// ErrNotFound means the guest-RAM mapping was not found in the target process.
	ErrNotFound = errors.New("memsync: not found")
	// ErrEpoch means an epoch number did not follow the expected order.
	ErrEpoch = errors.New("memsync: epoch out of order")
)
