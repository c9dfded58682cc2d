#!/usr/bin/env bash
# Builds the envtest binaries (kube-apiserver and etcd) from the Go module proxy into a cache
# folder outside the clone, keyed by version, and prints that folder on stdout. No download site
# is reachable from CI, so they are compiled from source; a second run reuses the cache at once.
# With --cluster it also builds kube-controller-manager, kube-scheduler and kubectl into the same
# folder (the one-machine cluster of internal/cluster and the end-to-end tests of test/e2e).
#
#   KUBEBUILDER_ASSETS=$(hack/envtest-assets.sh)
#   KUBEBUILDER_ASSETS=$(hack/envtest-assets.sh --cluster)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.37.2}
ETCD_VERSION=${ETCD_VERSION:-3.7.3}
CACHE_ROOT=${LOOPSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loopserve}
DEST="$CACHE_ROOT/envtest/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"

log() { printf 'envtest-assets: %s\n' "$*" >&2; }

bins=(kube-apiserver etcd)
if [[ ${1:-} == --cluster ]]; then
  bins+=(kube-controller-manager kube-scheduler kubectl)
fi
missing=()
for b in "${bins[@]}"; do
  [[ -x "$DEST/$b" ]] || missing+=("$b")
done
if ((${#missing[@]} == 0)); then
  echo "$DEST"
  exit 0
fi
has() { [[ " ${missing[*]} " == *" $1 "* ]]; }

mkdir -p "$CACHE_ROOT/envtest"
work=$(mktemp -d "$CACHE_ROOT/envtest/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
start=$SECONDS

# The Kubernetes binaries: a wrapper module that requires k8s.io/kubernetes and replaces every staging
# module (they are required at v0.0.0 upstream) with the matching v0.x release.
staging="0.${K8S_VERSION#1.}"
mkdir -p "$work/apiserver" "$work/out"
if has kube-apiserver || has kube-controller-manager || has kube-scheduler || has kubectl; then
(
  cd "$work/apiserver"
  go mod init envtest/apiserver >/dev/null 2>&1
  log "resolving k8s.io/kubernetes v$K8S_VERSION"
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  replaces=()
  while read -r mod; do
    replaces+=("-replace=$mod=$mod@v$staging")
  done < <(awk '$2 == "v0.0.0" && $1 ~ /^k8s\.io\// {print $1}' "$gomod" | sort -u)
  log "replacing ${#replaces[@]} staging modules with v$staging"
  go mod edit "${replaces[@]}"
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  log "fetching modules for kube-apiserver (minutes on first run)"
  go get "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" >&2
  minor=${K8S_VERSION#*.} minor=${minor%%.*}
  ldflags="-s -w"
  # component-base is what the servers report, client-go what kubectl version --client prints.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    has "$b" || continue
    [[ $b == kube-apiserver ]] || go get "k8s.io/kubernetes/cmd/$b@v$K8S_VERSION" >&2
    log "compiling $b (kube-apiserver is the long part: ~8 minutes on 2 cores; the others reuse most of it)"
    CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$work/out/$b" "k8s.io/kubernetes/cmd/$b"
    log "$b built after $((SECONDS - start))s"
  done
)
fi

if has etcd; then
mkdir -p "$work/etcd"
(
  cd "$work/etcd"
  go mod init envtest/etcd >/dev/null 2>&1
  log "fetching etcd v$ETCD_VERSION"
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  log "compiling etcd"
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/out/etcd" go.etcd.io/etcd/server/v3
)
log "etcd built after $((SECONDS - start))s"
fi

# Add what was built to the folder; each binary lands whole (a rename) or not at all.
mkdir -p "$DEST"
for b in "${missing[@]}"; do
  mv "$work/out/$b" "$DEST/.$b.tmp" && mv "$DEST/.$b.tmp" "$DEST/$b"
done
"$DEST/kube-apiserver" --version >&2
echo "$DEST"
