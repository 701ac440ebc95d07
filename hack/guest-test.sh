#!/usr/bin/env bash
# guest-test.sh runs memsync's kernel-dependent tests for real inside the
# test guest: the host kernel lacks soft-dirty, Debian's cloud kernel has
# it. It builds the memsync test binary (static, CGO_ENABLED=0), packs it
# into an initramfs with pkg/guestimage, boots it under QEMU TCG and fails
# unless the soft-dirty conformance suite, the soft-dirty pre-copy test and
# the scan benchmark ran and passed inside (a skip counts as a failure).
# All of that is pkg/memsync/guesttest's TestMemsyncInGuest; this script
# just runs it verbosely. Extra arguments go to `go test`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec go test -count=1 -v -timeout 15m -run '^TestMemsyncInGuest$' "$@" ./pkg/memsync/guesttest/
