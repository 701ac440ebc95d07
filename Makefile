# ftctl: the two commands a fresh Debian 12 machine needs are `make demo`
# and `make test`; each installs its own dependencies through hack/deps.sh.

GO      ?= go
OUT     := _output
BIN     := $(OUT)/bin/ftctl
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
FUZZTIME ?= 10s

.PHONY: all deps build guest demo soak test unit vet fmt-check fuzz guest-test bench clean

all: build

deps:
	@bash hack/deps.sh

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/ftctl

guest: deps
	$(GO) run ./hack/mkguest

# The main job: protect the built-in guest on two hosts (namespaces), kill
# the primary host, verify that nothing the client saw acknowledged is lost.
demo: deps build guest
	$(BIN) demo

# The randomized kill test at length: SOAK_KILLS failovers (make test runs 20).
# FTCTL_KILL_SEED=N replays a run's random choices.
SOAK_KILLS ?= 200
soak: deps guest
	FTCTL_KILLS=$(SOAK_KILLS) $(GO) test -count=1 -timeout 4h -run '^TestRandomizedKills$$' -v ./e2e/

# Everything CI runs: static checks, all tests under the race detector
# (real QEMU under TCG included), short fuzz runs, and the tests that need
# a guest kernel with soft-dirty (run inside a TCG guest).
test: deps vet fmt-check guest unit fuzz guest-test

unit:
	$(GO) test -race -count=1 -timeout 25m ./...

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

fuzz:
	@FUZZTIME=$(FUZZTIME) bash hack/fuzz.sh

guest-test:
	@if [ -x hack/guest-test.sh ]; then bash hack/guest-test.sh; else echo "guest-test: hack/guest-test.sh not present yet"; fi

bench:
	$(GO) test -run '^$$' -bench . -benchtime 1x ./...

clean:
	rm -rf $(OUT)
