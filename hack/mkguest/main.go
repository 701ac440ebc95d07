// Command mkguest builds ftctl's built-in test guest (pkg/guestimage) and
// prints where its kernel and initramfs are, for make guest and make demo:
//
//	go run ./hack/mkguest [-out DIR]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/ftctl/ftctl/pkg/guestimage"
)

func main() {
	out := flag.String("out", "", "output directory (default <repo>/_output/guest)")
	kver := flag.String("kernel", "", "kernel version (default: newest installed *-cloud-amd64)")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up after this long")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "mkguest: unexpected argument %q\n", flag.Arg(0))
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	start := time.Now()
	img, err := guestimage.Build(ctx, guestimage.Options{OutDir: *out, KernelVersion: *kver})
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkguest:", err)
		os.Exit(1)
	}
	fmt.Printf("kernel:  %s\ninitrd:  %s\ncmdline: %s\nhash:    %s\n(%v)\n",
		img.Kernel, img.Initrd, img.Cmdline, img.Hash, time.Since(start).Round(time.Millisecond))
}
