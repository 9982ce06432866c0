#!/usr/bin/env bash
# Install Triton's C++ perf_analyzer into .tools/perf_analyzer/ (idempotent).
#
# How: the binary ships inside the tritonclient 2.50.0
# wheel; it needs libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel, installed
# into a private --target dir) and Debian's libb64-0d (unpacked from its .deb by
# scripts/fetch_deb.sh). Nothing needs root. Run it through scripts/perf_analyzer, which
# sets LD_LIBRARY_PATH. Re-running skips whatever is already in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/perf_analyzer"
TRITONCLIENT_VERSION="2.50.0"
WHEEL_MEMBER="tritonclient-${TRITONCLIENT_VERSION}.data/data/bin/perf_analyzer"

log() { printf '[install_perf_analyzer] %s\n' "$*" >&2; }

if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PIP=("$ROOT/.venv/bin/python" -m pip)
else
    PIP=(python3 -m pip)
fi

install_binary() {
    if [[ -x "$DEST/bin/perf_analyzer" ]]; then
        log "binary already present: $DEST/bin/perf_analyzer"
        return
    fi
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    log "downloading tritonclient==${TRITONCLIENT_VERSION} wheel"
    "${PIP[@]}" download --quiet --no-deps --only-binary=:all: \
        --dest "$tmp" "tritonclient==${TRITONCLIENT_VERSION}"
    local wheel
    wheel="$(ls "$tmp"/tritonclient-"${TRITONCLIENT_VERSION}"-*.whl)"
    mkdir -p "$DEST/bin"
    # The wheel is a zip archive; Python's zipfile avoids depending on `unzip`.
    "${PIP[0]}" - "$wheel" "$WHEEL_MEMBER" "$DEST/bin/perf_analyzer" <<'PY'
import shutil, sys, zipfile
wheel, member, target = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod 0755 "$DEST/bin/perf_analyzer"
    log "installed $DEST/bin/perf_analyzer"
}

install_cudart() {
    if compgen -G "$DEST/cuda/nvidia/cuda_runtime/lib/libcudart.so.12*" >/dev/null; then
        log "libcudart.so.12 already present"
        return
    fi
    log "installing nvidia-cuda-runtime-cu12 into $DEST/cuda"
    "${PIP[@]}" install --quiet --no-deps --target "$DEST/cuda" "nvidia-cuda-runtime-cu12"
}

install_libb64() {
    if compgen -G "$DEST/libb64/usr/lib/*/libb64.so.0d" >/dev/null; then
        log "libb64.so.0d already present"
        return
    fi
    # Unpacked from Debian's package into .tools (no root); scripts/perf_analyzer puts it on LD_LIBRARY_PATH.
    "$ROOT/scripts/fetch_deb.sh" libb64-0d "$DEST/libb64"
}

install_binary
install_cudart
install_libb64

log "checking that it runs:"
# perf_analyzer --help exits non-zero on some versions; judge by its output instead.
help_text="$("$ROOT/scripts/perf_analyzer" --help 2>&1 || true)"
if ! grep -q -- "--concurrency-range" <<<"$help_text"; then
    printf '%s\n' "$help_text" >&2
    log "FAILED: perf_analyzer did not print its usage"
    exit 1
fi
# sed reads to the end (head would close the pipe early: SIGPIPE, and pipefail makes that exit 141).
"$ROOT/scripts/perf_analyzer" --version 2>&1 | sed -n 1p
# This build has no --help option: it prints its usage after "unrecognized option".
printf '%s\n' "$help_text" | sed -n '/^Usage:/,$p' | sed -n 1,12p
log "OK: run it with scripts/perf_analyzer -m MODEL -u 127.0.0.1:PORT -i grpc"
