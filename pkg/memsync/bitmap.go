package memsync

import (
	"fmt"
	"math/bits"
)

// Bitmap is a set of guest page indices in [0, Len()). The zero value is an
// empty set of length zero. Distinct 64-page words may be written by
// different goroutines at once; a single word may not.
type Bitmap struct {
	n     int
	words []uint64
}

// NewBitmap returns an empty set able to hold pages 0..n-1.
func NewBitmap(n int) *Bitmap {
	if n < 0 {
		n = 0
	}
	return &Bitmap{n: n, words: make([]uint64, (n+63)/64)}
}

// Len is the number of pages the set can hold (not how many are in it).
func (b *Bitmap) Len() int { return b.n }

// Set adds page i. It panics only on an index the caller computed wrongly,
// like a slice index would.
func (b *Bitmap) Set(i int) {
	b.check(i)
	b.words[i>>6] |= 1 << (uint(i) & 63)
}

// Unset removes page i.
func (b *Bitmap) Unset(i int) {
	b.check(i)
	b.words[i>>6] &^= 1 << (uint(i) & 63)
}

// Test reports whether page i is in the set.
func (b *Bitmap) Test(i int) bool {
	b.check(i)
	return b.words[i>>6]&(1<<(uint(i)&63)) != 0
}

func (b *Bitmap) check(i int) {
	if i < 0 || i >= b.n {
		panic(fmt.Sprintf("memsync: page %d out of range [0,%d)", i, b.n))
	}
}

// Count returns how many pages are in the set.
func (b *Bitmap) Count() int {
	c := 0
	for _, w := range b.words {
		c += bits.OnesCount64(w)
	}
	return c
}

// Reset empties the set.
func (b *Bitmap) Reset() { clear(b.words) }

// SetAll adds every page.
func (b *Bitmap) SetAll() {
	for i := range b.words {
		b.words[i] = ^uint64(0)
	}
	if r := b.n & 63; r != 0 {
		b.words[len(b.words)-1] = (1 << uint(r)) - 1
	}
}

// Or adds every page of o to b. Both must have the same Len.
func (b *Bitmap) Or(o *Bitmap) error {
	if o.n != b.n {
		return fmt.Errorf("%w: bitmap lengths %d and %d differ", ErrBadInput, b.n, o.n)
	}
	for i, w := range o.words {
		b.words[i] |= w
	}
	return nil
}

// Equal reports whether b and o hold the same pages and have the same Len.
func (b *Bitmap) Equal(o *Bitmap) bool {
	if b.n != o.n {
		return false
	}
	for i, w := range b.words {
		if o.words[i] != w {
			return false
		}
	}
	return true
}

// Clone returns an independent copy.
func (b *Bitmap) Clone() *Bitmap {
	return &Bitmap{n: b.n, words: append([]uint64(nil), b.words...)}
}

// Next returns the smallest page >= i in the set, or -1 if there is none.
func (b *Bitmap) Next(i int) int {
	if i < 0 {
		i = 0
	}
	if i >= b.n {
		return -1
	}
	wi := i >> 6
	w := b.words[wi] >> (uint(i) & 63)
	if w != 0 {
		return i + bits.TrailingZeros64(w)
	}
	for wi++; wi < len(b.words); wi++ {
		if w := b.words[wi]; w != 0 {
			return wi<<6 + bits.TrailingZeros64(w)
		}
	}
	return -1
}

// Pages returns the pages in the set in increasing order.
func (b *Bitmap) Pages() []int {
	out := make([]int, 0, b.Count())
	for wi, w := range b.words {
		for w != 0 {
			t := bits.TrailingZeros64(w)
			out = append(out, wi<<6+t)
			w &= w - 1
		}
	}
	return out
}
