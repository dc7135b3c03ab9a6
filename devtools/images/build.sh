#!/usr/bin/env bash
# Build the project's images, fedtune/operator and fedtune/trainer (make images).
#
#   devtools/images/build.sh [TAG]     # TAG defaults to the project's version
#
# FEDTUNE_IMAGE_BASES=standin (default) builds on local stand-ins for the public base
# images (standin-bases.sh: no registry is needed); =public uses the Dockerfiles' own
# defaults (python:3.11-slim-bookworm, pytorch/pytorch), pulled from Docker Hub.
# Starts a Docker engine first when none answers (engine.sh). Prints each build's time
# and each image's size.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TAG="${1:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml")}"
BASES="${FEDTUNE_IMAGE_BASES:-standin}"

# Docker's own BuildKit needs the buildx plugin; without it the classic builder does the same.
if [[ -z "${DOCKER_BUILDKIT:-}" ]]; then
    docker buildx version >/dev/null 2>&1 && export DOCKER_BUILDKIT=1 || export DOCKER_BUILDKIT=0
fi

"$HERE/engine.sh" >/dev/null
operator_args=() trainer_args=()
case "$BASES" in
    standin)
        mapfile -t bases < <("$HERE/standin-bases.sh")
        operator_args=(--build-arg "BASE_IMAGE=${bases[0]}")
        trainer_args=(--build-arg "BASE_IMAGE=${bases[1]}")
        ;;
    public) ;;
    *) echo "FEDTUNE_IMAGE_BASES must be standin or public, not '$BASES'" >&2; exit 2 ;;
esac

build() {
    local image="$1" start=$SECONDS
    shift
    # --network host: the engine runs without a bridge of its own (see engine.sh).
    docker build --network host -q -t "$image" "$@" "$REPO" >/dev/null
    printf '%-28s built in %4d s, %s\n' "$image" $((SECONDS - start)) \
        "$(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.2f GB", $1 / 1e9 }')"
}

build "fedtune/operator:$TAG" "${operator_args[@]}"
build "fedtune/trainer:$TAG" -f "$REPO/trainer_image/Dockerfile" "${trainer_args[@]}"
