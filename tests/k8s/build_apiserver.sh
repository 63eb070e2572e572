#!/usr/bin/env bash
# Builds kube-apiserver from Debian's `kubernetes` source package, offline, with Debian's golang-go and the Go
# dependencies the package vendors; installs etcd-server. The binary is cached outside the repository:
#   ${STUDIO_RUNNER_K8S_CACHE:-~/.cache/studio-runner-k8s}/kube-apiserver
# tests/k8s finds it there (or via $STUDIO_RUNNER_KUBE_APISERVER) and skips when it is absent.
# Run by `nox -s k8s`. Neither the source nor the binary is ever committed.
# Takes ~9 minutes of two busy cores the first time (516 s measured); a no-op once the binary exists.
set -euo pipefail
CACHE="${STUDIO_RUNNER_K8S_CACHE:-$HOME/.cache/studio-runner-k8s}"
BIN="$CACHE/kube-apiserver"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

if [ -x "$BIN" ] && command -v etcd >/dev/null; then
  echo "kube-apiserver already built: $BIN"; exit 0
fi

# apt-get source needs a deb-src line; Debian's deb822 sources file has only `Types: deb`.
if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  SUITE="$(. /etc/os-release && echo "$VERSION_CODENAME")"
  $SUDO tee /etc/apt/sources.list.d/studio-runner-deb-src.sources >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server golang-go dpkg-dev rsync jq >/dev/null

mkdir -p "$CACHE/src"
cd "$CACHE/src"
SRCDIR="$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
if [ -z "$SRCDIR" ]; then
  apt-get source -qq kubernetes
  SRCDIR="$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
fi
cd "$SRCDIR"
# Kubernetes 1.20 builds in GOPATH mode (hack/lib/init.sh sets GO111MODULE=off) from its vendor/ tree, and its
# `make` first generates the OpenAPI definitions the apiserver embeds (not shipped in the source): `go build
# -mod=vendor` alone stops at "updates to go.mod needed". This is what debian/rules does, for one binary. Offline:
# no module proxy is consulted in GOPATH mode; CGO off as Debian builds it.
start=$SECONDS
env HOME="$CACHE/home" GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOCACHE="$CACHE/gocache" \
  make WHAT=cmd/kube-apiserver
cp _output/bin/kube-apiserver "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "built $BIN in $((SECONDS - start)) s"
# The unpacked source and its build tree take ~2 GB; the binary is all the tests need.
cd "$CACHE" && rm -rf "$CACHE/src" "$CACHE/gocache"
