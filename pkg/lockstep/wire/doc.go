// Package wire owns the framing, integrity and authentication of the
// replication link between a primary and a secondary ftctl agent.
//
// A link is a Conn: a bidirectional stream of Frames. On TCP every frame is
// encoded as
//
//	magic "FTWR" | version u8 | type u8 | flags u8 | reserved u8 |
//	epoch u64 | payload length u32 | payload | CRC32C(header+payload) u32
//
// (integers big-endian), inside TLS 1.3. Both peers authenticate before any
// frame other than the authentication exchange is read: either mutual TLS
// with certificates of the pair's own CA (NewCA, CA.Issue), or a pre-shared
// key proven by a channel-bound HMAC challenge–response (CredentialsFromPSK).
// A Hello exchange then agrees on the protocol version.
//
// Frames of one checkpoint epoch (manifest, memory, device state) are sent
// through an EpochSender, which
// closes the epoch with an END frame carrying the frame count, byte count and
// an xxhash64 digest of every frame of the epoch in order; an EpochReceiver
// hands out an epoch only once it is complete and verified, so a torn epoch
// is never applied (DESIGN.md invariant 3). Block write events, heartbeats,
// acks and control messages travel out of band, interleaved with epochs.
//
// Pipe is an in-memory Conn pair with the same semantics, for tests.
package wire
