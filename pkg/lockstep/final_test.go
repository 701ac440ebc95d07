package lockstep_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/lockstep"
	"github.com/ftctl/ftctl/pkg/lockstep/wire"
)

// TestSecondaryReadsFinalControlAfterFailedWrite: the primary sends a last
// control message (the agents' "the VM died here") and closes without
// reading the secondary's acks and heartbeats. The secondary was busy (a
// commit, or an earlier control message) and its next write fails: it must
// still hand the control message, which had arrived, to OnControl.
func TestSecondaryReadsFinalControlAfterFailedWrite(t *testing.T) {
	for _, busy := range []string{"commit", "control"} {
		t.Run(busy, func(t *testing.T) {
			p := newFakePrimary(t)
			dir := t.TempDir()
			fs := openFakeSecondary(t, dir)
			defer fs.close()
			closed := make(chan struct{}) // the primary has closed the link
			got := make(chan string, 4)
			sec, err := lockstep.OpenSecondary(context.Background(), lockstep.SecondaryConfig{
				Replica: fs.replica, Replayer: fs.replayer, StateDir: filepath.Join(dir, "state"), Logger: quiet,
				Heartbeat: time.Millisecond,
				OnCommit: func(lockstep.CommitStats) {
					if busy == "commit" {
						<-closed
						time.Sleep(20 * time.Millisecond) // let a heartbeat fail
					}
				},
				OnControl: func(ctx context.Context, b []byte) error {
					got <- string(b)
					if string(b) == "busy" {
						<-closed
						time.Sleep(20 * time.Millisecond)
					}
					return nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			a, b := wire.Pipe(16)
			defer b.Close()
			done := make(chan error, 1)
			go func() { done <- sec.Run(context.Background(), b) }()
			ctx := context.Background()
			if busy == "commit" {
				if err := p.epoch(lockstep.KindCheckpoint, 4, 2).send(t, a, wire.NewEpochSender(a)); err != nil {
					t.Fatal(err)
				}
			} else if err := a.Send(ctx, wire.Frame{Type: wire.TypeControl, Payload: []byte("busy")}); err != nil {
				t.Fatal(err)
			}
			if err := a.Send(ctx, wire.Frame{Type: wire.TypeControl, Payload: []byte("vm-lost")}); err != nil {
				t.Fatal(err)
			}
			a.Close()
			close(closed)
			select {
			case err := <-done:
				t.Logf("Run returned %v", err)
				if c := sec.Committed(); busy == "commit" && c.Epoch != 1 {
					t.Errorf("committed %+v; the epoch that arrived whole is not committed", c)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Run did not return after the primary closed")
			}
			close(got)
			var msgs []string
			for m := range got {
				msgs = append(msgs, m)
			}
			if len(msgs) == 0 || msgs[len(msgs)-1] != "vm-lost" {
				t.Fatalf("control messages handled: %q; the last one, sent before the primary closed, is missing", msgs)
			}
		})
	}
}
