package memsync_test

import (
	"math/rand/v2"
	"unsafe"

	"github.com/ftctl/ftctl/pkg/memsync"
)

// Page mixes for round-trip tests and encoder benchmarks. Each returns
// the previous and the new version of n pages, contiguous.
var mixes = []string{"sparse", "text", "random", "zero", "mixed"}

var words = []string{"the", "of", "kernel", "page", "memory", "guest", "and", "a",
	"checkpoint", "to", "in", "is", "replica", "epoch", "for", "dirty", "{", "}",
	"return", "err", "nil", "func", "int", "0x7f", "=", "if", "\n", "\t", ";"}

func fillRandom(rng *rand.Rand, p []byte) {
	for i := 0; i+8 <= len(p); i += 8 {
		*(*uint64)(unsafe.Pointer(&p[i])) = rng.Uint64()
	}
}

func fillText(rng *rand.Rand, p []byte) {
	i := 0
	for i < len(p) {
		w := words[rng.IntN(len(words))]
		i += copy(p[i:], w)
		if i < len(p) {
			p[i] = ' '
			i++
		}
	}
}

// sparse changes: a few short runs of bytes changed in a page, like
// counters, pointers and list links.
func sparseChange(rng *rand.Rand, p []byte) {
	for range 1 + rng.IntN(6) {
		off := rng.IntN(len(p) - 16)
		for j := range 1 + rng.IntN(16) {
			p[off+j] ^= byte(1 + rng.IntN(255))
		}
	}
}

func genMix(rng *rand.Rand, mix string, n int) (old, cur []byte) {
	old = make([]byte, n*memsync.PageSize)
	cur = make([]byte, n*memsync.PageSize)
	for i := range n {
		o := old[i*memsync.PageSize : (i+1)*memsync.PageSize]
		c := cur[i*memsync.PageSize : (i+1)*memsync.PageSize]
		m := mix
		if m == "mixed" {
			// A guess at a busy guest between checkpoints: mostly small
			// updates, some rewritten text/page cache, some fresh
			// random data, some freed (zeroed) pages.
			switch r := rng.IntN(10); {
			case r < 6:
				m = "sparse"
			case r < 8:
				m = "text"
			case r < 9:
				m = "random"
			default:
				m = "zero"
			}
		}
		switch m {
		case "sparse":
			if rng.IntN(2) == 0 {
				fillText(rng, o)
			} else {
				fillRandom(rng, o)
			}
			copy(c, o)
			sparseChange(rng, c)
		case "text":
			fillText(rng, o)
			fillText(rng, c)
		case "random":
			fillRandom(rng, o)
			fillRandom(rng, c)
		case "zero":
			fillRandom(rng, o)
		}
	}
	return old, cur
}
