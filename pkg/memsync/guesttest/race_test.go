//go:build race

package guesttest_test

// Under the race detector every encoder loop is instrumented and these
// tests would take minutes over a 256 MiB guest; they shrink the guest and
// the codec list instead (the race-relevant code paths stay the same).
const raceBuild = true
