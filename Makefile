# endpointlag — see README.md. `make test` installs what it needs on a fresh Debian machine (root).
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go

VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -X main.version=$(VERSION) -X main.revision=$(REVISION)

# Debian packages the build and the tests need: a C toolchain for the race detector.
DEB_PACKAGES := gcc libc6-dev

.PHONY: all build test unit lint fmt generate deps clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/endpointlag ./cmd/endpointlag

## deps: install missing Debian packages and download Go modules (tools included).
deps:
	@command -v $(GO) >/dev/null || { echo "Go 1.26 is required (expected at /usr/local/go)"; exit 1; }
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(GO) mod download

## test: unit tests (race detector on); prints how many tests skipped and why.
test: deps
	@mkdir -p bin
	$(GO) tool gotestsum --format testname --format-hide-empty-pkg --jsonfile bin/test.json -- -race -count=1 ./...
	@n=$$(grep -c '"Action":"skip","Package":"[^"]*","Test":' bin/test.json || true); \
	echo "skipped tests: $$n$$( [ "$$n" -gt 0 ] && echo ' (each with its reason under === Skipped above)')"

## lint: gofmt, go vet and staticcheck.
lint: deps
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

## generate: regenerate generated code.
generate:
	$(GO) generate ./...

clean:
	rm -rf bin
