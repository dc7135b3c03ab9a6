#!/usr/bin/env bash
# Build a local Kubernetes cluster from source through the Go module proxy: the
# control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler),
# the node's kubelet and kube-proxy, CoreDNS, the NetworkPolicy engine
# (kube-router's), an image registry for the node, crictl, the pause program,
# and helm.
#
# Binaries land in ${FEDTUNE_CACHE:-$HOME/.cache/fedtune}/bin; scratch Go
# modules live in $CACHE/src. Nothing is written inside the repository.
# Idempotent: a binary that already reports the wanted version is kept.
#
#   devtools/cluster/build.sh            # build whatever is missing
#   FEDTUNE_K8S_VERSION=v1.34.3 devtools/cluster/build.sh
#   devtools/cluster/build.sh versions   # print the versions it would build
#
# Why from source: no Docker and no download site is reachable here, only the
# Go module proxy. See devtools/cluster/README.md for the details and timings.

# The builds run in ( subshells ) on purpose so their GOFLAGS stay local.
# shellcheck disable=SC2030,SC2031
set -euo pipefail

K8S_VERSION="${FEDTUNE_K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${FEDTUNE_ETCD_VERSION:-v3.6.4}"
HELM_VERSION="${FEDTUNE_HELM_VERSION:-v3.22.0}"
COREDNS_VERSION="${FEDTUNE_COREDNS_VERSION:-v1.12.4}"
REGISTRY_VERSION="${FEDTUNE_REGISTRY_VERSION:-v3.0.0}"
CRICTL_VERSION="${FEDTUNE_CRICTL_VERSION:-v1.34.0}"
KUBE_ROUTER_VERSION="${FEDTUNE_KUBE_ROUTER_VERSION:-v2.1.0}"
K8S_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${FEDTUNE_CACHE:-$HOME/.cache/fedtune}"
BIN="$CACHE/bin"
SRC="$CACHE/src"

# 2 cores / few GB: keep the compiler and linker from fanning out further.
export GOMAXPROCS="${GOMAXPROCS:-2}"
export CGO_ENABLED=0
JOBS="${FEDTUNE_BUILD_JOBS:-2}"

log() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# --- version probes: the binaries themselves are the source of truth -------

etcd_version() { "$BIN/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: //p'; }
kube_version() { "$BIN/$1" --version 2>/dev/null | sed -n 's/^Kubernetes //p'; }
helm_version() { "$BIN/helm" version --template '{{.Version}}' 2>/dev/null || true; }

# --- kubernetes ---------------------------------------------------------------

# The staging modules that k8s.io/kubernetes replaces with ./staging/... paths,
# read from the proxy's own copy of that version's go.mod (never hand-typed:
# the list changes between minor versions).
staging_modules() {
    local gomod
    gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    [[ -f "$gomod" ]] || { log "cannot read go.mod of k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
    sed -n 's#^[[:space:]]*\(k8s.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod"
}

k8s_ldflags() {
    local major minor flags="-s -w" pkg
    major="${K8S_VERSION#v}"; major="${major%%.*}"
    minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
    # Without these /version says v0.0.0 and helm rejects charts with kubeVersion.
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major"
        flags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    printf '%s' "$flags"
}

prepare_k8s_module() {
    local dir="$1" staging_version mod
    # k8s.io/kubernetes v1.Y.Z pairs with staging modules v0.Y.Z.
    staging_version="v0.${K8S_VERSION#v1.}"
    mkdir -p "$dir"
    cd "$dir"
    if [[ ! -f go.mod ]]; then
        go mod init fedtune.local/k8s-build >/dev/null 2>&1
    fi
    go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
    local count=0
    for mod in $(staging_modules); do
        go mod edit -replace "$mod=$mod@$staging_version"
        count=$((count + 1))
    done
    [[ $count -gt 0 ]] || { log "no staging modules found"; exit 1; }
    log "k8s module: $count staging modules replaced at $staging_version"
    # A file that imports nothing keeps 'go' happy about an empty module.
    printf 'package k8sbuild\n' >doc.go
    local packages=("${K8S_COMMANDS[@]/#/k8s.io/kubernetes/cmd/}")
    go get "${packages[@]/%/@$K8S_VERSION}"
}

build_k8s() {
    local wanted=() cmd dir="$SRC/kubernetes-$K8S_VERSION"
    for cmd in "${K8S_COMMANDS[@]}"; do
        if [[ "$(kube_version "$cmd")" == "$K8S_VERSION" ]]; then
            log "$cmd $K8S_VERSION already built"
        else
            wanted+=("$cmd")
        fi
    done
    [[ ${#wanted[@]} -gt 0 ]] || return 0
    log "building ${wanted[*]} $K8S_VERSION in $dir"
    (
        export GOFLAGS="-mod=mod -buildvcs=false"
        prepare_k8s_module "$dir"
        for cmd in "${wanted[@]}"; do
            log "go build $cmd (cold: many minutes)"
            go build -p "$JOBS" -trimpath -ldflags "$(k8s_ldflags)" \
                -o "$BIN/.$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
            mv -f "$BIN/.$cmd.tmp" "$BIN/$cmd"
        done
    )
}

# --- etcd ----------------------------------------------------------------------

build_etcd() {
    local dir="$SRC/etcd-$ETCD_VERSION"
    if [[ "$(etcd_version)" == "${ETCD_VERSION#v}" ]]; then
        log "etcd $ETCD_VERSION already built"
        return 0
    fi
    log "building etcd $ETCD_VERSION in $dir"
    (
        export GOFLAGS="-mod=mod -buildvcs=false"
        mkdir -p "$dir"
        cd "$dir"
        # Its own module: etcd's and Kubernetes' dependency graphs must not meet.
        [[ -f go.mod ]] || go mod init fedtune.local/etcd-build >/dev/null 2>&1
        printf 'package etcdbuild\n' >doc.go
        go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        go build -p "$JOBS" -trimpath -ldflags "-s -w" \
            -o "$BIN/.etcd.tmp" go.etcd.io/etcd/server/v3
        mv -f "$BIN/.etcd.tmp" "$BIN/etcd"
    )
}

# --- helm ----------------------------------------------------------------------

build_helm() {
    if [[ "$(helm_version)" == "$HELM_VERSION" ]]; then
        log "helm $HELM_VERSION already built"
        return 0
    fi
    log "building helm $HELM_VERSION"
    local tmp
    tmp="$(mktemp -d "$CACHE/.helm-build.XXXXXX")"
    # helm has no replace directives, so a plain 'go install pkg@version' works
    # (and refuses -mod=mod, hence the bare GOFLAGS).
    GOFLAGS="-buildvcs=false" GOBIN="$tmp" go install -p "$JOBS" -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv -f "$tmp/helm" "$BIN/helm"
    rm -rf "$tmp"
}

# --- tools without replace directives: plain 'go install pkg@version' ---------

# The binaries cannot all report a version, so a stamp next to each says which
# version it was built from.
stamped_version() { cat "$BIN/.$1.version" 2>/dev/null || true; }

# go_tool NAME PACKAGE VERSION [LDFLAGS]: build PACKAGE@VERSION as $BIN/NAME.
go_tool() {
    local name="$1" package="$2" version="$3" ldflags="-s -w ${4:-}" tmp
    if [[ -x "$BIN/$name" && "$(stamped_version "$name")" == "$version" ]]; then
        log "$name $version already built"
        return 0
    fi
    log "building $name $version"
    tmp="$(mktemp -d "$CACHE/.$name-build.XXXXXX")"
    GOFLAGS="-buildvcs=false" GOBIN="$tmp" go install -p "$JOBS" -trimpath -ldflags "$ldflags" "$package@$version"
    mv -f "$tmp/$(basename "$package")" "$BIN/$name"
    printf '%s\n' "$version" >"$BIN/.$name.version"
    rm -rf "$tmp"
}

# The pause program every pod's sandbox runs (devtools/cluster/pause): rebuilt
# when its source changes, so the stamp is the source's checksum.
build_pause() {
    local sum
    sum="$(sha256sum "$HERE/pause/main.go" | cut -c1-16)"
    if [[ -x "$BIN/pause" && "$(stamped_version pause)" == "$sum" ]]; then
        log "pause $sum already built"
        return 0
    fi
    log "building pause"
    (cd "$HERE/pause" && GOFLAGS="-buildvcs=false" go build -trimpath -ldflags "-s -w" -o "$BIN/.pause.tmp" main.go)
    mv -f "$BIN/.pause.tmp" "$BIN/pause"
    printf '%s\n' "$sum" >"$BIN/.pause.version"
}

build_node_tools() {
    go_tool coredns github.com/coredns/coredns "$COREDNS_VERSION" \
        "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
    go_tool registry github.com/distribution/distribution/v3/cmd/registry "$REGISTRY_VERSION" \
        "-X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION"
    go_tool crictl sigs.k8s.io/cri-tools/cmd/crictl "$CRICTL_VERSION" \
        "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"
    # The NetworkPolicy engine: kube-router's policy controller (iptables and ipset).
    # kube-network-policies needs nftables' `queue` expression, which our kernels lack.
    go_tool kube-router github.com/cloudnativelabs/kube-router/v2/cmd/kube-router "$KUBE_ROUTER_VERSION" \
        "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION"
    build_pause
}

main() {
    if [[ "${1:-}" == versions ]]; then
        printf 'kubernetes=%s\netcd=%s\nhelm=%s\ncoredns=%s\nregistry=%s\ncrictl=%s\nkube-router=%s\n' \
            "$K8S_VERSION" "$ETCD_VERSION" "$HELM_VERSION" "$COREDNS_VERSION" "$REGISTRY_VERSION" \
            "$CRICTL_VERSION" "$KUBE_ROUTER_VERSION"
        return 0
    fi
    command -v go >/dev/null || { log "go is not on PATH"; exit 1; }
    mkdir -p "$BIN" "$SRC"
    local start=$SECONDS
    build_etcd
    build_k8s
    build_helm
    build_node_tools
    log "done in $((SECONDS - start))s: $BIN"
    log "etcd $(etcd_version); kubernetes $(kube_version kubelet); helm $(helm_version);" \
        "coredns $(stamped_version coredns); registry $(stamped_version registry);" \
        "kube-router $(stamped_version kube-router)"
}

main "$@"
