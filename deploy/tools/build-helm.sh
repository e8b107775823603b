#!/usr/bin/env bash
# Builds helm at the version pinned in this folder's go.mod (its tool directive) into the directory
# given as $1; a binary already there is kept (the Makefile names the directory after the version
# and a hash of go.mod and go.sum, like the lab's other tools under /var/cache/endpointlag).
set -euo pipefail
cd "$(dirname "$0")"
out=${1:?usage: build-helm.sh OUTDIR}
if [ -x "$out/helm" ]; then
  echo "deploy: helm is built ($out/helm)"
  exit 0
fi
mkdir -p "$out"
ver=$(go list -m -f '{{.Version}}' helm.sh/helm/v3)
echo "deploy: building helm $ver from the module proxy (a cold build takes a few minutes on 2 cores)..."
start=$(date +%s)
# The ldflags helm's own Makefile sets: its version, and the Kubernetes version of its client-go
# (1.<minor>), which `helm lint` checks deprecated APIs against and `helm template` reports as
# .Capabilities.KubeVersion (v1.20 without them).
minor=$(go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$ver -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
done
go build -trimpath -ldflags "$ldflags" \
  -o "$out/helm.tmp" helm.sh/helm/v3/cmd/helm
mv "$out/helm.tmp" "$out/helm"
echo "deploy: helm $ver built in $(( $(date +%s) - start ))s ($out/helm)"
