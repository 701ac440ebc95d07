// Package guesttest owns the test that runs memsync's kernel-dependent
// tests for real: the host kernel here lacks soft-dirty, so it builds the
// memsync test binary statically, puts it into a test-guest initramfs
// (pkg/guestimage) with Debian's cloud kernel, which has
// CONFIG_MEM_SOFT_DIRTY, boots it under QEMU TCG and checks from the serial
// console that the soft-dirty tests ran and passed inside
// (hack/guest-test.sh runs that one test). It also runs the memory path
// against a real QEMU guest on the host: replica byte-equality after
// pre-copy and checkpoints, and codec round trips on real guest RAM. It has
// no non-test code.
package guesttest
