package testbed_test

import (
	"context"
	"fmt"
	"io"
	"log"

	"github.com/ftctl/ftctl/pkg/testbed"
)

// A VM's address moves from host A to host B, and the client reaches it on
// both. (Needs root, so it is compiled but not run by go test; the package
// tests do the same and run.)
func Example() {
	ctx := context.Background()
	bed, err := testbed.New(ctx, testbed.Options{Prefix: "demo"})
	if err != nil {
		log.Fatal(err)
	}
	defer bed.Close()

	vm, err := bed.AddFakeVM(ctx, 0, bed.A)
	if err != nil {
		log.Fatal(err)
	}
	l, err := vm.Listen(ctx, "tcp", vm.LANAddr.String()+":7")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, "hello from", vm.On().Name)
			c.Close()
		}
	}()
	ask := func() {
		c, err := bed.Client.Dial(ctx, "tcp", l.Addr().String())
		if err != nil {
			log.Fatal(err)
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		fmt.Print(string(b))
	}
	ask()
	if err := vm.MoveTo(ctx, bed.B); err != nil { // what a failover does
		log.Fatal(err)
	}
	ask()
	// The replication link fails; the client does not notice.
	if err := bed.CutReplication(); err != nil {
		log.Fatal(err)
	}
	ask()
}
