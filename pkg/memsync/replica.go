package memsync

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cespare/xxhash/v2"

	"github.com/ftctl/ftctl/internal/fsutil"
)

// Replica is the secondary's copy of guest RAM: a file the standby QEMU
// will map (share=on) on failover. Pages of an epoch are staged in memory
// and reach the file only on Commit, so a crash before Commit leaves the file
// exactly at the previous epoch.
//
// Commit first writes a redo journal (every staged page plus the epoch,
// checksummed) next to the file and syncs it, then applies the pages, syncs
// the file, records the epoch and deletes the journal. A crash while the
// journal is being written leaves a journal that fails its checksum: the
// file was not touched and is at the previous epoch, and OpenReplica throws
// the journal away. A crash while applying leaves a valid journal:
// OpenReplica replays it (applying pages is idempotent), so the file ends at
// the new epoch. Either way it is never between two epochs once open.
type Replica struct {
	path    string
	region  *Region
	journal string
	state   string
	dec     *Decoder

	committed uint64

	staging bool
	epoch   uint64
	slot    map[int]int // page -> index into data
	order   []int       // pages in staging order
	data    []byte

	// crashHook, when set (tests only), is called after the journal is
	// synced (with -1) and after each applied page (with its ordinal); an
	// error aborts Commit there without any cleanup, like a crash.
	crashHook func(applied int) error
}

const (
	journalMagic   = "FTRJ"
	journalVersion = 1
	journalHeader  = len(journalMagic) + 1 + 8 + 8
	journalRecord  = 8 + PageSize
)

// OpenReplica opens (or creates, zero-filled) the replica RAM file at path
// with size bytes, and finishes any commit a crash interrupted. The journal
// and the committed epoch live beside it, in path+".journal" and
// path+".epoch".
func OpenReplica(path string, size int64) (*Replica, error) {
	if size <= 0 || size%PageSize != 0 {
		return nil, fmt.Errorf("%w: replica size %d is not a non-zero multiple of %d", ErrBadInput, size, PageSize)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%w: replica %s: %w", ErrBadInput, path, err)
	}
	st, err := f.Stat()
	if err == nil && st.Size() == 0 {
		err = f.Truncate(size)
	} else if err == nil && st.Size() != size {
		err = fmt.Errorf("%w: replica %s has %d bytes, want %d", ErrBadInput, path, st.Size(), size)
	}
	f.Close()
	if err != nil {
		return nil, err
	}
	region, err := OpenRegion(path, true)
	if err != nil {
		return nil, err
	}
	dec, err := NewDecoder()
	if err != nil {
		region.Close()
		return nil, err
	}
	r := &Replica{path: path, region: region, journal: path + ".journal", state: path + ".epoch", dec: dec}
	if err := r.recover(); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// recover reads the committed epoch and replays or drops a journal left
// by a crash.
func (r *Replica) recover() error {
	b, err := os.ReadFile(r.state)
	switch {
	case errors.Is(err, os.ErrNotExist):
		r.committed = 0
	case err != nil:
		return fmt.Errorf("memsync: replica epoch file: %w", err)
	default:
		e, perr := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if perr != nil {
			return fmt.Errorf("%w: replica epoch file %s: %q", ErrCorrupt, r.state, b)
		}
		r.committed = e
	}
	f, err := os.Open(r.journal)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("memsync: replica journal: %w", err)
	}
	defer f.Close()
	epoch, n, err := checkJournal(f, r.region.NumPages())
	if errors.Is(err, ErrCorrupt) {
		// Torn while being written: the file was never touched.
		return removeSync(r.journal)
	}
	if err != nil {
		return err
	}
	if epoch <= r.committed {
		// Left by a crash after the epoch was recorded: already applied.
		return removeSync(r.journal)
	}
	if _, err := f.Seek(int64(journalHeader), io.SeekStart); err != nil {
		return fmt.Errorf("memsync: replica journal: %w", err)
	}
	br := bufio.NewReaderSize(f, 1<<20)
	var rec [journalRecord]byte
	for range n {
		if _, err := io.ReadFull(br, rec[:]); err != nil {
			return fmt.Errorf("memsync: replay journal: %w", err)
		}
		p := int(binary.LittleEndian.Uint64(rec[:8]))
		copy(r.region.Page(p), rec[8:])
	}
	return r.finish(epoch)
}

// checkJournal validates a journal's size, header, page numbers and
// checksum, returning its epoch and page count.
func checkJournal(f *os.File, npages int) (uint64, uint64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, 0, fmt.Errorf("memsync: replica journal: %w", err)
	}
	var hdr [journalHeader]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		return 0, 0, fmt.Errorf("%w: journal header: %w", ErrCorrupt, err)
	}
	if string(hdr[:4]) != journalMagic || hdr[4] != journalVersion {
		return 0, 0, fmt.Errorf("%w: journal magic/version", ErrCorrupt)
	}
	epoch := binary.LittleEndian.Uint64(hdr[5:])
	n := binary.LittleEndian.Uint64(hdr[13:])
	if n > uint64(npages) || st.Size() != int64(journalHeader)+int64(n)*journalRecord+8 {
		return 0, 0, fmt.Errorf("%w: journal of %d bytes for %d pages", ErrCorrupt, st.Size(), n)
	}
	h := xxhash.New()
	h.Write(hdr[:])
	br := bufio.NewReaderSize(f, 1<<20)
	var rec [journalRecord]byte
	for range n {
		if _, err := io.ReadFull(br, rec[:]); err != nil {
			return 0, 0, fmt.Errorf("%w: journal record: %w", ErrCorrupt, err)
		}
		if binary.LittleEndian.Uint64(rec[:8]) >= uint64(npages) {
			return 0, 0, fmt.Errorf("%w: journal page beyond %d", ErrCorrupt, npages)
		}
		h.Write(rec[:])
	}
	var sum [8]byte
	if _, err := io.ReadFull(br, sum[:]); err != nil || binary.LittleEndian.Uint64(sum[:]) != h.Sum64() {
		return 0, 0, fmt.Errorf("%w: journal checksum", ErrCorrupt)
	}
	return epoch, n, nil
}

// Path is the replica RAM file.
func (r *Replica) Path() string { return r.path }

// Epoch is the last committed epoch (0: none yet).
func (r *Replica) Epoch() uint64 { return r.committed }

// NumPages is the replica's size in pages.
func (r *Replica) NumPages() int { return r.region.NumPages() }

// Page returns the committed content of page i (read-only use).
func (r *Replica) Page(i int) []byte { return r.region.Page(i) }

// Staged returns the epoch being staged and how many pages it holds.
func (r *Replica) Staged() (epoch uint64, pages int, ok bool) {
	return r.epoch, len(r.order), r.staging
}

func (r *Replica) begin(epoch uint64) error {
	if r.region == nil {
		return ErrClosed
	}
	if r.staging {
		if epoch != r.epoch {
			return fmt.Errorf("%w: staging epoch %d while %d is staged", ErrEpoch, epoch, r.epoch)
		}
		return nil
	}
	if epoch <= r.committed {
		return fmt.Errorf("%w: epoch %d is not after committed epoch %d", ErrEpoch, epoch, r.committed)
	}
	r.staging, r.epoch = true, epoch
	r.slot = map[int]int{}
	r.order = r.order[:0]
	r.data = r.data[:0]
	return nil
}

func (r *Replica) stagePage(p int, data []byte) {
	if s, ok := r.slot[p]; ok {
		copy(r.data[s*PageSize:], data)
		return
	}
	r.slot[p] = len(r.order)
	r.order = append(r.order, p)
	r.data = append(r.data, data...)
}

// Stage adds decoded pages (data holds PageSize bytes per page, in the
// order of pages) to epoch's staging area. A page staged twice keeps the
// later content.
func (r *Replica) Stage(epoch uint64, pages []int, data []byte) error {
	if len(data) != len(pages)*PageSize {
		return fmt.Errorf("%w: %d bytes for %d pages", ErrBadInput, len(data), len(pages))
	}
	n := r.NumPages()
	for _, p := range pages {
		if p < 0 || p >= n {
			return fmt.Errorf("%w: page %d beyond %d", ErrBadInput, p, n)
		}
	}
	if err := r.begin(epoch); err != nil {
		return err
	}
	for k, p := range pages {
		r.stagePage(p, data[k*PageSize:(k+1)*PageSize])
	}
	return nil
}

// StageFrame decodes an encoded frame against the replica (the staged
// version of a page if there is one, else the committed one) and stages its
// pages under the frame's epoch, which it returns. A frame that fails to
// decode stages nothing.
func (r *Replica) StageFrame(frame []byte) (uint64, error) {
	epoch, err := FrameEpoch(frame)
	if err != nil {
		return 0, err
	}
	if err := r.begin(epoch); err != nil {
		return 0, err
	}
	wasEmpty := len(r.order) == 0
	var pages []int
	var data []byte
	prev := func(p int) ([]byte, error) {
		if s, ok := r.slot[p]; ok {
			return r.data[s*PageSize : (s+1)*PageSize], nil
		}
		return r.region.Page(p), nil
	}
	_, err = r.dec.Decode(frame, r.NumPages(), prev, func(p int, d []byte) error {
		pages = append(pages, p)
		data = append(data, d...)
		return nil
	})
	if err != nil {
		if wasEmpty {
			r.Discard()
		}
		return 0, err
	}
	for k, p := range pages {
		r.stagePage(p, data[k*PageSize:(k+1)*PageSize])
	}
	return epoch, nil
}

// Discard drops the staged epoch, if any.
func (r *Replica) Discard() {
	r.staging = false
	r.slot = nil
	r.order = r.order[:0]
	r.data = r.data[:0]
}

// Commit makes the staged epoch (which must be epoch; an epoch with no
// staged page is allowed) the replica's content, crash-safely (see Replica).
func (r *Replica) Commit(ctx context.Context, epoch uint64) error {
	if r.region == nil {
		return ErrClosed
	}
	if !r.staging {
		if err := r.begin(epoch); err != nil {
			return err
		}
	}
	if epoch != r.epoch {
		return fmt.Errorf("%w: commit of epoch %d while %d is staged", ErrEpoch, epoch, r.epoch)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := r.writeJournal(); err != nil {
		return err
	}
	if r.crashHook != nil {
		if err := r.crashHook(-1); err != nil {
			return err
		}
	}
	for k, p := range r.order {
		copy(r.region.Page(p), r.data[k*PageSize:(k+1)*PageSize])
		if r.crashHook != nil {
			if err := r.crashHook(k); err != nil {
				return err
			}
		}
	}
	if err := r.finish(epoch); err != nil {
		return err
	}
	r.Discard()
	return nil
}

// writeJournal writes and syncs the redo journal of the staged epoch.
func (r *Replica) writeJournal() error {
	f, err := os.OpenFile(r.journal, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("memsync: write journal: %w", err)
	}
	h := xxhash.New()
	bw := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
	var hdr [journalHeader]byte
	copy(hdr[:], journalMagic)
	hdr[4] = journalVersion
	binary.LittleEndian.PutUint64(hdr[5:], r.epoch)
	binary.LittleEndian.PutUint64(hdr[13:], uint64(len(r.order)))
	bw.Write(hdr[:])
	var idx [8]byte
	for k, p := range r.order {
		binary.LittleEndian.PutUint64(idx[:], uint64(p))
		bw.Write(idx[:])
		bw.Write(r.data[k*PageSize : (k+1)*PageSize])
	}
	err = bw.Flush()
	if err == nil {
		_, err = f.Write(binary.LittleEndian.AppendUint64(nil, h.Sum64()))
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = fsutil.SyncDir(filepath.Dir(r.journal))
	}
	if err != nil {
		return fmt.Errorf("memsync: write journal: %w", err)
	}
	return nil
}

// finish makes an applied epoch durable: sync the file, record the epoch,
// delete the journal.
func (r *Replica) finish(epoch uint64) error {
	if err := r.region.Sync(); err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(r.state, []byte(strconv.FormatUint(epoch, 10)+"\n"), 0o600); err != nil {
		return fmt.Errorf("memsync: record epoch: %w", err)
	}
	if err := removeSync(r.journal); err != nil {
		return err
	}
	r.committed = epoch
	return nil
}

// Close unmaps the replica; staged pages are dropped.
func (r *Replica) Close() error {
	r.Discard()
	if r.dec != nil {
		r.dec.Close()
		r.dec = nil
	}
	if r.region == nil {
		return nil
	}
	err := r.region.Close()
	r.region = nil
	return err
}

func removeSync(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("memsync: remove %s: %w", path, err)
	}
	return fsutil.SyncDir(filepath.Dir(path))
}
