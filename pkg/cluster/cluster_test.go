package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/pkg/agent"
)

func counterLog(vals ...uint64) []byte {
	var b strings.Builder
	b.WriteString("boot noise\n")
	for _, v := range vals {
		fmt.Fprintf(&b, "ftguest counter=%d\n", v)
	}
	return []byte(b.String())
}

func TestCheckResumedCounter(t *testing.T) {
	for _, tc := range []struct {
		name          string
		before, after []uint64
		repeated      uint64
		bad           string
	}{
		{"continues at the next value", []uint64{1, 2, 3}, []uint64{4, 5}, 0, ""},
		{"repeats what the primary printed after its last commit", []uint64{1, 2, 3, 4}, []uint64{3, 4, 5}, 2, ""},
		{"gap", []uint64{1, 2, 3}, []uint64{5, 6}, 0, "gap"},
		{"resumes before the primary's first value", []uint64{10, 11}, []uint64{5, 6}, 0, "never followed"},
		{"primary skipped", []uint64{1, 3}, []uint64{4}, 0, "primary's counter"},
		{"copy skipped", []uint64{1, 2}, []uint64{3, 5}, 0, "promoted copy's counter"},
		{"copy printed nothing", []uint64{1, 2}, nil, 0, "promoted copy 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := CheckResumedCounter(counterLog(tc.before...), counterLog(tc.after...))
			if tc.bad == "" {
				if err != nil || rep != tc.repeated {
					t.Fatalf("got %d, %v; want %d, nil", rep, err, tc.repeated)
				}
				return
			}
			if !errors.Is(err, ErrCheck) || !strings.Contains(err.Error(), tc.bad) {
				t.Fatalf("got %v; want ErrCheck saying %q", err, tc.bad)
			}
		})
	}
}

func TestParsePromotion(t *testing.T) {
	p, err := ParsePromotion(agent.VMStatus{Reason: "primary lost (x): promote; resumed epoch 181 in 20.602ms"})
	if err != nil || p.Epoch != 181 || p.Duration != 20602*time.Microsecond {
		t.Fatalf("got %+v, %v", p, err)
	}
	if _, err := ParsePromotion(agent.VMStatus{Reason: "standby"}); !errors.Is(err, ErrCheck) {
		t.Fatalf("a reason without the resumed epoch gave %v", err)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	dir := t.TempDir()
	notExec := filepath.Join(dir, "ftctl")
	if err := os.WriteFile(notExec, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{}, "no ftctl binary"},
		{Options{Binary: filepath.Join(dir, "missing")}, "missing"},
		{Options{Binary: dir}, "not an executable"},
		{Options{Binary: notExec}, "not an executable"},
		{Options{Binary: "/bin/true", PeerTimeout: -time.Second}, "negative peer timeout"},
	} {
		c, err := New(context.Background(), tc.o)
		if c != nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, %v; want ErrConfig saying %q", tc.o, c, err, tc.want)
		}
	}
}

func TestKillString(t *testing.T) {
	seen := map[string]bool{}
	for _, k := range []Kill{KillBoth, KillQEMU, KillAgent, Kill(9)} {
		s := k.String()
		if s == "" || seen[s] {
			t.Fatalf("Kill %d has name %q (seen: %v)", int(k), s, seen)
		}
		seen[s] = true
	}
}
