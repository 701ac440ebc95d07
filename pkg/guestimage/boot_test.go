package guestimage_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftctl/ftctl/internal/diskrec"
	"github.com/ftctl/ftctl/pkg/guestimage"
)

// qemuGuest is a test guest run from a plain QEMU argv.
type qemuGuest struct {
	cmd  *exec.Cmd
	log  string
	done chan error
}

func bootGuest(ctx context.Context, t *testing.T, img guestimage.Image, appendArgs string, extra ...string) *qemuGuest {
	t.Helper()
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("needs qemu-system-x86_64 (hack/deps.sh):", err)
	}
	log := filepath.Join(t.TempDir(), "serial.log")
	args := []string{
		"-accel", "tcg", "-machine", "pc", "-nodefaults", "-vga", "none", "-display", "none",
		"-m", "256", "-no-reboot",
		"-kernel", img.Kernel, "-initrd", img.Initrd,
		"-append", img.Cmdline + " " + appendArgs,
		"-chardev", "file,id=s0,path=" + log, "-serial", "chardev:s0",
	}
	cmd := exec.CommandContext(ctx, qemu, append(args, extra...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	g := &qemuGuest{cmd: cmd, log: log, done: make(chan error, 1)}
	go func() {
		err := cmd.Wait()
		if err != nil && stderr.Len() > 0 {
			err = fmt.Errorf("%w: %s", err, stderr.String())
		}
		g.done <- err
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-g.done
		if t.Failed() {
			b, _ := os.ReadFile(log)
			t.Logf("serial log:\n%s", b)
		}
	})
	return g
}

func (g *qemuGuest) serial() string {
	b, _ := os.ReadFile(g.log)
	return string(b)
}

// waitFor polls the serial log until re matches.
func (g *qemuGuest) waitFor(ctx context.Context, t *testing.T, re *regexp.Regexp) []string {
	t.Helper()
	for {
		if m := re.FindStringSubmatch(g.serial()); m != nil {
			return m
		}
		select {
		case <-ctx.Done():
			t.Fatalf("guest never printed %q: %v", re, ctx.Err())
		case err := <-g.done:
			g.done <- err
			t.Fatalf("QEMU exited (%v) before the guest printed %q", err, re)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func buildCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

var (
	counterRE = regexp.MustCompile(`(?m)^ftguest counter=(\d+)\r?$`)
	diskRE    = regexp.MustCompile(`(?m)^ftguest disk seq=(\d+)\r?$`)
)

func TestBootDefaultGuest(t *testing.T) {
	ctx := buildCtx(t)
	img, err := guestimage.Default(ctx)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(t.TempDir(), "disk.raw")
	const diskSize = 16 << 20
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, diskSize); err != nil {
		t.Fatal(err)
	}
	port := freeLoopbackPort(t)
	start := time.Now()
	g := bootGuest(ctx, t, img, "ftguest.run=counter,disk,tcp ftguest.ip=10.0.2.15/24 ftguest.gw=10.0.2.2",
		"-drive", "file="+disk+",format=raw,if=virtio",
		// restrict=on: the guest reaches nothing; only our forward gets in.
		"-netdev", fmt.Sprintf("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:%d-:7000", port),
		"-device", "virtio-net-pci,netdev=n0",
		"-device", "virtio-rng-pci")

	g.waitFor(ctx, t, regexp.MustCompile(`ftguest ready run=counter,disk,tcp`))
	t.Logf("guest ready %v after QEMU start", time.Since(start).Round(time.Millisecond))

	// The TCP service through the loopback-only forward.
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(conn)
	for i, line := range []string{"hello", "second line"} {
		fmt.Fprintf(conn, "%s\n", line)
		reply, err := r.ReadString('\n')
		if want := fmt.Sprintf("seq=%d %s\n", i+1, line); err != nil || reply != want {
			t.Fatalf("reply %q (err %v), want %q", reply, err, want)
		}
	}

	// Let the disk writer get a few records in, then pull the plug.
	g.waitFor(ctx, t, regexp.MustCompile(`(?m)^ftguest disk seq=5\r?$`))
	g.waitFor(ctx, t, regexp.MustCompile(`(?m)^ftguest counter=20\r?$`))
	g.cmd.Process.Kill()
	<-g.done
	g.done <- nil
	log := g.serial()

	var counts []int
	for _, m := range counterRE.FindAllStringSubmatch(log, -1) {
		n, _ := strconv.Atoi(m[1])
		counts = append(counts, n)
	}
	for i, n := range counts {
		if n != i+1 {
			t.Fatalf("counter line %d reads %d; lines must be 1, 2, 3, ...", i, n)
		}
	}
	if len(counts) < 20 {
		t.Fatalf("%d counter lines, want at least 20", len(counts))
	}
	if strings.Count(log, "ftguest counter=") != len(counts) {
		t.Fatal("some counter lines were not whole lines of their own")
	}
	diskLines := diskRE.FindAllStringSubmatch(log, -1)
	lastPrinted, _ := strconv.ParseUint(diskLines[len(diskLines)-1][1], 10, 64)

	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rep, err := diskrec.Verify(f, diskSize)
	if err != nil {
		t.Fatalf("disk chain broken: %v (report %+v)", err, rep)
	}
	if rep.LastSeq < lastPrinted || rep.FirstSeq != 1 || rep.Records != int64(rep.LastSeq) {
		t.Fatalf("disk holds seqs %d..%d (%d records), but the guest printed seq %d as durable",
			rep.FirstSeq, rep.LastSeq, rep.Records, lastPrinted)
	}
	t.Logf("%d counter lines, disk chain 1..%d (last printed %d)", len(counts), rep.LastSeq, lastPrinted)
}

func TestBootInitImageExits(t *testing.T) {
	ctx := buildCtx(t)
	script := filepath.Join(t.TempDir(), "exit3")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"extra program ran with $1\"\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	img, err := guestimage.Build(ctx, guestimage.Options{
		Extra: []guestimage.File{{HostPath: script, GuestPath: "/usr/local/bin/exit3"}},
		Init:  "/usr/local/bin/exit3 argument-one",
	})
	if err != nil {
		t.Fatal(err)
	}
	def, err := guestimage.Default(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if img.Initrd == def.Initrd || img.Hash == def.Hash {
		t.Fatalf("the Init image shares the default image's place or hash: %s", img.Initrd)
	}
	g := bootGuest(ctx, t, img, "")
	select {
	case err := <-g.done:
		g.done <- err
		if err != nil {
			t.Fatalf("QEMU: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("QEMU did not exit by itself after the Init command finished")
	}
	log := g.serial()
	if !strings.Contains(log, "extra program ran with argument-one") {
		t.Fatalf("the Init command did not run the extra program")
	}
	if !regexp.MustCompile(`(?m)^ftguest-exit=3\r?$`).MatchString(log) {
		t.Fatalf("no ftguest-exit=3 line")
	}
	if strings.Contains(log, "ftguest ready") {
		t.Fatal("ftguest ran although Init replaces it")
	}
}
