#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-proxy at the Kubernetes version
# pinned in this folder's go.mod (the one place it is set) into the directory given as $1.
# Binaries already there are kept: the directory name carries the version and a hash of go.sum.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
ver=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=$(echo "$ver" | cut -d. -f2)
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$ver -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
ldflags="$ldflags -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
i=0
for target in etcd=go.etcd.io/etcd/server/v3 \
              kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
              kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
              kube-proxy=k8s.io/kubernetes/cmd/kube-proxy; do
  i=$((i + 1))
  name=${target%%=*}
  if [ -x "$out/$name" ]; then
    echo "lab: [$i/4] $name $ver is built ($out/$name)"
    continue
  fi
  echo "lab: [$i/4] building $name $ver (a cold build of all four takes about 6 minutes on 2 cores)..."
  start=$(date +%s)
  go build -trimpath -ldflags "$ldflags" -o "$out/$name.tmp" "${target#*=}"
  mv "$out/$name.tmp" "$out/$name"
  echo "lab: [$i/4] $name built in $(( $(date +%s) - start ))s"
done
