package lockstep

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Sentinel errors of the protocol layer.
var (
	// ErrConfig: a coordinator or receiver was configured inconsistently.
	ErrConfig = errors.New("lockstep: bad configuration")
	// ErrProtocol: the peer sent something the protocol does not allow
	// (a malformed manifest, an epoch out of order, block events that do not
	// match the manifest). The link is dropped; committed state is kept.
	ErrProtocol = errors.New("lockstep: protocol violation")
	// ErrNotPromotable: the secondary holds no complete checkpoint yet
	// (still in the initial sync).
	ErrNotPromotable = errors.New("lockstep: no committed checkpoint to resume from")
	// ErrStopped: the coordinator was stopped or its link failed.
	ErrStopped = errors.New("lockstep: replication stopped")
)

// Kind says what an epoch holds.
type Kind uint8

// Epoch kinds.
const (
	// KindSync carries pre-copy pages only: no device state, not a point
	// the secondary can resume from.
	KindSync Kind = 1
	// KindCheckpoint is a full checkpoint: pages, device state, block epoch.
	KindCheckpoint Kind = 2
	// KindFinal is the checkpoint of a planned switchover: the primary
	// stays paused after it, so nothing happens after it.
	KindFinal Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindSync:
		return "sync"
	case KindCheckpoint:
		return "checkpoint"
	case KindFinal:
		return "final"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Resumable reports whether an epoch of this kind carries a complete
// checkpoint.
func (k Kind) Resumable() bool { return k == KindCheckpoint || k == KindFinal }

// Manifest opens every epoch: what the epoch is and which block epoch it
// closes, so the secondary can check it holds every write of the epoch
// before it commits.
type Manifest struct {
	Epoch      uint64
	Kind       Kind
	BlockEpoch uint64 // block epoch closed by this checkpoint; 0: none
	BlockSeq   uint64 // last block event sequence number in it
	MemFrames  uint32 // memory frames that follow
	PausedNano int64  // when the primary paused (unix ns), for lag figures
}

const (
	manifestVersion = 1
	manifestLen     = 1 + 1 + 8 + 8 + 8 + 4 + 8
)

// MarshalBinary encodes the manifest (fixed size, big endian).
func (m Manifest) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, manifestLen)
	b = append(b, manifestVersion, byte(m.Kind))
	b = binary.BigEndian.AppendUint64(b, m.Epoch)
	b = binary.BigEndian.AppendUint64(b, m.BlockEpoch)
	b = binary.BigEndian.AppendUint64(b, m.BlockSeq)
	b = binary.BigEndian.AppendUint32(b, m.MemFrames)
	b = binary.BigEndian.AppendUint64(b, uint64(m.PausedNano))
	return b, nil
}

// UnmarshalBinary decodes and checks a manifest.
func (m *Manifest) UnmarshalBinary(b []byte) error {
	if len(b) != manifestLen {
		return fmt.Errorf("%w: manifest of %d bytes, want %d", ErrProtocol, len(b), manifestLen)
	}
	if b[0] != manifestVersion {
		return fmt.Errorf("%w: manifest version %d, want %d", ErrProtocol, b[0], manifestVersion)
	}
	k := Kind(b[1])
	if k != KindSync && k != KindCheckpoint && k != KindFinal {
		return fmt.Errorf("%w: manifest has unknown epoch kind %d", ErrProtocol, b[1])
	}
	*m = Manifest{
		Kind:       k,
		Epoch:      binary.BigEndian.Uint64(b[2:]),
		BlockEpoch: binary.BigEndian.Uint64(b[10:]),
		BlockSeq:   binary.BigEndian.Uint64(b[18:]),
		MemFrames:  binary.BigEndian.Uint32(b[26:]),
		PausedNano: int64(binary.BigEndian.Uint64(b[30:])),
	}
	if m.Epoch == 0 {
		return fmt.Errorf("%w: manifest for epoch 0", ErrProtocol)
	}
	return nil
}
