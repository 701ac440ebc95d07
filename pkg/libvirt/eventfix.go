package libvirt

import (
	"encoding/binary"
	"io"
	"net"
)

// go-libvirt (v0.0.0-20260217163227) decodes libvirt's QEMU monitor event
// message into a struct whose optional "details" string is a uint8 flag
// followed by a []byte. libvirt sends a null details (flag 0, nothing
// after it) for every QMP event without data - STOP, RESUME, POWERDOWN,
// RESET... - so decoding runs out of input and go-libvirt silently drops
// exactly the events a checkpointing agent watches. fixConn sits under
// go-libvirt and appends an empty string to such messages, which then
// decode with empty Details. Everything else passes through unchanged.

const (
	rpcHeaderLen         = 4 + 24 // length word + program, version, procedure, type, serial, status
	qemuProgram          = 0x20008087
	qemuProcMonitorEvent = 6
	maxRPCPacket         = 32<<20 + 4096 // libvirt's own limit is 32 MiB payload
)

type fixConn struct {
	net.Conn
	pending []byte // repaired bytes not yet returned by Read
	err     error
}

func newFixConn(c net.Conn) net.Conn { return &fixConn{Conn: c} }

// Read returns whole repaired packets, in as many reads as the caller's
// buffer needs.
func (c *fixConn) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		c.pending, c.err = readPacket(c.Conn)
		if len(c.pending) == 0 {
			return 0, c.err
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// readPacket reads one RPC packet and repairs it if needed. A length word
// it cannot trust is passed on as read, with the error that follows, for
// go-libvirt to fail on as it would without this layer.
func readPacket(r io.Reader) ([]byte, error) {
	var lw [4]byte
	if n, err := io.ReadFull(r, lw[:]); err != nil {
		return lw[:n], err
	}
	total := binary.BigEndian.Uint32(lw[:])
	if total < rpcHeaderLen || total > maxRPCPacket {
		return lw[:], nil
	}
	pkt := make([]byte, total)
	copy(pkt, lw[:])
	if n, err := io.ReadFull(r, pkt[4:]); err != nil {
		return pkt[:4+n], err
	}
	return repairEvent(pkt), nil
}

// repairEvent appends an empty details string to a QEMU monitor event
// whose details are null.
func repairEvent(pkt []byte) []byte {
	if binary.BigEndian.Uint32(pkt[4:]) != qemuProgram || binary.BigEndian.Uint32(pkt[12:]) != qemuProcMonitorEvent {
		return pkt
	}
	// Payload: callbackID int; domain {name string, uuid [16]byte, id
	// int}; event string; seconds hyper; micros uint; details *string.
	b := pkt[rpcHeaderLen:]
	off := 4
	skipString := func() bool {
		if off+4 > len(b) {
			return false
		}
		n := int(binary.BigEndian.Uint32(b[off:]))
		off += 4 + (n+3)&^3
		return off <= len(b)
	}
	if !skipString() { // domain name
		return pkt
	}
	off += 16 + 4      // uuid, id
	if !skipString() { // event
		return pkt
	}
	off += 8 + 4 // seconds, micros
	if off+4 != len(b) || binary.BigEndian.Uint32(b[off:]) != 0 {
		return pkt // details present, or not the layout we know
	}
	out := append(pkt, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(out, uint32(len(out)))
	return out
}
