#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on a GPU host without network access, in parts small enough to
# carry over one at a time (docs/gpu.md, "A GPU host without network").
#
#   scripts/gpu_bundle.sh [OUT]          # default OUT: .gpu (git-ignored)
#
# Downloads, for the host's Python (PYTHON_VERSION, default 3.12; manylinux x86_64):
#   - onnxruntime-gpu (ORT_GPU, default onnxruntime-gpu==1.31.1, a CUDA 13 build),
#   - perf-analyzer (PERF, default perf-analyzer==2.60.0: Triton's load tool, needs glibc >= 2.38),
#   - infergate's runtime dependencies at their pins (requirements/runtime-cuda.txt), except those the
#     host already has (SKIP, default "onnx grpcio onnxruntime-gpu"),
#   - with CUDA=1, the CUDA runtime and cuDNN wheels too (large; leave them out where the host has them).
# Then tars them into OUT/wheels.tar and splits that into OUT/partNN/wheels.tar.NN of PART_MIB
# (default 60) MiB each. On the host, put every part in one folder and run
#   scripts/gpu_check.sh --wheels FOLDER
# which joins the parts, unpacks them and installs the wheels into a private folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/.gpu}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
ORT_GPU="${ORT_GPU-onnxruntime-gpu==1.31.1}"
PERF="${PERF-perf-analyzer==2.60.0}"
SKIP="${SKIP:-onnx grpcio onnxruntime-gpu}"
PART_MIB="${PART_MIB:-60}"
CUDA="${CUDA:-0}"
CUDA_WHEELS=(nvidia-cuda-runtime~=13.0 nvidia-cublas nvidia-cufft nvidia-curand nvidia-cuda-nvrtc~=13.0 nvidia-cudnn-cu13~=9.0)

log() { printf '[gpu_bundle] %s\n' "$*" >&2; }

wanted=()
[[ -n "$ORT_GPU" ]] && wanted+=("$ORT_GPU")
[[ -n "$PERF" ]] && wanted+=("$PERF")
while IFS= read -r pin; do
    name="${pin%%==*}"
    [[ " $SKIP " == *" $name "* ]] && continue
    # The CUDA libraries' own pins come only with CUDA=1 (below, where the host lacks them).
    [[ "$name" == nvidia-* ]] && ((!CUDA)) && continue
    wanted+=("$pin")
done < <(grep -v '^#' "$ROOT/requirements/runtime-cuda.txt" | sed '/^$/d')
((CUDA)) && wanted+=("${CUDA_WHEELS[@]}")

rm -rf "$OUT/whl" "$OUT"/part[0-9][0-9] "$OUT/wheels.tar"
mkdir -p "$OUT/whl"
log "downloading ${#wanted[@]} wheels for CPython $PYTHON_VERSION into $OUT/whl"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_38_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$OUT/whl" "${wanted[@]}"

tar -C "$OUT/whl" -cf "$OUT/wheels.tar" .
split -b "${PART_MIB}M" -d "$OUT/wheels.tar" "$OUT/wheels.tar."
for part in "$OUT"/wheels.tar.[0-9][0-9]; do
    folder="$OUT/part${part##*.}"
    mkdir -p "$folder"
    mv "$part" "$folder/"
done
rm "$OUT/wheels.tar"
log "$(find "$OUT/whl" -name '*.whl' | wc -l) wheels, $(du -sm "$OUT/whl" | cut -f1) MiB, in parts:"
du -sm "$OUT"/part[0-9][0-9] >&2
