# endpointlag — see README.md. `make test` installs what it needs on a fresh Debian machine (root).
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go

VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -X main.version=$(VERSION) -X main.revision=$(REVISION)

# Debian packages the build and the tests need: a C toolchain for the race detector; clang, llvm
# and libbpf's headers for the eBPF programs (make generate, and the staleness check in lint); the
# lab's kube-proxy drives nft and iptables, the lab uses ip (iproute2) for network namespaces and
# runs HAProxy as one of its ingress proxies, and the HAProxy reader's test runs a real haproxy on
# 127.0.0.1; the e2e tests open the aggregator's waterfall page in a headless chromium; prometheus
# (its promtool) checks and unit-tests the alerting rules, and the install test's Prometheus scrapes
# the lab's daemons, evaluates those rules and answers the dashboards' queries.
DEB_PACKAGES := gcc libc6-dev clang llvm libbpf-dev iproute2 nftables iptables conntrack haproxy chromium prometheus

# The lab's Kubernetes binaries, built from the Go module proxy at the version pinned in
# lab/k8s/go.mod, are cached outside the repository, keyed by that go.mod and go.sum.
K8S_VERSION := $(shell sed -n 's|^\s*k8s.io/kubernetes \(v[^ ]*\).*|\1|p' lab/k8s/go.mod)
LAB_CACHE   ?= /var/cache/endpointlag
LAB_BIN_DIR ?= $(LAB_CACHE)/k8s-$(K8S_VERSION)-$(shell cat lab/k8s/go.mod lab/k8s/go.sum | sha256sum | cut -c1-12)
export LAB_BIN_DIR
# Traefik, the lab's other ingress proxy, built from the module proxy at the version pinned in
# lab/traefik/go.mod, cached likewise, keyed by every file of lab/traefik (go.mod, go.sum, the
# build script and what it puts into the copies of the two dependencies it changes).
TRAEFIK_VERSION := $(shell sed -n 's|^\s*github.com/traefik/traefik/v3 \(v[^ ]*\).*|\1|p' lab/traefik/go.mod)
TRAEFIK_HASH    := $(shell find lab/traefik -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-12)
TRAEFIK_DIR     ?= $(LAB_CACHE)/traefik-$(TRAEFIK_VERSION)-$(TRAEFIK_HASH)
LAB_TRAEFIK     ?= $(TRAEFIK_DIR)/traefik
export LAB_TRAEFIK
# The lab's OpenTelemetry Collector (the daemons' traces go to it), built from the module proxy at
# the version pinned in lab/otelcol/go.mod, cached likewise, keyed by every file of lab/otelcol.
OTELCOL_VERSION := $(shell sed -n 's|^\s*go.opentelemetry.io/collector/otelcol \(v[^ ]*\).*|\1|p' lab/otelcol/go.mod)
OTELCOL_HASH    := $(shell find lab/otelcol -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-12)
OTELCOL_DIR     ?= $(LAB_CACHE)/otelcol-$(OTELCOL_VERSION)-$(OTELCOL_HASH)
LAB_OTELCOL     ?= $(OTELCOL_DIR)/otelcol
export LAB_OTELCOL
# helm, for deploy/helm/endpointlag (make generate renders deploy/base from it, the tests lint and
# render it), built from the module proxy at the version deploy/tools/go.mod pins (its tool
# directive), cached like the lab's tools, keyed by that go.mod and go.sum.
HELM_VERSION := $(shell sed -n 's|^\s*helm.sh/helm/v3 \(v[^ ]*\).*|\1|p' deploy/tools/go.mod)
HELM_DIR     ?= $(LAB_CACHE)/helm-$(HELM_VERSION)-$(shell cat deploy/tools/go.mod deploy/tools/go.sum | sha256sum | cut -c1-12)
HELM         ?= $(HELM_DIR)/helm
LAB_HELM     ?= $(HELM)
export HELM LAB_HELM
# The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule) at the version of its
# API module in deploy/tools/go.mod, from the module proxy: the install test applies them first.
PROMETHEUS_OPERATOR_VERSION := $(shell sed -n 's|^\s*github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring \(v[^ ]*\).*|\1|p' deploy/tools/go.mod)
LAB_PROMETHEUS_CRDS ?= $(LAB_CACHE)/prometheus-operator-crds-$(PROMETHEUS_OPERATOR_VERSION)
export LAB_PROMETHEUS_CRDS
# make image: the image's architecture (arm64 only on an arm64 machine) and its files' time.
IMAGE_ARCH        ?= amd64
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
LAB_FLAGS ?=

.PHONY: all build test unit e2e lint fmt generate check-generate deps clean lab-bins lab-tool demo lab-up lab-down helm crds image fuzz

all: build

# Static, as the image builds it (make image): the two share the compiled packages in Go's build
# cache, so a first run builds them once.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=false -ldflags "$(LDFLAGS)" -o bin/endpointlag ./cmd/endpointlag

## deps: install missing Debian packages and download Go modules (tools included).
deps:
	@command -v $(GO) >/dev/null || { echo "Go 1.26 is required (expected at /usr/local/go)"; exit 1; }
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(GO) mod download
	cd lab && $(GO) mod download
	cd dashboards && $(GO) mod download
	cd deploy/tools && $(GO) mod download

## test: unit tests (race detector on; deploy/tools' tests, which run helm and build the image as
## child processes and start no goroutine of their own, without: instrumenting their Kubernetes
## and registry dependencies cost minutes of a first run), then the lab's end-to-end tests (root);
## prints how many tests skipped and why.
test: unit e2e

unit: deps helm
	@mkdir -p bin
	$(GO) tool gotestsum --format testname --format-hide-empty-pkg --jsonfile bin/unit.json -- -race -count=1 ./...
	cd deploy/tools && $$($(GO) -C ../.. tool -n gotestsum) --format testname --format-hide-empty-pkg --jsonfile ../../bin/tools.json -- -count=1 ./...
	@$(MAKE) -s skipped JSON=bin/unit.json
	@$(MAKE) -s skipped JSON=bin/tools.json

e2e: deps build lab-bins helm crds lab-tool
	cd lab && $(GO) tool gotestsum --format testname --format-hide-empty-pkg --jsonfile ../bin/e2e.json -- \
		-count=1 -timeout 20m ./...
	@$(MAKE) -s skipped JSON=bin/e2e.json

skipped:
	@n=$$(grep -c '"Action":"skip","Package":"[^"]*","Test":' $(JSON) || true); \
	echo "skipped tests: $$n$$( [ "$$n" -gt 0 ] && echo ' (each with its reason under === Skipped above)')"

## lab-bins: build etcd, kube-apiserver, kube-controller-manager, kube-proxy (cached in LAB_BIN_DIR),
## Traefik (cached in TRAEFIK_DIR) and the OpenTelemetry Collector (cached in OTELCOL_DIR).
lab-bins:
	lab/k8s/build.sh $(LAB_BIN_DIR)
	lab/traefik/build.sh $(TRAEFIK_DIR)
	lab/otelcol/build.sh $(OTELCOL_DIR)

## helm: build helm (cached in HELM_DIR); crds: fetch the Prometheus Operator's CRDs.
helm:
	deploy/tools/build-helm.sh $(HELM_DIR)

crds:
	deploy/tools/crds.sh $(LAB_PROMETHEUS_CRDS)

## image: the image without Docker, reproducibly: the OCI layout bin/image and bin/image.tar; prints
## the digest and writes bin/image.digest (docs/install.md says what it holds).
image: deps
	@mkdir -p bin
	cd deploy/tools && $(GO) run ./image -src ../.. -arch $(IMAGE_ARCH) -version $(VERSION) -revision $(REVISION) \
		-source-date-epoch $(SOURCE_DATE_EPOCH) -out ../../bin/image -archive ../../bin/image.tar -digest-file ../../bin/image.digest

## lab-tool: the lab's own command (bin/lab).
lab-tool:
	cd lab && $(GO) build -o ../bin/lab ./cmd/lab

## demo: the lab cluster, two rolling restarts under load, the propagation report.
demo: deps build lab-bins lab-tool
	bin/lab demo $(LAB_FLAGS)

## lab-up / lab-down: keep a lab running for interactive use.
lab-up: deps build lab-bins lab-tool
	@mkdir -p bin
	@setsid bin/lab up $(LAB_FLAGS) > bin/lab-up.log 2>&1 < /dev/null & \
	for i in $$(seq 1 600); do \
		if grep -q "lab is up" bin/lab-up.log; then cat bin/lab-up.log | grep -v level=; exit 0; fi; \
		if grep -q "^lab up:" bin/lab-up.log; then cat bin/lab-up.log; exit 1; fi; \
		sleep 0.5; \
	done; echo "lab did not come up; see bin/lab-up.log"; exit 1

lab-down: lab-tool
	bin/lab down

## fuzz: every fuzz target of the module, one after the other, FUZZTIME each (1,000,000
## executions), on FUZZ_PARALLEL workers; not part of test. Narrow it with FUZZ_PKGS (./probes/...).
FUZZTIME ?= 1000000x
FUZZ_PARALLEL ?= 1
FUZZ_PKGS ?= ./...
fuzz: deps
	@set -e; $(GO) test -list '^Fuzz' $(FUZZ_PKGS) | awk '/^Fuzz/ {t[n++]=$$1} /^ok / {for (i = 0; i < n; i++) print $$2, t[i]; n = 0}' | \
	while read -r pkg target; do \
		echo "== $$pkg $$target ($(FUZZTIME))"; \
		$(GO) test $$pkg -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) -parallel $(FUZZ_PARALLEL) </dev/null; \
	done

## lint: gofmt, go vet, staticcheck, generated eBPF objects and dashboards up to date, the dashboards'
## lint rules, and the alerting rules checked and unit-tested with promtool.
lint: deps check-generate
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	cd lab && $(GO) vet ./... && $(GO) tool staticcheck ./...
	cd dashboards && $(GO) vet ./... && $(GO) tool staticcheck ./... && $(GO) test -count=1 ./...
	cd deploy/tools && $(GO) vet ./... && $$($(GO) -C ../.. tool -n staticcheck) ./...
	deploy/rules/check.sh

fmt:
	gofmt -w $$(git ls-files '*.go')

## generate: regenerate generated code (bpf/: the eBPF object and its Go bindings, with bpf2go
## and Debian's clang; dashboards/*.json from their Go source, with grafana-foundation-sdk).
generate: helm
	$(GO) generate ./...
	cd dashboards && $(GO) run .
	cd deploy/tools && $(GO) run ./render -helm $(HELM)

## check-generate: fail when bpf/'s committed object or bindings differ from what endpointlag.c
## compiles to (they are regenerated in place, ready to commit).
check-generate: deps helm
	$(GO) generate ./bpf
	@git diff --exit-code --stat -- bpf/ || { echo "bpf/: the committed generated files were stale; regenerated, commit them"; exit 1; }
	cd deploy/tools && $(GO) run ./render -helm $(HELM) -check

clean:
	rm -rf bin
