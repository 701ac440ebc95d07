package netbuf_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/ftctl/ftctl/pkg/netbuf"
)

// The coordinator's view of one epoch: the guest emits a frame, the
// Outbound trigger fires, the checkpoint seals the epoch, and the frame
// reaches the host port only when the epoch is released.
func Example() {
	dir, _ := os.MkdirTemp("", "netbuf-example")
	defer os.RemoveAll(dir)
	host, world := netbuf.Pipe() // a tap in production: netbuf.OpenTap
	b, err := netbuf.New(filepath.Join(dir, "nic.sock"), host, netbuf.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer b.Close()
	go b.Serve(context.Background())

	// QEMU's -netdev stream connects and the guest sends a 60-byte frame.
	qemu, err := net.Dial("unix", b.Addr())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer qemu.Close()
	frame := make([]byte, 60)
	qemu.Write(binary.BigEndian.AppendUint32(nil, uint32(len(frame))))
	qemu.Write(frame)

	<-b.Outbound()        // Kemari trigger: take a checkpoint
	n, bytes := b.Seal(1) // guest paused at the end of epoch 1
	fmt.Println("sealed", n, "frames,", bytes, "bytes")
	fmt.Println("held", b.Stats().HeldFrames)
	b.Release(1) // ACK(1) from the secondary
	buf := make([]byte, netbuf.MaxFrameSize)
	got, _ := world.ReadFrame(context.Background(), buf)
	fmt.Println("released", got, "bytes")
	// Output:
	// sealed 1 frames, 60 bytes
	// held 1
	// released 60 bytes
}
