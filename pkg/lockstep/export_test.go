package lockstep

// CrashAfterRAMCommit makes s's commits stop right after the replica RAM
// committed, before the disk is replayed, returning err: a crash at the
// most delicate point of a commit.
func CrashAfterRAMCommit(s *Secondary, err error) {
	s.crashAfterRAMCommit = func() error { return err }
}
