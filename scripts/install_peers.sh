#!/usr/bin/env bash
# Install the peer servers that `python -m load_tests suite --peers` runs beside infergate,
# each into its own virtual environment under .tools/peers/<name>/ (idempotent).
#
#   scripts/install_peers.sh                 # all three
#   scripts/install_peers.sh triton kserve   # only these
#
# Peers (see BENCHMARKS.md, "Peers"):
#   triton    nvidia-pytriton (bundles tritonserver and its python_backend stub); needs numpy<2
#   kserve    kserve's model server
#   mlserver  Seldon MLServer; uvloop held at 0.21.0 (its parallel workers break with newer)
# Each also gets onnxruntime, which the peer's model code in load_tests/peers/ runs: the version
# infergate's image pins (requirements/runtime-cpu.txt), so every server runs the same kernels.
# Not part of `make test`: together they are over a gigabyte and take minutes to install.
# A venv counts as installed once its .installed marker exists; delete the folder to reinstall.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/peers"
PYTHON="${PYTHON:-python3}"
ONNXRUNTIME="$(grep -E '^onnxruntime==' "$ROOT/requirements/runtime-cpu.txt")"

log() { printf '[install_peers] %s\n' "$*" >&2; }

requirements() {
    case "$1" in
        triton) echo "nvidia-pytriton==0.7.0 numpy<2 $ONNXRUNTIME" ;;
        kserve) echo "kserve==0.21.0 $ONNXRUNTIME" ;;
        mlserver) echo "mlserver==1.7.1 uvloop==0.21.0 $ONNXRUNTIME" ;;
        *) return 1 ;;
    esac
}

install_peer() {
    local name="$1" venv="$DEST/$1" packages
    if ! packages="$(requirements "$name")"; then
        log "unknown peer '$name' (known: triton kserve mlserver)"
        exit 2
    fi
    if [[ -f "$venv/.installed" ]]; then
        log "$name already installed in $venv"
        return
    fi
    log "$name: creating $venv and installing $packages"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086  # the package list is split into words on purpose
    "$venv/bin/python" -m pip install --quiet $packages
    "$venv/bin/python" -m pip freeze >"$venv/versions.txt"
    touch "$venv/.installed"
    log "$name: installed $(grep -iE '^(nvidia-pytriton|kserve|mlserver|onnxruntime|numpy)==' "$venv/versions.txt" | tr '\n' ' ')(all in $venv/versions.txt)"
}

peers=("$@")
if [[ ${#peers[@]} -eq 0 ]]; then
    peers=(triton kserve mlserver)
fi
for peer in "${peers[@]}"; do
    install_peer "$peer"
done
