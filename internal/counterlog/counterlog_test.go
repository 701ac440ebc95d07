package counterlog

import (
	"errors"
	"testing"
)

func TestValuesSkipsNoise(t *testing.T) {
	log := []byte("[    0.1] kernel\r\nftguest counter=1\r\nftguest disk seq=4\nftguest counter=2\nftguest counter=x\nftguest counter=3")
	got := Values(log)
	want := []uint64{1, 2, 3}
	if len(got) != len(want) {
		t.Fatalf("Values = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("Values = %v, want %v", got, want)
		}
	}
}

func TestCheck(t *testing.T) {
	if last, err := Check([]uint64{7, 8, 9}); err != nil || last != 9 {
		t.Fatalf("Check(7,8,9) = %d, %v", last, err)
	}
	for _, bad := range [][]uint64{nil, {1, 3}, {1, 2, 2}, {5, 4}} {
		if _, err := Check(bad); !errors.Is(err, ErrDiscontinuity) {
			t.Errorf("Check(%v) = %v, want ErrDiscontinuity", bad, err)
		}
	}
}

func TestStitchCompletesHalfLine(t *testing.T) {
	primary := []byte("ftguest counter=41\nftguest coun")
	restored := []byte("ter=42\nftguest counter=43\n")
	last, err := Check(Values(Stitch(primary, restored)))
	if err != nil || last != 43 {
		t.Fatalf("stitched check = %d, %v", last, err)
	}
	// A restored copy that lost a step is caught.
	if _, err := Check(Values(Stitch([]byte("ftguest counter=41\n"), []byte("ftguest counter=43\n")))); err == nil {
		t.Fatal("gap not detected")
	}
}

func TestLastDiskSeq(t *testing.T) {
	log := []byte("ftguest disk seq=3\r\nftguest counter=9\nftguest disk seq=4\nftguest disk seq=x\nftguest disk se")
	if got := LastDiskSeq(log); got != 4 {
		t.Fatalf("LastDiskSeq = %d, want 4", got)
	}
	if got := LastDiskSeq([]byte("nothing")); got != 0 {
		t.Fatalf("LastDiskSeq of no records = %d", got)
	}
}
