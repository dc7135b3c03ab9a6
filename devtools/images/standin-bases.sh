#!/usr/bin/env bash
# Local stand-ins for the public base images, for machines that reach no image registry.
#
#   fedtune-standin/python:3.11-bookworm   for python:3.11-slim-bookworm (the operator's base):
#                                          Debian bookworm made by debootstrap, Debian's Python
#   fedtune-standin/torch:<torch version>  for pytorch/pytorch (the trainer's base): the above
#                                          plus /opt/venv holding torch and what it requires,
#                                          copied from an installed environment (FEDTUNE_VENV)
#   fedtune-standin/redis:bookworm         for redis (the jobs' Redis): Debian's redis-server
#
# Each is built once and kept in Docker's store; a second run returns at once. Prints
# the three image names, one per line (operator base, trainer base, Redis).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${FEDTUNE_VENV:-$HERE/../../.venv}"
CACHE="${FEDTUNE_CACHE:-$HOME/.cache/fedtune}"
PYTHON_BASE="fedtune-standin/python:3.11-bookworm"

log() { printf '[standin-bases %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror apt already uses for bookworm (never a hard-coded host).
debian_mirror() {
    apt-cache policy | awk '$3 == "bookworm/main" && $2 ~ /^https?:/ { print $2; exit }'
}

python_base() {
    have_image "$PYTHON_BASE" && return 0
    command -v debootstrap >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    }
    local root mirror
    mirror="$(debian_mirror)"
    [[ -n "$mirror" ]] || { log "no Debian mirror found in apt's sources"; exit 1; }
    root="$(mktemp -d "${TMPDIR:-/tmp}/fedtune-rootfs.XXXXXX")"
    log "debootstrap bookworm (minbase + Python) from $mirror"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    # This machine's certificate authorities (pip in a build must trust what the host's pip
    # trusts); only in this local stand-in, never in the project's Dockerfiles.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    tar -C "$root" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$PYTHON_BASE" >/dev/null
    rm -rf "$root"
    log "built $PYTHON_BASE"
}

# torch (the CUDA build from the package index, with its nvidia-* libraries) and its
# requirements, hard-linked from the installed environment into the build context.
torch_base() {
    local files version image stage site
    [[ -x "$VENV/bin/python" ]] || { log "no Python environment at $VENV (make install, or set FEDTUNE_VENV)"; exit 1; }
    files="$(mktemp)"
    "$VENV/bin/python" "$HERE/torch_files.py" >"$files"
    version="$(head -1 "$files")"
    image="fedtune-standin/torch:$version"
    if have_image "$image"; then
        rm -f "$files"
        printf '%s\n' "$image"
        return 0
    fi
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    stage="$CACHE/images/torch-$version"
    rm -rf "$stage"
    log "staging torch $version and its requirements from $site"
    # Four layers of about 1-1.5 GB rather than one of 5.5: pushing and pulling them into
    # the dev cluster's node compresses and unpacks them side by side.
    local layer pattern dockerfile="FROM $PYTHON_BASE"$'\n'"RUN python -m venv /opt/venv"$'\n'
    for layer in cuda-libs nvidia torch rest; do
        case "$layer" in
            cuda-libs) pattern='^nvidia/cu[0-9]+/' ;;
            nvidia) pattern='^nvidia' ;;
            torch) pattern='^(torch|torchgen|functorch)/' ;;
            rest) pattern='.' ;;
        esac
        mkdir -p "$stage/$layer"
        tail -n +2 "$files" | grep -E "$pattern" >"$stage/$layer.list" || true
        tail -n +2 "$files" | grep -vE "$pattern" >"$files.rest" || true
        { head -1 "$files"; cat "$files.rest"; } >"$files.next" && mv "$files.next" "$files"
        (cd "$site" && xargs -a "$stage/$layer.list" -d '\n' cp -l --parents -P -t "$stage/$layer" 2>/dev/null) \
            || (cd "$site" && xargs -a "$stage/$layer.list" -d '\n' cp --parents -P -t "$stage/$layer")
        dockerfile+="COPY $layer/ /opt/venv/lib/python3.11/site-packages/"$'\n'
    done
    rm -f "$files" "$files.rest" "$stage"/*.list
    printf '%sENV PATH=/opt/venv/bin:$PATH\n' "$dockerfile" >"$stage/Dockerfile"
    log "building $image"
    docker build -q -t "$image" "$stage" >/dev/null
    rm -rf "$stage"
    printf '%s\n' "$image"
}

redis_image() {
    local image="fedtune-standin/redis:bookworm"
    if ! have_image "$image"; then
        log "building $image"
        docker build -q --network host -t "$image" - >/dev/null <<DOCKERFILE
FROM $PYTHON_BASE
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null \\
    && rm -rf /var/lib/apt/lists/*
CMD ["redis-server"]
DOCKERFILE
    fi
    printf '%s\n' "$image"
}

python_base
printf '%s\n' "$PYTHON_BASE"
torch_base
redis_image
