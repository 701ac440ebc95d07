package checker_test

import (
	"context"
	"fmt"
	"time"

	"github.com/ftctl/ftctl/pkg/checker"
)

// A failover check as `ftctl demo` and the kill test run it: start the
// checker against the protected VM's service, kill the primary, and ask
// Verify for the client's view of the failover.
func Example() {
	c, err := checker.New(checker.Config{
		Addr:       "10.0.2.15:7000", // the guest's tcp workload
		Interval:   20 * time.Millisecond,
		Timeout:    10 * time.Second,
		ShortConns: 4,
		// Dial: a dialer that connects from the client's namespace.
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()

	since := time.Now()
	// ... kill the primary here and let the secondary take over ...
	vctx, vcancel := context.WithTimeout(ctx, 60*time.Second)
	fo, err := c.Verify(vctx, since)
	vcancel()
	if err != nil {
		fmt.Println("failover check:", err)
	} else {
		fmt.Printf("downtime seen by the client: %v; acknowledged requests lost: %d\n", fo.Downtime, fo.Report.AckedLost)
	}
	cancel()
	if err := <-done; err != nil {
		fmt.Println("violations:", err)
	}
}
