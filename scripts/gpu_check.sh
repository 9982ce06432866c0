#!/usr/bin/env bash
# The GPU check in one go: install what a fresh GPU machine lacks, then measure (docs/gpu.md).
#
#   scripts/gpu_check.sh                      # GPU: installs onnxruntime-gpu if needed, then every phase
#   scripts/gpu_check.sh --wheels DIR         # the same on a machine without network: wheels from DIR
#   scripts/gpu_check.sh --cpu --quick        # no GPU: every phase on the CPU provider, small counts (CI)
#
# Options: --cpu, --quick, --out DIR (default results/gpu-check), --budget SECONDS (of measuring,
# default 400: with the install the whole check stays under 8 minutes), --workers 1,2,4,8,
# --wheels DIR (install offline from DIR: wheels, or the wheels.tar.NN parts scripts/gpu_bundle.sh
# writes), --site DIR (where wheels go, default /tmp/infergate-gpu-site), --no-install.
#
# What it installs (GPU mode only, and only what is missing), into --site, a private folder put first
# on PYTHONPATH so the machine's own packages stay untouched:
#   - with --wheels, the whole bundle, if anything below or infergate's own dependencies are missing;
#   - infergate's runtime dependencies at their pins (requirements/runtime-cuda.txt), if missing;
#   - onnxruntime-gpu, if `import onnxruntime` has no CUDAExecutionProvider;
#   - the CUDA runtime wheels onnxruntime-gpu loads (CUDA 13 build: nvidia-cuda-runtime, -cublas, -cufft,
#     -curand, -cuda-nvrtc, nvidia-cudnn-cu13), if a CUDA session still cannot be created;
#   - perf_analyzer (the perf-analyzer wheel), if neither scripts/perf_analyzer nor `perf_analyzer` runs.
# The NVIDIA driver must be there already (nvidia-smi). The libraries of every nvidia
# wheel found go on LD_LIBRARY_PATH, which onnxruntime's CUDA provider needs at load time.
# Then: python -m load_tests.gpu, which writes gpu_check.json and gpu_check.md into --out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORT_GPU="onnxruntime-gpu==1.31.1"
CUDA_WHEELS=(nvidia-cuda-runtime~=13.0 nvidia-cublas nvidia-cufft nvidia-curand nvidia-cuda-nvrtc~=13.0 nvidia-cudnn-cu13~=9.0)
PERF_WHEEL="perf-analyzer==2.60.0"
CPU=0
INSTALL=1
WHEELS=""
SITE="${GPU_CHECK_SITE:-/tmp/infergate-gpu-site}"
ARGS=()

log() { printf '[gpu_check] %s\n' "$*" >&2; }

while (($#)); do
    case "$1" in
        --cpu) CPU=1; ARGS+=(--cpu) ;;
        --quick) ARGS+=(--quick) ;;
        --no-install) INSTALL=0 ;;
        --wheels) WHEELS="$2"; shift ;;
        --site) SITE="$2"; shift ;;
        --out | --budget | --workers) ARGS+=("$1" "$2"); shift ;;
        -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) log "unknown option: $1"; exit 2 ;;
    esac
    shift
done

GPU_CHECK_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"  # as given; use_site prepends the wheels' libraries to it
if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"
else PYTHON="$(command -v python3)"; fi

# The repository's own packages, whether or not they are pip-installed here (the image, a bare GPU machine).
export PYTHONPATH="$ROOT:$ROOT/server:$ROOT/clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

pip_install() {  # pip_install PACKAGE...: into $SITE, from PyPI or from $WHEELS
    local source=()
    [[ -n "$WHEELS" ]] && source=(--no-index --find-links "$WHEELS/whl" --find-links "$WHEELS")
    log "installing into $SITE: $*"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --upgrade \
        --target "$SITE" "${source[@]}" "$@"
}

unpack_wheels() {  # the parts scripts/gpu_bundle.sh splits its tar into, joined and unpacked once
    if compgen -G "$WHEELS/wheels.tar.[0-9][0-9]" >/dev/null && [[ ! -d "$WHEELS/whl" ]]; then
        local parts=("$WHEELS"/wheels.tar.[0-9][0-9])
        log "joining ${#parts[@]} parts in $WHEELS"
        mkdir -p "$WHEELS/whl"
        cat "${parts[@]}" | tar -x -C "$WHEELS/whl"
    fi
}

nvidia_libraries() {  # every lib folder of the nvidia wheels importable with $SITE first
    "$PYTHON" - <<'PY'
import glob, os, sys
seen = []
for entry in sys.path:
    for lib in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib"))):
        if lib not in seen:
            seen.append(lib)
print(":".join(seen))
PY
}

use_site() {  # $SITE first on PYTHONPATH (once), and the nvidia wheels' libraries on LD_LIBRARY_PATH
    [[ ":$PYTHONPATH:" == *":$SITE:"* ]] || export PYTHONPATH="$SITE:$PYTHONPATH"
    local libs
    libs="$(nvidia_libraries)"
    [[ -n "$libs" ]] && export LD_LIBRARY_PATH="$libs${GPU_CHECK_LD_LIBRARY_PATH:+:$GPU_CHECK_LD_LIBRARY_PATH}"
    return 0
}

cuda_session() {  # prints "ok" when onnxruntime builds a session that really runs on CUDA, else why not
    "$PYTHON" - <<'PY' 2>&1 | tail -n 1
import onnx, onnxruntime as ort
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
try:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    print("ok" if session.get_providers()[0] == "CUDAExecutionProvider" else f"fell back to {session.get_providers()}")
except Exception as exc:
    print(f"no CUDA session: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}")
PY
}

has_cuda_provider() {
    "$PYTHON" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'
}

has_dependencies() {  # infergate's own runtime dependencies (a bare GPU machine may lack them)
    "$PYTHON" -c 'import grpc, grpc_health, grpc_reflection, numpy, onnx, pydantic, yaml, jwt, prometheus_client
import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc' 2>/dev/null
}

install_gpu() {
    mkdir -p "$SITE"
    if [[ -n "$WHEELS" ]]; then
        unpack_wheels
        use_site
        if ! has_dependencies || ! has_cuda_provider; then
            pip_install "$WHEELS"/whl/*.whl  # the bundle holds exactly what this host lacked
        fi
    elif ! has_dependencies; then
        pip_install -r "$ROOT/requirements/runtime-cuda.txt" || log "could not install infergate's dependencies"
    fi
    use_site
    if [[ "$(cuda_session)" == ok ]]; then
        log "onnxruntime runs on CUDA already"
    else
        if ! has_cuda_provider; then
            pip_install "$ORT_GPU" || log "could not install $ORT_GPU"
        fi
        use_site
        local state
        state="$(cuda_session)"
        if [[ "$state" != ok ]]; then
            log "$state: adding the CUDA runtime wheels"
            pip_install "${CUDA_WHEELS[@]}" || log "could not install the CUDA runtime wheels"
            use_site
            state="$(cuda_session)"
            [[ "$state" == ok ]] || log "still $state: the check goes on and reports what fails"
        fi
    fi
    if [[ -x "$SITE/perf_analyzer/bin/perf_analyzer" && -z "${PERF_ANALYZER:-}" ]]; then
        export PERF_ANALYZER="$SITE/perf_analyzer/bin/perf_analyzer"
    fi
    if ! "$PYTHON" -c 'import sys; from load_tests.gpu.perf import find_perf_analyzer as f; sys.exit(f()[0] is None)' \
        2>/dev/null; then
        pip_install "$PERF_WHEEL" || log "perf_analyzer not installed: the load harness runs alone"
        [[ -x "$SITE/perf_analyzer/bin/perf_analyzer" ]] && export PERF_ANALYZER="$SITE/perf_analyzer/bin/perf_analyzer"
    fi
    return 0
}

started=$(date +%s)
if ((CPU == 0 && INSTALL == 1)); then
    install_gpu
elif ((CPU == 0)); then
    use_site
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
log "installing took $(($(date +%s) - started)) s; measuring with $PYTHON"
exec "$PYTHON" -m load_tests.gpu "${ARGS[@]}"
