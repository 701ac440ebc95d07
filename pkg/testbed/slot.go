package testbed

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// lockDir holds one lock file per live bed.
const lockDir = "/run/ftctl-testbed"

var bedSeq atomic.Uint32

func lockPath(prefix string, slot int) string {
	return filepath.Join(lockDir, fmt.Sprintf("%s-%d.lock", prefix, slot))
}

// nsName is the namespace name of role (a host's name, "client", "lan",
// "vm3") in slot.
func nsName(prefix string, slot int, role string) string {
	return fmt.Sprintf("%s-%d-%s", prefix, slot, role)
}

// parseNsName reports the slot of a namespace name made by nsName with
// prefix.
func parseNsName(prefix, name string) (slot int, ok bool) {
	rest, ok := strings.CutPrefix(name, prefix+"-")
	if !ok {
		return 0, false
	}
	num, role, ok := strings.Cut(rest, "-")
	if !ok || role == "" || num == "" {
		return 0, false
	}
	slot, err := strconv.Atoi(num)
	if err != nil || slot < 0 || slot >= NumSlots || strconv.Itoa(slot) != num {
		return 0, false
	}
	return slot, true
}

// slotLock is an exclusive flock on a slot's lock file. The kernel drops it
// when the process dies, so a lock file nobody holds marks a stale bed.
type slotLock struct {
	f    *os.File
	path string
}

// tryLockSlot takes the slot's lock without waiting. It returns (nil, nil)
// when another live bed holds it.
func tryLockSlot(prefix string, slot int) (*slotLock, error) {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, fmt.Errorf("lock directory: %w", err)
	}
	path := lockPath(prefix, slot)
	for range 8 {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open lock %s: %w", path, err)
		}
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, nil
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		// A releasing owner unlinks the file before unlocking it: if we
		// locked an unlinked file, someone may hold a new one by that name.
		var held, named unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(path, &named) == nil &&
			held.Ino == named.Ino && held.Dev == named.Dev {
			// The pid is only for people reading the directory.
			if f.Truncate(0) == nil {
				fmt.Fprintf(f, "%d\n", os.Getpid())
			}
			return &slotLock{f: f, path: path}, nil
		}
		f.Close()
	}
	return nil, nil
}

// release unlinks the lock file, then drops the lock.
func (l *slotLock) release() error {
	err := os.Remove(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// claimSlot takes a free slot, starting from first if that is a slot, else
// from one derived from the pid and a counter, so that beds of parallel
// processes rarely probe the same slots.
// Holding the lock, it removes namespaces a crashed earlier owner of the
// slot left behind.
func claimSlot(prefix string, first int) (int, *slotLock, []string, error) {
	start := (os.Getpid()*7 + int(bedSeq.Add(1))) % NumSlots
	if first >= 0 && first < NumSlots {
		start = first
	}
	for k := range NumSlots {
		slot := (start + k) % NumSlots
		l, err := tryLockSlot(prefix, slot)
		if err != nil {
			return 0, nil, nil, err
		}
		if l == nil {
			continue
		}
		removed, err := removeSlotNetns(prefix, slot)
		if err != nil {
			l.release()
			return 0, nil, nil, fmt.Errorf("remove stale namespaces of slot %d: %w", slot, err)
		}
		return slot, l, removed, nil
	}
	return 0, nil, nil, fmt.Errorf("%w: all %d slots of prefix %q are in use", ErrNoSlot, NumSlots, prefix)
}

// slotNetns lists the existing namespaces of prefix, by slot.
func slotNetns(prefix string) (map[int][]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	m := map[int][]string{}
	for _, e := range ents {
		if slot, ok := parseNsName(prefix, e.Name()); ok {
			m[slot] = append(m[slot], e.Name())
		}
	}
	return m, nil
}

func removeSlotNetns(prefix string, slot int) ([]string, error) {
	all, err := slotNetns(prefix)
	if err != nil {
		return nil, err
	}
	names := all[slot]
	sort.Strings(names)
	var removed []string
	var errs []error
	for _, n := range names {
		if err := removeNetns(n, true); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, n)
	}
	return removed, errors.Join(errs...)
}

// CleanupStale removes what beds with this prefix left behind when their
// process died without Close: their namespaces (with their links) and lock
// files. Beds of live processes, this one's included, are left alone. It
// returns the names of the namespaces it removed.
func CleanupStale(ctx context.Context, prefix string) ([]string, error) {
	if err := checkPrefix(prefix); err != nil {
		return nil, err
	}
	if geteuid() != 0 {
		return nil, fmt.Errorf("%w: cleaning up network namespaces", ErrNeedRoot)
	}
	bySlot, err := slotNetns(prefix)
	if err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	slots := map[int]bool{}
	for s := range bySlot {
		slots[s] = true
	}
	// Lock files of beds that died before making any namespace.
	if ents, err := os.ReadDir(lockDir); err == nil {
		for _, e := range ents {
			base, ok := strings.CutSuffix(e.Name(), ".lock")
			if !ok {
				continue
			}
			if s, ok := parseNsName(prefix, base+"-x"); ok {
				slots[s] = true
			}
		}
	}
	var removed []string
	var errs []error
	for s := range slots {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		l, err := tryLockSlot(prefix, s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if l == nil {
			continue // a live bed
		}
		r, err := removeSlotNetns(prefix, s)
		removed = append(removed, r...)
		if err != nil {
			errs = append(errs, err)
		}
		if err := l.release(); err != nil {
			errs = append(errs, err)
		}
	}
	sort.Strings(removed)
	return removed, errors.Join(errs...)
}
