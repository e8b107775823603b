#!/usr/bin/env bash
# Copies the Prometheus Operator's CustomResourceDefinitions the chart's optional objects use
# (ServiceMonitor, PodMonitor, PrometheusRule) into the directory given as $1, from the operator's
# Go module at the version below, downloaded from the Go module proxy into GOMODCACHE; for a
# server-side dry run of the chart's output against a real API server (kubectl apply
# --server-side -f DIR first). Keep the version in step with
# github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring in go.mod, whose types the
# chart's tests decode the objects with.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:?usage: crds.sh OUTDIR}
version=${PROMETHEUS_OPERATOR_VERSION:-$(go list -m -f '{{.Version}}' github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring)}
dir=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$version" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [ -z "$dir" ] || [ ! -d "$dir/example/prometheus-operator-crd" ]; then
  echo "crds: the module github.com/prometheus-operator/prometheus-operator@$version has no example/prometheus-operator-crd" >&2
  exit 1
fi
mkdir -p "$out"
for kind in servicemonitors podmonitors prometheusrules; do
  f=monitoring.coreos.com_$kind.yaml
  install -m 0644 "$dir/example/prometheus-operator-crd/$f" "$out/$f"
done
echo "crds: the Prometheus Operator $version CRDs (ServiceMonitor, PodMonitor, PrometheusRule) are in $out"
