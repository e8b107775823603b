#!/usr/bin/env bash
# Builds the lab's OpenTelemetry Collector (this folder: the collector's core, the OTLP receiver and
# the contrib file exporter, at the versions go.mod pins) into the directory given as $1; a binary
# already there is kept (the Makefile names the directory after the version and a hash of this
# folder's files).
set -euo pipefail
cd "$(dirname "$0")"
out=${1:?usage: build.sh OUTDIR}
if [ -x "$out/otelcol" ]; then
  echo "lab: otelcol is built ($out/otelcol)"
  exit 0
fi
mkdir -p "$out"
echo "lab: building the OpenTelemetry Collector $(go list -m -f '{{.Version}}' go.opentelemetry.io/collector/otelcol) (a cold build takes a few minutes on 2 cores)..."
start=$(date +%s)
go build -trimpath -ldflags "-s -w" -o "$out/otelcol.tmp" .
mv "$out/otelcol.tmp" "$out/otelcol"
echo "lab: otelcol built in $(( $(date +%s) - start ))s ($out/otelcol)"
