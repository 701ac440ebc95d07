// Package checkpoint owns the device-state primitive every ftctl checkpoint
// is built on: with guest RAM in a shared file and QEMU's x-ignore-shared
// capability on, a migration of a paused VM carries only device state (CPU
// registers, device models, ROMs: a few hundred KB), which SaveDeviceState
// captures into memory and RestoreDeviceState loads into a standby QEMU
// started with -incoming defer over a replica of the RAM file.
//
// It also offers a full local checkpoint (RAM file, disks and device state
// copied while the VM is paused) which the demo and tests use as the
// reference point; the replication pipeline replaces the copies with
// memsync and blockreplay.
package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftctl/ftctl/pkg/qmp"
)

// Sentinel errors.
var (
	// ErrNotPaused: a device-state save of a running VM would not match the
	// RAM the caller copies, so it is refused.
	ErrNotPaused = errors.New("checkpoint: VM is not paused")
	// ErrNotIncoming: restore needs a QEMU waiting with -incoming defer.
	ErrNotIncoming = errors.New("checkpoint: VM is not waiting for an incoming migration")
	// ErrRejected: the standby QEMU refused the device state (it exits
	// when a load fails; its stderr says why).
	ErrRejected = errors.New("checkpoint: standby QEMU rejected the device state and exited")
	// ErrEmptyState: a zero-length device state cannot be restored.
	ErrEmptyState = errors.New("checkpoint: empty device state")
)

// maxDeviceState bounds what SaveDeviceState reads, so a misconfigured VM
// (RAM not shared, x-ignore-shared off) fails loudly instead of streaming
// gigabytes of RAM into the agent's heap.
const maxDeviceState = 64 << 20

var fdSeq atomic.Uint64

// Capabilities are the migration capabilities ftctl needs on both sides.
var Capabilities = map[string]bool{
	"x-ignore-shared": true, // RAM travels through the shared file, not the stream
	"events":          true, // MIGRATION events, so waits need not poll
}

// Prepare sets the migration capabilities and parameters ftctl relies on.
// It is idempotent; call it once per QEMU before the first save or restore.
func Prepare(ctx context.Context, c *qmp.Client) error {
	if err := c.SetMigrationCapabilities(ctx, Capabilities); err != nil {
		return fmt.Errorf("checkpoint: set migration capabilities: %w", err)
	}
	// QEMU's default bandwidth cap (32 MiB/s) would turn a 350 KB device
	// state into a 10 ms transfer over a local socket.
	if err := c.SetMigrationParameters(ctx, map[string]any{"max-bandwidth": int64(1) << 40}); err != nil {
		return fmt.Errorf("checkpoint: set migration parameters: %w", err)
	}
	return nil
}

// SaveDeviceState migrates the paused VM's device state into memory and
// returns it. The VM stays paused (QEMU reports "postmigrate"; cont resumes
// it). Prepare must have run on this QEMU.
func SaveDeviceState(ctx context.Context, c *qmp.Client) ([]byte, error) {
	st, err := c.QueryStatus(ctx)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: query status: %w", err)
	}
	if st.Running {
		return nil, fmt.Errorf("%w (status %q)", ErrNotPaused, st.Status)
	}
	ours, theirs, err := socketPair()
	if err != nil {
		return nil, err
	}
	name := fmt.Sprintf("ftctl-save-%d", fdSeq.Add(1))
	err = c.GetFD(ctx, name, int(theirs.Fd()))
	theirs.Close()
	if err != nil {
		ours.Close()
		return nil, fmt.Errorf("checkpoint: pass migration fd: %w", err)
	}
	var (
		wg    sync.WaitGroup
		state []byte
		rerr  error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		state, rerr = io.ReadAll(io.LimitReader(ours, maxDeviceState+1))
	}()
	// From here on QEMU owns the fd (a failed migrate closes it); closing
	// ours unblocks the reader on every error path.
	defer func() { ours.Close(); wg.Wait() }()
	if err := c.Migrate(ctx, "fd:"+name); err != nil {
		settleMigration(ctx, c)
		c.CloseFD(context.WithoutCancel(ctx), name)
		return nil, fmt.Errorf("checkpoint: migrate: %w", err)
	}
	if _, err := c.WaitMigration(ctx); err != nil {
		settleMigration(ctx, c)
		return nil, fmt.Errorf("checkpoint: device-state migration: %w", err)
	}
	if err := waitFinalized(ctx, c); err != nil {
		settleMigration(ctx, c)
		return nil, fmt.Errorf("checkpoint: device-state migration: %w", err)
	}
	wg.Wait()
	if rerr != nil {
		return nil, fmt.Errorf("checkpoint: read device state: %w", rerr)
	}
	if len(state) > maxDeviceState {
		return nil, fmt.Errorf("checkpoint: device state exceeds %d MiB: is guest RAM a shared memory-backend-file and x-ignore-shared on?", maxDeviceState>>20)
	}
	if len(state) == 0 {
		return nil, ErrEmptyState
	}
	return state, nil
}

// settleMigration ends a device-state migration its caller gave up on (ctx
// ended while QEMU was still at it) and waits until QEMU has: otherwise a
// caller that resumes the guest next would see it stopped again, for good,
// when the migration completes (runstate postmigrate), and a degraded
// primary's guest would stay frozen. Bounded, and its errors are moot:
// the caller is failing already.
func settleMigration(ctx context.Context, c *qmp.Client) {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
	defer cancel()
	c.MigrateCancel(sctx)
	c.WaitMigration(sctx)
	waitFinalized(sctx, c)
}

// waitFinalized waits until QEMU has left the finish-migrate run state.
// query-migrate says "completed" a moment before the run state moves on
// to postmigrate, and a cont in between fails ("Migration is not finalized
// yet"), which would leave the guest stopped.
func waitFinalized(ctx context.Context, c *qmp.Client) error {
	for {
		st, err := c.QueryStatus(ctx)
		if err != nil {
			return err
		}
		if st.Status != "finish-migrate" {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
}

// settleTimeout bounds settleMigration: a paused guest's device state
// takes milliseconds to save.
const settleTimeout = 10 * time.Second

// RestoreDeviceState loads state into a standby QEMU (started with
// -incoming defer and -S, over a RAM file that holds the same epoch as the
// state) and, if resume is set, starts the guest.
func RestoreDeviceState(ctx context.Context, c *qmp.Client, state []byte, resume bool) error {
	if len(state) == 0 {
		return ErrEmptyState
	}
	st, err := c.QueryStatus(ctx)
	if err != nil {
		return fmt.Errorf("checkpoint: query status: %w", err)
	}
	if st.Status != "inmigrate" {
		return fmt.Errorf("%w (status %q)", ErrNotIncoming, st.Status)
	}
	if err := Prepare(ctx, c); err != nil {
		return err
	}
	ours, theirs, err := socketPair()
	if err != nil {
		return err
	}
	name := fmt.Sprintf("ftctl-restore-%d", fdSeq.Add(1))
	err = c.GetFD(ctx, name, int(theirs.Fd()))
	theirs.Close()
	if err != nil {
		ours.Close()
		return fmt.Errorf("checkpoint: pass migration fd: %w", err)
	}
	werr := make(chan error, 1)
	go func() {
		_, err := ours.Write(state)
		// EOF tells QEMU the stream is complete.
		ours.Close()
		werr <- err
	}()
	if err := c.MigrateIncoming(ctx, "fd:"+name); err != nil {
		ours.Close()
		<-werr
		return fmt.Errorf("checkpoint: migrate-incoming: %w", err)
	}
	if err := waitIncoming(ctx, c); err != nil {
		ours.Close()
		<-werr
		if errors.Is(err, qmp.ErrClosed) {
			// QEMU exits when an incoming migration fails to load.
			return fmt.Errorf("%w: %w", ErrRejected, err)
		}
		return err
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("checkpoint: write device state: %w", err)
	}
	if resume {
		if err := c.Cont(ctx); err != nil {
			return fmt.Errorf("checkpoint: cont after restore: %w", err)
		}
	}
	return nil
}

// waitIncoming waits until the incoming migration has loaded and the VM sits
// paused (because of -S), or fails with QEMU's reason.
func waitIncoming(ctx context.Context, c *qmp.Client) error {
	if _, err := c.WaitMigration(ctx); err != nil {
		return fmt.Errorf("checkpoint: incoming device state: %w", err)
	}
	// The MIGRATION "completed" event on the destination can precede the
	// run-state change by a moment; make sure the load is really over.
	for d := time.Millisecond; ; d = min(2*d, 20*time.Millisecond) {
		st, err := c.QueryStatus(ctx)
		if err != nil {
			return fmt.Errorf("checkpoint: query status: %w", err)
		}
		if st.Status != "inmigrate" {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
	}
}

func socketPair() (ours, theirs *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("checkpoint: socketpair: %w", err)
	}
	// Our end is non-blocking so the Go poller owns it and Close interrupts
	// a blocked read; QEMU's end keeps whatever mode QEMU sets on it.
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("checkpoint: socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "migration-ours"), os.NewFile(uintptr(fds[1]), "migration-qemu"), nil
}
