#!/usr/bin/env bash
# Builds Traefik, at the version pinned in this folder's go.mod, into the directory given as $1
# (a binary already there is kept: the Makefile names the directory after the version and a hash
# of this folder's files). `build.sh --tidy` runs `go mod tidy` the same way and writes go.mod
# and go.sum back here.
#
# Traefik's own go.mod has replace lines (so `go install …@version` is refused) and two of its
# dependencies do not build from the Go module proxy as they are:
#   - github.com/abbot/go-http-auth: Traefik uses its fork github.com/containous/go-http-auth,
#     which the proxy does not serve; the version pinned by this go.mod's replace (v0.4.0) is,
#     and lacks two functions: overlay/go-http-auth/ adds them (and a go.mod: v0.4.0 has none);
#   - github.com/go-acme/lego/v5: its providers/dns package imports ~200 DNS providers whose
#     SDKs the proxy does not all serve: overlay/lego/ replaces that package by one keeping only
#     NewDNSChallengeProviderByName (which fails), and the provider subpackages are removed.
# Neither is kept in this repository: both are fetched from the module proxy at their pinned
# versions (go mod download -json), copied to a temporary directory with the overlays applied,
# and the build module (also copied there) points `replace` lines at the copies.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=build
if [ "${1:-}" = --tidy ]; then
  mode=tidy
else
  out=${1:?usage: build.sh OUTDIR | build.sh --tidy}
  if [ -x "$out/traefik" ]; then
    echo "lab: traefik is built ($out/traefik)"
    exit 0
  fi
fi

# version PATH: the version this go.mod's replace (or else require) line pins PATH at.
version() {
  local v
  v=$(sed -n "s|^\s*$1 => $1 \(v[^ ]*\)\$|\1|p" "$here/go.mod")
  [ -n "$v" ] || v=$(sed -n "s|^\s*$1 \(v[^ ]*\).*|\1|p" "$here/go.mod" | head -n1)
  [ -n "$v" ] || { echo "lab/traefik/build.sh: no version of $1 in go.mod" >&2; exit 1; }
  echo "$v"
}

# fetch PATH VERSION DEST: copies the module from the module cache (downloading it first) to DEST,
# writable.
fetch() {
  local dir
  dir=$(cd "$here" && go mod download -json "$1@$2" | sed -n 's|^\s*"Dir": "\(.*\)",\?$|\1|p')
  [ -d "$dir" ] || { echo "lab/traefik/build.sh: go mod download $1@$2 gave no directory" >&2; exit 1; }
  cp -R "$dir" "$3"
  chmod -R u+w "$3"
}

tmp=$(mktemp -d /tmp/endpointlag-traefik.XXXXXX)
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT

auth_version=$(version github.com/abbot/go-http-auth)
lego_version=$(version github.com/go-acme/lego/v5)
traefik_version=$(version github.com/traefik/traefik/v3)

fetch github.com/abbot/go-http-auth "$auth_version" "$tmp/go-http-auth"
cp "$here"/overlay/go-http-auth/* "$tmp/go-http-auth/"

fetch github.com/go-acme/lego/v5 "$lego_version" "$tmp/lego"
rm -rf "$tmp/lego/providers/dns"
mkdir -p "$tmp/lego/providers/dns"
cp "$here"/overlay/lego/providers/dns/*.go "$tmp/lego/providers/dns/"
# lego's command (not used by Traefik) imports the providers too.
rm -rf "$tmp/lego/cmd" "$tmp/lego/main.go" "$tmp/lego/e2e" "$tmp/lego/internal/generators"

mkdir "$tmp/build"
cp -R "$here/go.mod" "$here/go.sum" "$here/ext" "$tmp/build/"
cd "$tmp/build"
go mod edit -replace "github.com/abbot/go-http-auth=$tmp/go-http-auth" \
            -replace "github.com/go-acme/lego/v5=$tmp/lego"

if [ "$mode" = tidy ]; then
  go mod tidy
  go mod edit -replace "github.com/abbot/go-http-auth=github.com/abbot/go-http-auth@$auth_version" \
              -dropreplace github.com/go-acme/lego/v5
  cp go.mod go.sum "$here/"
  echo "lab: lab/traefik/go.mod and go.sum tidied"
  exit 0
fi

mkdir -p "$out"
echo "lab: building traefik $traefik_version (a cold build takes about 10 minutes on 2 cores)..."
start=$(date +%s)
pkg=github.com/traefik/traefik/v3/pkg/version
go build -trimpath \
  -ldflags "-s -w -X $pkg.Version=$traefik_version -X $pkg.BuildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -o "$out/traefik.tmp" github.com/traefik/traefik/v3/cmd/traefik
mv "$out/traefik.tmp" "$out/traefik"
echo "lab: traefik built in $(( $(date +%s) - start ))s ($out/traefik)"
