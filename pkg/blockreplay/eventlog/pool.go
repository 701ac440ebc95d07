package eventlog

import (
	"math/bits"
	"sync"
)

// Event data buffers come from power-of-two pools: a fresh 64 KiB
// allocation per guest write costs more (page faults, cache misses, GC) than
// the copy itself.
var dataPools [27]sync.Pool // up to 64 MiB

func dataClass(n int) int { return bits.Len(uint(n - 1)) }

func getData(n int) []byte {
	if n == 0 {
		return nil
	}
	c := dataClass(n)
	if c >= len(dataPools) {
		return make([]byte, n)
	}
	if p, ok := dataPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<c)
}

// Recycle hands a record's data buffer back for reuse. Call it only when
// nothing refers to r.Data any more (the record was sent on, staged or
// applied); records that are never recycled are simply collected.
func Recycle(r Record) {
	c := cap(r.Data)
	if c == 0 || c&(c-1) != 0 || dataClass(c) >= len(dataPools) {
		return
	}
	b := r.Data[:c]
	dataPools[dataClass(c)].Put(&b)
}
