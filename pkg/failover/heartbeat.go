package failover

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// The management heartbeat is one UDP datagram each way, 64 bytes:
//
//	0  magic "FTHB"
//	4  version (1)
//	5  type (1 ping, 2 pong)
//	6  reserved, zero (2 bytes)
//	8  session: the client's random id for this run
//	16 seq: the client's ping number, from 1; a pong echoes it
//	24 nonce: in a pong, the server's current nonce; in a ping, the nonce
//	   of the last pong the client accepted (0 before the first)
//	32 HMAC-SHA256 over bytes 0..31 with the pair's key
//
// The type is inside the MAC, so a ping cannot be reflected as a pong.
// Replay safety: the client accepts a pong only for a ping it sent
// recently and has not seen answered; the server counts a ping as a sign of
// life only if it echoes one of the server's last two nonces (which it
// rotates) and its (session, seq) has not been accepted before (a 64-wide
// sliding window per session, kept as long as its nonce is valid). A
// recorded ping from an earlier run, or an earlier nonce period, thus
// proves nothing, and one from the current period is caught by the window.
const (
	hbMagic   = "FTHB"
	hbVersion = 1
	hbLen     = 64
	hbBody    = 32
)

type hbType uint8

const (
	hbPing hbType = 1
	hbPong hbType = 2
)

// MinKeyLen is the shortest key accepted for heartbeats and the witness.
const MinKeyLen = 16

type hbPacket struct {
	Type    hbType
	Session uint64
	Seq     uint64
	Nonce   uint64
}

func checkKey(key []byte, what string) error {
	if len(key) < MinKeyLen {
		return fmt.Errorf("%w: %s key is %d bytes, need at least %d", ErrConfig, what, len(key), MinKeyLen)
	}
	return nil
}

// appendHeartbeat appends the encoded packet to dst.
func appendHeartbeat(dst, key []byte, p hbPacket) []byte {
	var b [hbLen]byte
	copy(b[0:4], hbMagic)
	b[4] = hbVersion
	b[5] = byte(p.Type)
	binary.BigEndian.PutUint64(b[8:], p.Session)
	binary.BigEndian.PutUint64(b[16:], p.Seq)
	binary.BigEndian.PutUint64(b[24:], p.Nonce)
	m := hmac.New(sha256.New, key)
	m.Write(b[:hbBody])
	m.Sum(b[hbBody:hbBody])
	return append(dst, b[:]...)
}

// decodeHeartbeat checks and decodes one datagram. Structure is checked
// before the MAC so garbage costs no hashing; an authentic packet with an
// unknown type or zero seq is malformed.
func decodeHeartbeat(key, b []byte) (hbPacket, error) {
	var p hbPacket
	if len(b) != hbLen {
		return p, fmt.Errorf("%w: heartbeat is %d bytes, want %d", ErrMalformed, len(b), hbLen)
	}
	if string(b[0:4]) != hbMagic {
		return p, fmt.Errorf("%w: heartbeat magic %q", ErrMalformed, b[0:4])
	}
	if b[4] != hbVersion {
		return p, fmt.Errorf("%w: heartbeat version %d, want %d", ErrMalformed, b[4], hbVersion)
	}
	if b[6] != 0 || b[7] != 0 {
		return p, fmt.Errorf("%w: heartbeat reserved bytes not zero", ErrMalformed)
	}
	m := hmac.New(sha256.New, key)
	m.Write(b[:hbBody])
	var sum [sha256.Size]byte
	if !hmac.Equal(m.Sum(sum[:0]), b[hbBody:]) {
		return p, fmt.Errorf("%w: heartbeat MAC mismatch (wrong key or altered packet)", ErrAuth)
	}
	p.Type = hbType(b[5])
	p.Session = binary.BigEndian.Uint64(b[8:])
	p.Seq = binary.BigEndian.Uint64(b[16:])
	p.Nonce = binary.BigEndian.Uint64(b[24:])
	if p.Type != hbPing && p.Type != hbPong {
		return p, fmt.Errorf("%w: heartbeat type %d", ErrMalformed, p.Type)
	}
	if p.Seq == 0 {
		return p, fmt.Errorf("%w: heartbeat seq 0", ErrMalformed)
	}
	return p, nil
}

// replayWindow accepts each sequence number at most once, and refuses
// numbers more than 64 below the highest seen (as IPsec does).
type replayWindow struct {
	high uint64
	bits uint64 // bit i set: high-i was seen
}

func (w *replayWindow) accept(seq uint64) bool {
	switch {
	case seq > w.high:
		shift := seq - w.high
		if shift >= 64 {
			w.bits = 0
		} else {
			w.bits <<= shift
		}
		w.bits |= 1
		w.high = seq
		return true
	case w.high-seq >= 64:
		return false
	default:
		bit := uint64(1) << (w.high - seq)
		if w.bits&bit != 0 {
			return false
		}
		w.bits |= bit
		return true
	}
}
