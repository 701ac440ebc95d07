package memsync

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/cespare/xxhash/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// Codec says how a changed page's XOR delta is compressed. Whatever the
// codec, a zero page is sent as a one-byte flag, an unchanged page is not
// sent, and a page whose compressed delta would not be smaller than the page
// is sent raw.
type Codec uint8

// Codecs.
const (
	// CodecRaw sends changed pages verbatim (the baseline).
	CodecRaw Codec = 1
	// CodecXORRLE run-length encodes the zero runs of the XOR delta (the
	// seed's scheme).
	CodecXORRLE Codec = 2
	// CodecXORZstd compresses the XOR delta with zstd (fastest level).
	CodecXORZstd Codec = 3
	// CodecXORLZ4 compresses the XOR delta with an LZ4 block.
	CodecXORLZ4 Codec = 4
	// CodecXORRLELZ4 is XOR+RLE, and for a page whose delta is dense (the
	// RLE gives up) an LZ4 block of the page itself: XORing two unrelated
	// contents destroys what made them compressible.
	CodecXORRLELZ4 Codec = 5
	// CodecXORRLEZstd is CodecXORRLELZ4 with zstd for dense pages.
	CodecXORRLEZstd Codec = 6
)

var allCodecs = []Codec{CodecRaw, CodecXORRLE, CodecXORZstd, CodecXORLZ4, CodecXORRLELZ4, CodecXORRLEZstd}

// DefaultCodec is XOR+RLE with an LZ4 fallback for dense pages, chosen by
// measurement. BenchmarkEncode (one core, 4 MiB of pages per mix, this
// project's 2-core EPYC machine, shared, so speeds are +-30%), output/input
// ratio and input MB/s:
//
//	mix     raw        xor+rle      xor+lz4      xor+zstd     xor+rle/lz4  xor+rle/zstd
//	sparse  1     4200 0.010  5000  0.021  5200  0.017   780  0.010  4900  0.010  4400
//	text    1     3300 0.996   500  0.991   720  1.000  2100  0.528   300  0.340   180
//	random  1     4800 1.000  2500  1.000  1500  1.000  2600  1.000   900  1.000  1300
//	zero    0.0005 for every codec (a flag per page), 25000-33000
//	mixed   0.90  4300 0.302  1700  0.308  2200  0.307  1100  0.210  1100  0.173   770
//
// On real guest RAM (pkg/memsync/guesttest, a 256 MiB TCG guest running
// the test workload): the full RAM against an empty replica gives 0.377
// raw, 0.322 xor+rle, 0.205 xor+lz4, 0.179 xor+zstd, 0.205 xor+rle/lz4;
// the pages changed in 300 ms give 0.021 xor+rle, 0.030 xor+lz4, 0.024
// xor+zstd, 0.018 xor+rle/lz4, 0.017 xor+rle/zstd.
//
// Sparse changes, the common case between checkpoints, go through XOR+RLE
// alone: the smallest output and the fastest encoder (one pass, no hash
// table). A general compressor on the XOR delta never beats it there and
// does little for dense pages, because XORing two unrelated contents
// destroys what made them compressible; so dense pages also try LZ4 on the
// page itself. On the mixed workload that cuts the output by a third (0.30
// to 0.21) and on real RAM by 13-36%, at about 1 GB/s per core: faster than
// a 10 GbE link on two cores, and the checkpoint's send time, not the
// encode (which runs after cont), is what held-back output waits for.
// CodecXORRLEZstd compresses further (0.17 mixed) at 0.75 GB/s, for slow
// links.
const DefaultCodec = CodecXORRLELZ4

// String names the codec.
func (c Codec) String() string {
	switch c {
	case CodecRaw:
		return "raw"
	case CodecXORRLE:
		return "xor+rle"
	case CodecXORZstd:
		return "xor+zstd"
	case CodecXORLZ4:
		return "xor+lz4"
	case CodecXORRLELZ4:
		return "xor+rle/lz4"
	case CodecXORRLEZstd:
		return "xor+rle/zstd"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// ParseCodec turns a user's option value into a Codec.
func ParseCodec(s string) (Codec, error) {
	for _, c := range allCodecs {
		if c.String() == s {
			return c, nil
		}
	}
	if s == "" {
		return DefaultCodec, nil
	}
	return 0, fmt.Errorf("%w: codec %q (want raw, xor+rle, xor+zstd, xor+lz4, xor+rle/lz4 or xor+rle/zstd)", ErrBadInput, s)
}

// Page record kinds on the wire.
const (
	kindZero   byte = 0
	kindRaw    byte = 1
	kindXORRLE byte = 2
	kindZstd   byte = 3
	kindLZ4    byte = 4
	// Plain kinds compress the page itself, not a delta.
	kindLZ4Plain  byte = 5
	kindZstdPlain byte = 6
)

// isDelta reports whether a record kind is relative to the previous version.
func isDelta(kind byte) bool { return kind == kindXORRLE || kind == kindZstd || kind == kindLZ4 }

// Frame layout:
//
//	"FTMP" | version (1) | codec (1) | epoch (uvarint) | records | xxhash64 (8, LE)
//	record: gap (uvarint: page - next expected page) | kind (1) | [len (uvarint) | payload]
//
// kindZero has no payload; kindRaw has exactly PageSize bytes and no length;
// the others carry a length. The checksum covers everything before it and is
// checked before any page is decoded.
const (
	frameMagic   = "FTMP"
	frameVersion = 1
	frameHeader  = len(frameMagic) + 2
	frameTrailer = 8
	// rleMinZeroRun is the shortest zero run worth ending a literal for:
	// splitting costs about two length bytes.
	rleMinZeroRun = 3
	// denseDelta is the RLE output size above which the hybrid codecs also
	// try compressing the page itself and keep the smaller.
	denseDelta = PageSize / 4
)

// Stats counts what an Encode produced.
type Stats struct {
	Pages     int // pages in the snapshot
	Unchanged int // identical to the base: not sent
	Zero      int // sent as a flag
	Raw       int // sent verbatim
	Delta     int // sent as a compressed XOR delta
	InBytes   int // Pages * PageSize
	OutBytes  int // frame size
}

// Ratio is OutBytes/InBytes.
func (s Stats) Ratio() float64 {
	if s.InBytes == 0 {
		return 0
	}
	return float64(s.OutBytes) / float64(s.InBytes)
}

func (s *Stats) add(o Stats) {
	s.Pages += o.Pages
	s.Unchanged += o.Unchanged
	s.Zero += o.Zero
	s.Raw += o.Raw
	s.Delta += o.Delta
}

// Encoder turns Snapshots into frames. It is safe for one Encode at a time.
type Encoder struct {
	codec   Codec
	workers int
	zenc    *zstd.Encoder
	lz      []lz4.Compressor
	scratch [][]byte
}

// NewEncoder returns an encoder using codec c on up to workers goroutines
// (0: GOMAXPROCS).
func NewEncoder(c Codec, workers int) (*Encoder, error) {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	e := &Encoder{codec: c, workers: workers}
	switch c {
	case CodecRaw, CodecXORRLE:
	case CodecXORZstd, CodecXORRLEZstd:
		z, err := zstd.NewWriter(nil,
			zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderCRC(false),
			zstd.WithEncoderConcurrency(workers),
			zstd.WithLowerEncoderMem(true),
			zstd.WithWindowSize(1<<16))
		if err != nil {
			return nil, fmt.Errorf("memsync: zstd encoder: %w", err)
		}
		e.zenc = z
	case CodecXORLZ4, CodecXORRLELZ4:
		e.lz = make([]lz4.Compressor, workers)
	default:
		return nil, fmt.Errorf("%w: unknown codec %d", ErrBadInput, c)
	}
	e.scratch = make([][]byte, workers)
	for i := range e.scratch {
		e.scratch[i] = make([]byte, 2*PageSize+lz4.CompressBlockBound(PageSize))
		// [0,P): delta; [P,2P): RLE/zstd output; [2P,...): second candidate.
	}
	return e, nil
}

// Codec is the encoder's codec.
func (e *Encoder) Codec() Codec { return e.codec }

// parallelEncodePages is the snapshot size above which Encode splits the
// work over goroutines.
const parallelEncodePages = 256

// Encode appends to dst the frame for snap: each page relative to its
// version in base. Only when it succeeds does it copy the snapshot's pages
// into base, so base then equals what the peer has once it applies the
// frame. If the frame is then not delivered, base no longer matches the
// peer and a full resync is needed.
func (e *Encoder) Encode(dst []byte, snap *Snapshot, base *Base) ([]byte, Stats, error) {
	n := base.NumPages()
	for k, p := range snap.Pages {
		if p < 0 || p >= n || (k > 0 && p <= snap.Pages[k-1]) {
			return dst, Stats{}, fmt.Errorf("%w: snapshot pages not strictly increasing within [0,%d) at %d", ErrBadInput, n, k)
		}
	}
	if len(snap.Data) != len(snap.Pages)*PageSize {
		return dst, Stats{}, fmt.Errorf("%w: snapshot has %d bytes for %d pages", ErrBadInput, len(snap.Data), len(snap.Pages))
	}
	start := len(dst)
	dst = append(dst, frameMagic...)
	dst = append(dst, frameVersion, byte(e.codec))
	dst = binary.AppendUvarint(dst, snap.Epoch)

	var st Stats
	parts := 1
	if len(snap.Pages) >= parallelEncodePages {
		parts = e.workers
	}
	if parts == 1 {
		var err error
		dst, st, _, err = e.encodeRange(dst, 0, snap, 0, len(snap.Pages), base, 0)
		if err != nil {
			return dst[:start], Stats{}, err
		}
	} else {
		// Each part's gaps are relative to its own first page; the first
		// record's gap is rewritten on concatenation, because which pages
		// the previous part skipped as unchanged is only known afterwards.
		outs := make([][]byte, parts)
		stats := make([]Stats, parts)
		lasts := make([]int, parts)
		errs := make([]error, parts)
		per := (len(snap.Pages) + parts - 1) / parts
		var wg sync.WaitGroup
		for w := range parts {
			lo, hi := w*per, min((w+1)*per, len(snap.Pages))
			if lo >= hi {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				outs[w], stats[w], lasts[w], errs[w] = e.encodeRange(make([]byte, 0, (hi-lo)*PageSize/4), w, snap, lo, hi, base, snap.Pages[lo])
			}()
		}
		wg.Wait()
		next := 0
		for w := range parts {
			if errs[w] != nil {
				return dst[:start], Stats{}, errs[w]
			}
			st.add(stats[w])
			if len(outs[w]) == 0 {
				continue
			}
			g0, n := binary.Uvarint(outs[w])
			first := snap.Pages[w*per] + int(g0)
			dst = binary.AppendUvarint(dst, uint64(first-next))
			dst = append(dst, outs[w][n:]...)
			next = lasts[w] + 1
		}
	}
	dst = binary.LittleEndian.AppendUint64(dst, xxhash.Sum64(dst[start:]))
	for k, p := range snap.Pages {
		copy(base.Page(p), snap.Page(k))
	}
	st.Pages = len(snap.Pages)
	st.InBytes = len(snap.Data)
	st.OutBytes = len(dst) - start
	return dst, st, nil
}

// encodeRange encodes snapshot pages [lo,hi) with worker w's scratch state.
// next is the page the first record's gap is relative to. It also returns
// the last page it wrote a record for.
func (e *Encoder) encodeRange(dst []byte, w int, snap *Snapshot, lo, hi int, base *Base, next int) ([]byte, Stats, int, error) {
	var st Stats
	scratch := e.scratch[w]
	for k := lo; k < hi; k++ {
		p := snap.Pages[k]
		cur, old := snap.Page(k), base.Page(p)
		if bytes.Equal(cur, old) {
			st.Unchanged++
			continue
		}
		dst = binary.AppendUvarint(dst, uint64(p-next))
		next = p + 1
		if isZero(cur) {
			dst = append(dst, kindZero)
			st.Zero++
			continue
		}
		if e.codec == CodecRaw {
			dst = append(dst, kindRaw)
			dst = append(dst, cur...)
			st.Raw++
			continue
		}
		delta := scratch[:PageSize]
		xorPage(delta, cur, old)
		out := scratch[PageSize:PageSize]
		kind := byte(0)
		switch e.codec {
		case CodecXORRLE:
			out, kind = rleEncode(out, delta), kindXORRLE
		case CodecXORZstd:
			out, kind = e.zenc.EncodeAll(delta, out), kindZstd
		case CodecXORLZ4:
			out, kind = e.lz4(w, delta), kindLZ4
		case CodecXORRLELZ4, CodecXORRLEZstd:
			out, kind = e.hybrid(w, cur, delta)
		}
		// Raw when compression does not pay for its length prefix (an RLE
		// that gave up returns nil).
		if out == nil || len(out) == 0 || len(out)+3 >= PageSize {
			dst = append(dst, kindRaw)
			dst = append(dst, cur...)
			st.Raw++
			continue
		}
		dst = append(dst, kind)
		dst = binary.AppendUvarint(dst, uint64(len(out)))
		dst = append(dst, out...)
		st.Delta++
	}
	return dst, st, next - 1, nil
}

// hybrid encodes a page for the XOR+RLE-with-fallback codecs. Sparse
// deltas are settled by an RLE pass that gives up after denseDelta bytes of
// output; a dense page is compressed as itself (lz4 or zstd); only if that
// does not get below three quarters of a page does a full RLE pass compete
// (half a page of random bytes rewritten: the page is incompressible, its
// delta half zero).
func (e *Encoder) hybrid(w int, cur, delta []byte) ([]byte, byte) {
	scratch := e.scratch[w]
	if out := rleEncodeLimit(scratch[PageSize:PageSize], delta, denseDelta); out != nil {
		return out, kindXORRLE
	}
	var plain []byte
	kind := kindLZ4Plain
	if e.codec == CodecXORRLELZ4 {
		plain = e.lz4(w, cur)
	} else {
		plain, kind = e.zenc.EncodeAll(cur, scratch[2*PageSize:2*PageSize]), kindZstdPlain
	}
	if plain != nil && len(plain) < PageSize*3/4 {
		return plain, kind
	}
	if full := rleEncode(scratch[PageSize:PageSize], delta); full != nil && (plain == nil || len(full) < len(plain)) {
		return full, kindXORRLE
	}
	return plain, kind
}

// lz4 compresses src into worker w's scratch output area; nil when it does
// not fit (incompressible).
func (e *Encoder) lz4(w int, src []byte) []byte {
	out := e.scratch[w][2*PageSize:]
	m, err := e.lz[w].CompressBlock(src, out)
	if err != nil || m == 0 {
		return nil
	}
	return out[:m]
}

// xorPage sets dst = a ^ b, 8 bytes at a time. All three are PageSize.
func xorPage(dst, a, b []byte) {
	const n = PageSize / 8
	d := unsafe.Slice((*uint64)(unsafe.Pointer(&dst[0])), n)
	x := unsafe.Slice((*uint64)(unsafe.Pointer(&a[0])), n)
	y := unsafe.Slice((*uint64)(unsafe.Pointer(&b[0])), n)
	for i := range d {
		d[i] = x[i] ^ y[i]
	}
}

// xorInto sets dst ^= a. Both are PageSize.
func xorInto(dst, a []byte) {
	const n = PageSize / 8
	d := unsafe.Slice((*uint64)(unsafe.Pointer(&dst[0])), n)
	x := unsafe.Slice((*uint64)(unsafe.Pointer(&a[0])), n)
	for i := range d {
		d[i] ^= x[i]
	}
}

// rleEncode appends to out the delta as (zero-run, literal-length, literal)
// triples; trailing zeros are implicit. It returns nil once the output would
// reach PageSize, so incompressible pages cost little before going raw.
func rleEncode(out, d []byte) []byte { return rleEncodeLimit(out, d, PageSize) }

// rleEncodeLimit is rleEncode giving up (nil) once the output would reach
// limit bytes.
func rleEncodeLimit(out, d []byte, limit int) []byte {
	limit += len(out)
	i := 0
	for i < len(d) {
		// Skip zeros, a word at a time where aligned.
		j := i
		for j < len(d) {
			if j&7 == 0 && j+8 <= len(d) && binary.LittleEndian.Uint64(d[j:]) == 0 {
				j += 8
				continue
			}
			if d[j] != 0 {
				break
			}
			j++
		}
		if j == len(d) {
			break
		}
		// Literal up to the last non-zero byte before a long-enough zero run.
		last := j
		for k := j + 1; k < len(d) && k-last <= rleMinZeroRun; {
			// A word without a zero byte is literal as a whole: dense
			// deltas move eight bytes a step.
			if k+8 <= len(d) {
				if w := binary.LittleEndian.Uint64(d[k:]); (w-0x0101010101010101)&^w&0x8080808080808080 == 0 {
					last = k + 7
					k += 8
					continue
				}
			}
			if d[k] != 0 {
				last = k
			}
			k++
		}
		lit := d[j : last+1]
		out = binary.AppendUvarint(out, uint64(j-i))
		out = binary.AppendUvarint(out, uint64(len(lit)))
		if len(out)+len(lit) >= limit {
			return nil
		}
		out = append(out, lit...)
		i = last + 1
	}
	return out
}

// rleDecode writes the delta encoded in src to dst (PageSize bytes),
// rejecting anything that would not land exactly inside dst.
func rleDecode(dst, src []byte) error {
	pos := 0
	for len(src) > 0 {
		z, n := binary.Uvarint(src)
		if n <= 0 {
			return fmt.Errorf("%w: rle: bad zero-run length", ErrCorrupt)
		}
		src = src[n:]
		if z > uint64(PageSize-pos) {
			return fmt.Errorf("%w: rle: zero run of %d at %d overflows the page", ErrCorrupt, z, pos)
		}
		clear(dst[pos : pos+int(z)])
		pos += int(z)
		l, n := binary.Uvarint(src)
		if n <= 0 {
			return fmt.Errorf("%w: rle: bad literal length", ErrCorrupt)
		}
		src = src[n:]
		if l > uint64(PageSize-pos) || l > uint64(len(src)) {
			return fmt.Errorf("%w: rle: literal of %d at %d overflows the page or the input", ErrCorrupt, l, pos)
		}
		pos += copy(dst[pos:pos+int(l)], src[:l])
		src = src[l:]
	}
	clear(dst[pos:])
	return nil
}

// Decoder turns frames back into pages. It is safe for concurrent use.
type Decoder struct {
	zdec *zstd.Decoder
}

// NewDecoder returns a decoder for all codecs.
func NewDecoder() (*Decoder, error) {
	z, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecodeAllCapLimit(true),
		zstd.WithDecoderMaxMemory(1<<20),
		zstd.WithDecoderMaxWindow(1<<20))
	if err != nil {
		return nil, fmt.Errorf("memsync: zstd decoder: %w", err)
	}
	return &Decoder{zdec: z}, nil
}

// Close releases the decoder.
func (d *Decoder) Close() { d.zdec.Close() }

// FrameEpoch returns a frame's epoch after checking its checksum and header.
func FrameEpoch(frame []byte) (uint64, error) {
	epoch, _, err := checkFrame(frame)
	return epoch, err
}

// checkFrame verifies the checksum and header and returns the epoch and the
// record bytes.
func checkFrame(frame []byte) (uint64, []byte, error) {
	if len(frame) < frameHeader+1+frameTrailer {
		return 0, nil, fmt.Errorf("%w: frame of %d bytes is too short", ErrCorrupt, len(frame))
	}
	body, sum := frame[:len(frame)-frameTrailer], frame[len(frame)-frameTrailer:]
	if xxhash.Sum64(body) != binary.LittleEndian.Uint64(sum) {
		return 0, nil, fmt.Errorf("%w: frame checksum mismatch", ErrCorrupt)
	}
	if string(body[:len(frameMagic)]) != frameMagic {
		return 0, nil, fmt.Errorf("%w: bad frame magic %q", ErrCorrupt, body[:len(frameMagic)])
	}
	if v := body[len(frameMagic)]; v != frameVersion {
		return 0, nil, fmt.Errorf("%w: frame version %d, want %d", ErrCorrupt, v, frameVersion)
	}
	epoch, n := binary.Uvarint(body[frameHeader:])
	if n <= 0 {
		return 0, nil, fmt.Errorf("%w: bad frame epoch", ErrCorrupt)
	}
	return epoch, body[frameHeader+n:], nil
}

// Decode checks frame and decodes its pages in order. For each page it asks
// prev for the version the delta is relative to (PageSize bytes; it is only
// read) and calls emit with the page number and the decoded content, valid
// only during the call. npages bounds the page numbers. A corrupt or
// truncated frame returns an error wrapping ErrCorrupt; if the checksum or
// header is bad, emit is never called.
func (d *Decoder) Decode(frame []byte, npages int, prev func(page int) ([]byte, error), emit func(page int, data []byte) error) (uint64, error) {
	epoch, recs, err := checkFrame(frame)
	if err != nil {
		return 0, err
	}
	var page [PageSize]byte
	next := uint64(0)
	for len(recs) > 0 {
		gap, n := binary.Uvarint(recs)
		if n <= 0 {
			return epoch, fmt.Errorf("%w: bad page gap", ErrCorrupt)
		}
		recs = recs[n:]
		if gap >= uint64(npages) || next+gap >= uint64(npages) {
			return epoch, fmt.Errorf("%w: page %d+%d beyond %d pages", ErrCorrupt, next, gap, npages)
		}
		p := int(next + gap)
		next = uint64(p) + 1
		if len(recs) == 0 {
			return epoch, fmt.Errorf("%w: page %d: missing kind", ErrCorrupt, p)
		}
		kind := recs[0]
		recs = recs[1:]
		var payload []byte
		switch kind {
		case kindZero:
		case kindRaw:
			if len(recs) < PageSize {
				return epoch, fmt.Errorf("%w: page %d: raw page truncated", ErrCorrupt, p)
			}
			payload, recs = recs[:PageSize], recs[PageSize:]
		case kindXORRLE, kindZstd, kindLZ4, kindLZ4Plain, kindZstdPlain:
			l, n := binary.Uvarint(recs)
			if n <= 0 || l > uint64(len(recs)-n) {
				return epoch, fmt.Errorf("%w: page %d: bad payload length", ErrCorrupt, p)
			}
			payload, recs = recs[n:n+int(l)], recs[n+int(l):]
		default:
			return epoch, fmt.Errorf("%w: page %d: unknown kind %d", ErrCorrupt, p, kind)
		}
		var old []byte
		if isDelta(kind) {
			if old, err = prev(p); err != nil {
				return epoch, fmt.Errorf("memsync: previous version of page %d: %w", p, err)
			}
			if len(old) != PageSize {
				return epoch, fmt.Errorf("%w: previous version of page %d has %d bytes", ErrBadInput, p, len(old))
			}
		}
		if err := d.DecodePage(page[:], kind, payload, old); err != nil {
			return epoch, fmt.Errorf("page %d: %w", p, err)
		}
		if err := emit(p, page[:]); err != nil {
			return epoch, err
		}
	}
	return epoch, nil
}

// DecodePage decodes one record's payload into dst, which must be exactly
// PageSize long; old is the previous version for delta kinds. It writes
// nothing outside dst[:PageSize].
func (d *Decoder) DecodePage(dst []byte, kind byte, payload, old []byte) error {
	if len(dst) != PageSize {
		return fmt.Errorf("%w: page buffer of %d bytes", ErrBadInput, len(dst))
	}
	dst = dst[:PageSize:PageSize]
	if isDelta(kind) && len(old) != PageSize {
		return fmt.Errorf("%w: previous page of %d bytes", ErrBadInput, len(old))
	}
	switch kind {
	case kindZero:
		if len(payload) != 0 {
			return fmt.Errorf("%w: zero page with payload", ErrCorrupt)
		}
		clear(dst)
		return nil
	case kindRaw:
		if len(payload) != PageSize {
			return fmt.Errorf("%w: raw page of %d bytes", ErrCorrupt, len(payload))
		}
		copy(dst, payload)
		return nil
	case kindXORRLE:
		if err := rleDecode(dst, payload); err != nil {
			return err
		}
	case kindZstd, kindZstdPlain:
		out, err := d.zdec.DecodeAll(payload, dst[:0])
		if err != nil {
			return fmt.Errorf("%w: zstd: %w", ErrCorrupt, err)
		}
		if len(out) != PageSize {
			return fmt.Errorf("%w: zstd output of %d bytes", ErrCorrupt, len(out))
		}
		copy(dst, out) // no-op unless the decoder had to reallocate
	case kindLZ4, kindLZ4Plain:
		m, err := lz4.UncompressBlock(payload, dst)
		if err != nil {
			return fmt.Errorf("%w: lz4: %w", ErrCorrupt, err)
		}
		if m != PageSize {
			return fmt.Errorf("%w: lz4 output of %d bytes", ErrCorrupt, m)
		}
	default:
		return fmt.Errorf("%w: unknown page kind %d", ErrCorrupt, kind)
	}
	if isDelta(kind) {
		xorInto(dst, old)
	}
	return nil
}
