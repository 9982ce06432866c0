#!/usr/bin/env bash
# Build the infergate image with buildah and smoke-test it (CPU variant by default).
#
#   scripts/build_image.sh                  # base: a local Debian bookworm made with debootstrap
#   BASE_IMAGE=python:3.11-slim-bookworm scripts/build_image.sh   # where a registry is reachable
#   VARIANT=cuda BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 SMOKE=0 scripts/build_image.sh
#
# Too slow for every CI run (a minute or more), so it is a script, not a test; docs/deploy.md
# records a run. Needs root, buildah, podman and debootstrap (apt-get install -y
# --no-install-recommends buildah podman debootstrap). Builds use --isolation chroot, the
# only isolation that works inside an unprivileged container. When no image can be pulled,
# the base is made locally: debootstrap --variant=minbase bookworm, imported with podman.
# The smoke test runs in the built image with `buildah run`: `infergate --version`, then
# scripts/smoke_image.py serves the demo repository (mounted at /models) and answers one
# ModelInfer. A host CA bundle (TLS-intercepting proxy) goes to pip as a build secret.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VARIANT="${VARIANT:-cpu}"
LOCAL_BASE="localhost/debian:bookworm-min"
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")"
TAG="${TAG:-localhost/infergate:$VERSION-$VARIANT}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
SMOKE="${SMOKE:-1}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

log() { printf '[build_image] %s\n' "$*" >&2; }

make_local_base() {
    if podman image exists "$LOCAL_BASE"; then
        log "base image $LOCAL_BASE already present"
        return
    fi
    local rootfs
    rootfs="$(mktemp -d)"
    log "debootstrap --variant=minbase bookworm (no registry needed)"
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | podman import - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    log "imported $LOCAL_BASE"
}

build() {
    local secret=()
    [[ -f "$CA_BUNDLE" ]] && secret=(--secret "id=pip_cert,src=$CA_BUNDLE")
    log "building $TAG (VARIANT=$VARIANT, BASE_IMAGE=$BASE_IMAGE)"
    buildah bud --isolation chroot --layers "${secret[@]}" \
        --build-arg "VARIANT=$VARIANT" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --build-arg "VERSION=$VERSION" \
        --build-arg "REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$TAG" "$ROOT"
}

smoke() {
    local models container
    models="$(mktemp -d)"
    "$PYTHON" -m infergate demo-repository "$models" >/dev/null
    chmod -R a+rX "$models"
    container="$(buildah from "$TAG")"
    trap 'buildah rm "$container" >/dev/null; rm -rf "$models"' RETURN
    local mounts=(-v "$models:/models:ro" -v "$ROOT/scripts:/smoke:ro")
    log "smoke test in $TAG"
    buildah run --isolation chroot "${mounts[@]}" "$container" -- id
    buildah run --isolation chroot "${mounts[@]}" "$container" -- infergate --version
    buildah run --isolation chroot "${mounts[@]}" "$container" -- python /smoke/smoke_image.py /models
}

[[ "$BASE_IMAGE" == "$LOCAL_BASE" ]] && make_local_base
build
podman image inspect --format 'image {{index .RepoTags 0}}: {{.Size}} bytes' "$TAG"
[[ "$SMOKE" == 1 ]] && smoke
log "OK: $TAG"
