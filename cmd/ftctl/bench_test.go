package main

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/urfave/cli/v3"
)

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- { // unsorted on purpose
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	for p, want := range map[float64]time.Duration{50: 50 * time.Millisecond, 99: 99 * time.Millisecond, 100: 100 * time.Millisecond, 0: time.Millisecond} {
		if got := percentile(d, p); got != want {
			t.Errorf("p%v = %v, want %v", p, got, want)
		}
	}
	if d[0] != 100*time.Millisecond {
		t.Error("percentile sorted its input in place")
	}
	if got := percentile(nil, 50); got != 0 {
		t.Errorf("p50 of nothing = %v", got)
	}
}

func TestLastMatch(t *testing.T) {
	log := []byte("ftguest cpu round=1 ms=3 sum=ab\nnoise\nftguest mem dirtied=40 behind=0 s=1\nftguest cpu round=2 ms=3 sum=cd\nftguest mem dirtied=90 behind=0 s=2\n")
	if got := lastMatch(cpuRoundRE, log); got != 2 {
		t.Errorf("last cpu round %d, want 2", got)
	}
	if got := lastMatch(memRE, log); got != 90 {
		t.Errorf("last dirtied %d, want 90", got)
	}
	if got := lastMatch(memRE, []byte("nothing")); got != 0 {
		t.Errorf("no lines gave %d", got)
	}
}

func TestInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	boom := errors.New("boom")
	if err := interrupted(ctx, boom); err != boom {
		t.Fatalf("a live context changed the error to %v", err)
	}
	cancel()
	err := interrupted(ctx, context.Canceled)
	var ec cli.ExitCoder
	if !errors.As(err, &ec) || ec.ExitCode() != 130 {
		t.Fatalf("after Ctrl-C got %v", err)
	}
	if interrupted(ctx, nil) != nil {
		t.Fatal("a finished run became an error")
	}
}

func TestBenchRefusesBadDuration(t *testing.T) {
	app := newApp()
	app.ExitErrHandler = func(context.Context, *cli.Command, error) {} // not os.Exit
	app.Writer, app.ErrWriter = io.Discard, io.Discard
	for _, d := range []string{"1s", "2h"} {
		err := app.Run(context.Background(), []string{"ftctl", "bench", "--duration", d})
		var ec cli.ExitCoder
		if !errors.As(err, &ec) || ec.ExitCode() != 2 {
			t.Errorf("--duration %s gave %v, want a usage error", d, err)
		}
	}
}
