package memsync_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/ftctl/ftctl/pkg/memsync"
)

const replicaPages = 64

// replicaFixture opens a fresh replica and commits epoch 1 with random
// content, returning the replica and a copy of the file at epoch 1.
func replicaFixture(t *testing.T) (*memsync.Replica, string, []byte) {
	t.Helper()
	path := t.TempDir() + "/ram"
	r, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	rng := rand.New(rand.NewPCG(11, 12))
	_, cur := genMix(rng, "mixed", replicaPages)
	if err := r.Stage(1, allPages(replicaPages), cur); err != nil {
		t.Fatal(err)
	}
	if err := r.Commit(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	return r, path, readFile(t, path)
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// epoch2 is the content epoch 2 writes: pages 3, 9, 40 and 63.
func epoch2() ([]int, []byte) {
	pages := []int{3, 9, 40, 63}
	data := make([]byte, len(pages)*memsync.PageSize)
	fillText(rand.New(rand.NewPCG(13, 14)), data)
	return pages, data
}

func applied(before []byte, pages []int, data []byte) []byte {
	want := bytes.Clone(before)
	for k, p := range pages {
		copy(want[p*memsync.PageSize:], data[k*memsync.PageSize:(k+1)*memsync.PageSize])
	}
	return want
}

func TestReplicaCommitAndReopen(t *testing.T) {
	r, path, e1 := replicaFixture(t)
	if r.Epoch() != 1 {
		t.Fatalf("epoch %d after first commit", r.Epoch())
	}
	pages, data := epoch2()
	if err := r.Stage(2, pages[:2], data[:2*memsync.PageSize]); err != nil {
		t.Fatal(err)
	}
	if err := r.Stage(2, pages[2:], data[2*memsync.PageSize:]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, path), e1) {
		t.Fatal("staging changed the file before commit")
	}
	if err := r.Commit(context.Background(), 2); err != nil {
		t.Fatal(err)
	}
	want := applied(e1, pages, data)
	if !bytes.Equal(readFile(t, path), want) {
		t.Fatal("file after commit of epoch 2 is wrong")
	}
	r.Close()
	r2, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if r2.Epoch() != 2 || !bytes.Equal(readFile(t, path), want) {
		t.Errorf("reopened at epoch %d", r2.Epoch())
	}
	if _, err := os.Stat(path + ".journal"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("journal left behind: %v", err)
	}
}

func TestReplicaUncommittedIsInvisible(t *testing.T) {
	r, path, e1 := replicaFixture(t)
	pages, data := epoch2()
	if err := r.Stage(2, pages, data); err != nil {
		t.Fatal(err)
	}
	r.Discard()
	if err := r.Commit(context.Background(), 2); err != nil { // empty epoch
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, path), e1) || r.Epoch() != 2 {
		t.Fatal("discarded pages reached the file")
	}
	if err := r.Stage(3, pages, data); err != nil {
		t.Fatal(err)
	}
	r.Close() // "crash" with epoch 3 staged
	r2, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if r2.Epoch() != 2 || !bytes.Equal(readFile(t, path), e1) {
		t.Errorf("staged epoch 3 visible after reopen (epoch %d)", r2.Epoch())
	}
}

func TestReplicaEpochOrder(t *testing.T) {
	r, _, _ := replicaFixture(t)
	pages, data := epoch2()
	if err := r.Stage(1, pages, data); !errors.Is(err, memsync.ErrEpoch) {
		t.Errorf("stage committed epoch: %v", err)
	}
	if err := r.Stage(2, pages, data); err != nil {
		t.Fatal(err)
	}
	if err := r.Stage(3, pages, data); !errors.Is(err, memsync.ErrEpoch) {
		t.Errorf("stage 3 while 2 staged: %v", err)
	}
	if err := r.Commit(context.Background(), 3); !errors.Is(err, memsync.ErrEpoch) {
		t.Errorf("commit 3 while 2 staged: %v", err)
	}
	if err := r.Stage(2, []int{replicaPages}, make([]byte, memsync.PageSize)); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("page beyond size: %v", err)
	}
	if err := r.Stage(2, []int{1}, make([]byte, 10)); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("short data: %v", err)
	}
	if _, err := memsync.OpenReplica(t.TempDir()+"/x", 1000); !errors.Is(err, memsync.ErrBadInput) {
		t.Errorf("bad size: %v", err)
	}
}

var errCrash = errors.New("simulated crash")

// TestReplicaCrashDuringApply stops Commit after some pages were applied;
// the file is then between epochs until OpenReplica replays the journal.
func TestReplicaCrashDuringApply(t *testing.T) {
	for _, at := range []int{-1, 0, 2} {
		t.Run(fmt.Sprintf("after%d", at), func(t *testing.T) {
			r, path, e1 := replicaFixture(t)
			pages, data := epoch2()
			memsync.SetCrashHook(r, func(k int) error {
				if k == at {
					return errCrash
				}
				return nil
			})
			if err := r.Stage(2, pages, data); err != nil {
				t.Fatal(err)
			}
			if err := r.Commit(context.Background(), 2); !errors.Is(err, errCrash) {
				t.Fatalf("Commit: %v", err)
			}
			want := applied(e1, pages, data)
			mid := readFile(t, path)
			if at >= 0 && (bytes.Equal(mid, e1) || bytes.Equal(mid, want)) {
				t.Fatalf("crash after %d pages should leave the file between epochs", at+1)
			}
			r.Close()
			r2, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
			if err != nil {
				t.Fatal(err)
			}
			defer r2.Close()
			if r2.Epoch() != 2 || !bytes.Equal(readFile(t, path), want) {
				t.Errorf("after replay: epoch %d, file equals epoch 2: %v", r2.Epoch(), bytes.Equal(readFile(t, path), want))
			}
		})
	}
}

// TestReplicaTornJournal cuts the journal short, as a crash while writing it
// would: the file must stay at the previous epoch and the journal be dropped.
func TestReplicaTornJournal(t *testing.T) {
	r, path, e1 := replicaFixture(t)
	pages, data := epoch2()
	memsync.SetCrashHook(r, func(k int) error { return errCrash })
	if err := r.Stage(2, pages, data); err != nil {
		t.Fatal(err)
	}
	if err := r.Commit(context.Background(), 2); !errors.Is(err, errCrash) {
		t.Fatal(err)
	}
	r.Close()
	st, err := os.Stat(path + ".journal")
	if err != nil {
		t.Fatal(err)
	}
	for _, cut := range []int64{st.Size() - 1, st.Size() / 2, 3} {
		if err := os.Truncate(path+".journal", cut); err != nil {
			t.Fatal(err)
		}
		r2, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
		if err != nil {
			t.Fatal(err)
		}
		if r2.Epoch() != 1 || !bytes.Equal(readFile(t, path), e1) {
			t.Errorf("cut at %d: epoch %d, file changed", cut, r2.Epoch())
		}
		r2.Close()
		if _, err := os.Stat(path + ".journal"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("torn journal not removed: %v", err)
		}
		// Recreate a full journal for the next cut.
		r3, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
		if err != nil {
			t.Fatal(err)
		}
		memsync.SetCrashHook(r3, func(k int) error { return errCrash })
		r3.Stage(2, pages, data)
		r3.Commit(context.Background(), 2)
		r3.Close()
	}
}

const crashEnv = "MEMSYNC_TEST_CRASH_REPLICA"

// crashChild runs in a re-executed test binary: it commits epoch 2 and is
// killed by SIGKILL after applying two pages.
func crashChild() {
	path := os.Getenv(crashEnv)
	if path == "" {
		return
	}
	r, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	pages, data := epoch2()
	memsync.SetCrashHook(r, func(k int) error {
		if k == 1 {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
		return nil
	})
	r.Stage(r.Epoch()+1, pages, data)
	r.Commit(context.Background(), r.Epoch()+1)
	os.Exit(3) // not reached
}

// TestReplicaKilledDuringApply kills a real process in the middle of a
// commit and checks the replica comes back at the new epoch.
func TestReplicaKilledDuringApply(t *testing.T) {
	r, path, e1 := replicaFixture(t)
	r.Close()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), crashEnv+"="+path)
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child should die by SIGKILL, got %v", err)
	}
	pages, data := epoch2()
	want := applied(e1, pages, data)
	if bytes.Equal(readFile(t, path), want) || bytes.Equal(readFile(t, path), e1) {
		t.Fatal("killed child should leave the file between epochs")
	}
	r2, err := memsync.OpenReplica(path, replicaPages*memsync.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if r2.Epoch() != 2 || !bytes.Equal(readFile(t, path), want) {
		t.Errorf("after replay: epoch %d", r2.Epoch())
	}
}
