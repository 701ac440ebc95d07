package backend

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"unsafe"
)

func image(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, bytes.Repeat([]byte{9}, int(size)), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFileOperations(t *testing.T) {
	ctx := context.Background()
	p := image(t, 1<<20)
	f, err := OpenFile(p, FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Size() != 1<<20 {
		t.Fatalf("size %d", f.Size())
	}
	if err := f.WriteAt(ctx, []byte("abc"), 100, FUA); err != nil {
		t.Fatal(err)
	}
	if err := f.Trim(ctx, 4096, 8192, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteZeroes(ctx, 1000, 10, NoHole); err != nil { // unaligned
		t.Fatal(err)
	}
	if err := f.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{9}, 1<<20)
	copy(want[100:], "abc")
	clear(want[4096 : 4096+8192])
	clear(want[1000:1010])
	got := make([]byte, 1<<20)
	if err := f.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("file contents differ from the model")
	}
	if d, h, ok := f.SeekData(4096); ok && (d != 4096+8192 || h != 1<<20) {
		t.Errorf("SeekData(4096) = %d, %d: the trimmed range should be a hole", d, h)
	}
	for name, err := range map[string]error{
		"read past end":  f.ReadAt(ctx, make([]byte, 2), 1<<20-1),
		"write past end": f.WriteAt(ctx, []byte("xy"), 1<<20-1, 0),
		"negative":       f.Trim(ctx, -1, 2, 0),
		"huge length":    f.WriteZeroes(ctx, 1, 1<<62, 0),
	} {
		if !errors.Is(err, ErrOutOfRange) {
			t.Errorf("%s: %v, want ErrOutOfRange", name, err)
		}
	}
	f.Close()
	if err := f.Flush(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("flush after close: %v", err)
	}
}

func TestFileReadOnlyAndBadPaths(t *testing.T) {
	ctx := context.Background()
	f, err := OpenFile(image(t, 4096), FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.WriteAt(ctx, []byte("a"), 0, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write on read-only: %v", err)
	}
	if _, err := OpenFile(filepath.Join(t.TempDir(), "missing"), FileOptions{}); err == nil {
		t.Error("missing image opened")
	}
	if _, err := OpenFile(t.TempDir(), FileOptions{}); err == nil {
		t.Error("a directory opened as an image")
	}
}

func TestAlignedBuf(t *testing.T) {
	for _, n := range []int{1, 4096, 65536} {
		b := AlignedBuf(n)
		if len(b) != n || cap(b) != n || uintptr(unsafe.Pointer(&b[0]))%Align != 0 {
			t.Errorf("AlignedBuf(%d): len %d cap %d misaligned", n, len(b), cap(b))
		}
	}
}

func TestMemMatchesCheckRange(t *testing.T) {
	m := NewMem(100)
	if err := m.WriteAt(context.Background(), []byte("x"), 100, 0); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("Mem write past end: %v", err)
	}
	if err := m.WriteZeroes(context.Background(), 0, 10, FUA); err != nil || m.FlushCount() != 1 {
		t.Errorf("FUA zeroes: %v, flushes %d", err, m.FlushCount())
	}
}
