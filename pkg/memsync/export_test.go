package memsync

// SetCrashHook lets tests stop a Commit at a chosen point, like a crash.
func SetCrashHook(r *Replica, f func(applied int) error) { r.crashHook = f }
