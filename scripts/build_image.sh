#!/usr/bin/env bash
# Build the infergate image with buildah and smoke-test it (CPU variant by default).
#
#   scripts/build_image.sh                  # base: a local Debian bookworm made with debootstrap
#   BASE_IMAGE=python:3.11-slim-bookworm scripts/build_image.sh   # where a registry is reachable
#   VARIANT=cuda scripts/build_image.sh     # onnxruntime-gpu with the CUDA 13 and cuDNN wheels; checked below
#
# `make image-test` runs it for both variants. Too slow for every CI run (docs/deploy.md records
# what it costs), so it is a make target, not part of `make test`. Needs root, buildah, podman and
# debootstrap (apt-get install -y --no-install-recommends buildah podman debootstrap). Builds use
# --isolation chroot, the only isolation that works inside an unprivileged container. When no
# image can be pulled, the base is made locally: debootstrap --variant=minbase bookworm,
# imported with podman.
#
# Smoke tests (SMOKE=1, the default; both variants, no GPU needed): in the built image with
# `buildah run`, `id` and `infergate --version`, then scripts/smoke_image.py serves the demo
# repository (mounted at /models) and answers one ModelInfer; the same again with the image's root filesystem
# mounted read-only (needs unshare, i.e. root); then scripts/smoke_image_client.py runs the
# image's server and calls it from the host with tritonclient, then SIGTERMs it (exit 0).
# CUDA: scripts/check_image_cuda.py in the image: `import onnxruntime` must list
# CUDAExecutionProvider, and every library the CUDA provider and the NVIDIA wheels need must
# resolve inside the image except the driver's libcuda.so.1 (no GPU needed for either; running
# a model on a GPU needs a GPU node with the NVIDIA driver, R580 or newer, for CUDA 13).
# A host CA bundle (TLS-intercepting proxy) goes to pip as a build secret.
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

CONTAINER=""
MODELS=""
cleanup() {
    if [[ -n "$CONTAINER" ]]; then buildah rm "$CONTAINER" >/dev/null; fi
    if [[ -n "$MODELS" ]]; then rm -rf "$MODELS"; fi
}
trap cleanup EXIT

smoke() {
    MODELS="$(mktemp -d)"
    "$PYTHON" -m infergate demo-repository "$MODELS" >/dev/null
    chmod -R a+rX "$MODELS"
    CONTAINER="$(buildah from "$TAG")"
    local run=(buildah run --isolation chroot -v "$MODELS:/models:ro" -v "$ROOT/scripts:/smoke:ro" "$CONTAINER" --)
    log "smoke test in $TAG"
    "${run[@]}" id
    "${run[@]}" infergate --version
    "${run[@]}" python /smoke/smoke_image.py /models
}

# buildah run cannot make the root filesystem read-only, so this step mounts the image's
# root read-only in a private mount namespace (tmpfs on /tmp, the models read-only on
# /models, as the Helm chart does) and serves the same request from it as uid 10001.
smoke_read_only() {
    local root
    root="$(buildah mount "$CONTAINER")"
    log "smoke test with a read-only root filesystem"
    unshare --mount sh -euc '
        root="$1"; models="$2"; smoke="$3"
        mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"
        mount -t tmpfs -o size=64m,mode=1777 tmpfs "$root/tmp"
        mount --bind "$models" "$root/models" && mount -o remount,bind,ro "$root/models"
        mount -t proc proc "$root/proc" && mount --bind /dev "$root/dev"
        cp "$smoke" "$root/tmp/smoke_image.py"
        chroot_bin="$(command -v chroot)"
        exec env -i PATH=/opt/infergate/bin:/usr/bin:/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
            "$chroot_bin" --userspec=10001:10001 "$root" sh -c "
                if touch /opt/infergate/probe 2>/dev/null; then echo root filesystem is writable; exit 1; fi
                echo root filesystem: read-only; cd /tmp && exec python /tmp/smoke_image.py /models"
    ' sh "$root" "$MODELS" "$ROOT/scripts/smoke_image.py"
    buildah umount "$CONTAINER" >/dev/null
}

# The pip package onnxruntime-gpu lists the providers it was built with, and ldd resolves
# libraries, whether or not a GPU is present, so this check needs none.
check_cuda_image() {
    local container
    container="$(buildah from "$TAG")"
    log "CUDA provider and libraries in $TAG"
    buildah run --isolation chroot -v "$ROOT/scripts:/smoke:ro" "$container" -- python /smoke/check_image_cuda.py
    buildah rm "$container" >/dev/null
}

[[ "$BASE_IMAGE" == "$LOCAL_BASE" ]] && make_local_base
build
podman image inspect --format 'image {{index .RepoTags 0}}: {{.Size}} bytes' "$TAG"
if [[ "$VARIANT" == cuda ]]; then
    check_cuda_image
fi
# The smoke steps are the same for both variants: the CUDA image serves on onnxruntime-gpu's CPU provider.
if [[ "$SMOKE" == 1 ]]; then
    smoke
    smoke_read_only
    log "smoke test from the host: tritonclient to the image's server, then SIGTERM"
    "$PYTHON" "$ROOT/scripts/smoke_image_client.py" "$TAG"
fi
log "OK: $TAG"
