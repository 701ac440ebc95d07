package main

import (
	"context"
	"time"
)

// counter prints "ftguest counter=N" every interval.
type counter struct {
	con      *console
	interval time.Duration
	n        uint64
}

func (c *counter) name() string { return "counter" }

func (c *counter) start(context.Context) (func(context.Context) error, error) {
	return func(ctx context.Context) error {
		return tick(ctx, c.interval, func() error {
			c.n++
			c.con.printf("ftguest counter=%d", c.n)
			return nil
		})
	}, nil
}
