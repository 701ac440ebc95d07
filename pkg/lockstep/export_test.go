package lockstep

// CrashAfterRAMCommit makes s's commits stop right after the replica RAM
// committed, before the disk is replayed, returning err: a crash at the
// most delicate point of a commit.
func CrashAfterRAMCommit(s *Secondary, err error) {
	s.crashAfterRAMCommit = func() error { return err }
}

// DevHeaderLen is the size of a device-state payload's header; its fields
// are, big endian: version (1), codec (1), base epoch (8), base checksum
// (8), decoded length (4), decoded checksum (8).
const DevHeaderLen = devHeaderLen

// MaxDevState is the bound on a decoded device state.
const MaxDevState = maxDevState

// DevStateEncoder is the primary's device-state encoder, for tests that
// play the primary.
type DevStateEncoder struct{ e *devEncoder }

// NewDevStateEncoder returns an encoder without a base.
func NewDevStateEncoder() (*DevStateEncoder, error) {
	e, err := newDevEncoder()
	return &DevStateEncoder{e}, err
}

// Encode encodes epoch's state against the previous call's.
func (d *DevStateEncoder) Encode(epoch uint64, state []byte) ([]byte, DevCodec, error) {
	p, h, err := d.e.encode(epoch, state)
	return p, h.Codec, err
}

// DecodeDevState decodes a payload against base, as the secondary does
// once it has matched the base's epoch.
func DecodeDevState(payload, base []byte) ([]byte, error) {
	h, body, err := parseDevHeader(payload)
	if err != nil {
		return nil, err
	}
	return decodeDevState(h, body, base)
}
