#!/usr/bin/env bash
# fuzz.sh runs every Go fuzz target in the repository for FUZZTIME each
# (default 10s): `go test -fuzz` takes one target in one package at a time.
# Minimisation is bounded: with large seeds its default (60s per input)
# can stall a short run.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZTIME=${FUZZTIME:-10s}
status=0
while IFS= read -r f; do
	dir=$(dirname "$f")
	for target in $(grep -oE '^func (Fuzz[A-Za-z0-9_]+)\(' "$f" | sed -E 's/^func (Fuzz[A-Za-z0-9_]+)\(/\1/'); do
		echo "fuzz: ./$dir $target ($FUZZTIME)"
		if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime 100x "./$dir" >/tmp/ftctl-fuzz.log 2>&1; then
			cat /tmp/ftctl-fuzz.log
			echo "fuzz: FAIL ./$dir $target"
			status=1
		fi
	done
done < <(git ls-files '*_test.go' 2>/dev/null | xargs grep -l '^func Fuzz' || true)
exit $status
