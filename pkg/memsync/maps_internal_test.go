package memsync

import (
	"errors"
	"strings"
	"testing"
)

func TestParseMaps(t *testing.T) {
	const maps = `55d0c0000000-55d0c0001000 r--p 00000000 fd:01 123 /usr/bin/qemu
7f0000000000-7f0000400000 rw-s 00000000 00:1a 4242 /dev/shm/vm1 (deleted)
7f0000400000-7f0000800000 rw-s 00400000 00:1a 4242 /dev/shm/vm1
7f0000800000-7f0000900000 r--s 00000000 00:1a 4242 /dev/shm/vm1
7f0000900000-7f0000a00000 rw-p 00000000 00:1a 4242 /dev/shm/vm1
7f0000a00000-7f0000b00000 rw-s 00000000 00:1b 4242 /dev/shm/other-dev
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
`
	segs, err := parseMaps(strings.NewReader(maps), 0, 0x1a, 4242)
	if err != nil {
		t.Fatal(err)
	}
	want := []segment{
		{va: 0x7f0000000000, pgoff: 0, npages: 1024},
		{va: 0x7f0000400000, pgoff: 1024, npages: 1024},
	}
	if len(segs) != len(want) {
		t.Fatalf("got %d segments %+v, want %+v", len(segs), segs, want)
	}
	for i := range want {
		if segs[i] != want[i] {
			t.Errorf("segment %d: got %+v, want %+v", i, segs[i], want[i])
		}
	}
	_, err = parseMaps(strings.NewReader("zz-7f rw-s 00000000 00:1a 4242 /x\n"), 0, 0x1a, 4242)
	if !errors.Is(err, ErrCorrupt) {
		t.Errorf("bad address range: got %v, want ErrCorrupt", err)
	}
}

func TestBitmap(t *testing.T) {
	b := NewBitmap(130)
	for _, i := range []int{0, 63, 64, 129} {
		b.Set(i)
	}
	if b.Count() != 4 || !b.Test(63) || b.Test(62) {
		t.Fatalf("after sets: count %d pages %v", b.Count(), b.Pages())
	}
	var got []int
	for i := b.Next(0); i >= 0; i = b.Next(i + 1) {
		got = append(got, i)
	}
	if want := []int{0, 63, 64, 129}; !equalInts(got, want) || !equalInts(b.Pages(), want) {
		t.Errorf("Next walk %v, Pages %v, want %v", got, b.Pages(), want)
	}
	c := b.Clone()
	c.Unset(64)
	if !b.Test(64) || c.Test(64) || b.Equal(c) {
		t.Errorf("Clone is not independent")
	}
	if err := c.Or(b); err != nil || !c.Equal(b) {
		t.Errorf("Or: %v", err)
	}
	if err := c.Or(NewBitmap(5)); !errors.Is(err, ErrBadInput) {
		t.Errorf("Or of different lengths: %v", err)
	}
	b.SetAll()
	if b.Count() != 130 || b.Next(130) != -1 {
		t.Errorf("SetAll count %d", b.Count())
	}
	b.Reset()
	if b.Count() != 0 || b.Next(0) != -1 {
		t.Errorf("Reset count %d", b.Count())
	}
	defer func() {
		if recover() == nil {
			t.Errorf("Set(130) on a 130-page bitmap did not panic")
		}
	}()
	b.Set(130)
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
