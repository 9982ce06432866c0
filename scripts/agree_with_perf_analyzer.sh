#!/usr/bin/env bash
# Run perf_analyzer and load_tests on the same scenario, back to back, several times, alternating
# which goes first, and print each one's throughput and p50/p99 (the figures in BENCHMARKS.md).
#
#   scripts/agree_with_perf_analyzer.sh TARGET [MODEL] [CONCURRENCY] [PAIRS] [SECONDS] [OUT_DIR]
#
# perf_analyzer measures 3 windows of SECONDS/3 each (stability check off: on a shared machine
# no window is "stable"); load_tests measures SECONDS after a 2 s warm-up with --no-deadline, because
# perf_analyzer sends its calls without a gRPC deadline (and a deadline costs throughput, see
# BENCHMARKS.md). Extra load_tests arguments go in $LOAD_TESTS_ARGS (e.g. "--processes 2").
# Set DEADLINE=1 to let load_tests send its usual deadline. Needs make tools.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="$1"; MODEL="${2:-matmul16}"; CONCURRENCY="${3:-8}"; PAIRS="${4:-5}"; SECONDS_="${5:-12}"
OUT="${6:-$ROOT/results/agreement}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"
window_ms=$((SECONDS_ * 1000 / 3))

perf_analyzer() {
    "$ROOT/scripts/perf_analyzer" -m "$MODEL" -u "$TARGET" -i grpc --concurrency-range "$CONCURRENCY" \
        --measurement-interval "$window_ms" --stability-percentage 1000 --max-trials 3 > "$OUT/pa$1.txt" 2>&1
    awk '/Throughput:/ {t=$2} /p50 latency/ {p50=$3} /p99 latency/ {p99=$3}
         END {printf "perf_analyzer  %9.1f req/s  p50 %7.3f ms  p99 %7.3f ms\n", t, p50/1000, p99/1000}' "$OUT/pa$1.txt"
}

load_tests() {
    (cd "$ROOT" && "$PYTHON" -m load_tests closed --url "$TARGET" --model "$MODEL" \
        --concurrency "$CONCURRENCY" --duration "$SECONDS_" --warmup 2 --no-progress --json "$OUT/lt$1.json" \
        $([[ -n "${DEADLINE:-}" ]] || echo --no-deadline) ${LOAD_TESTS_ARGS:-} > "$OUT/lt$1.txt")
    "$PYTHON" - "$OUT/lt$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["runs"][0]
print("load_tests     %9.1f req/s  p50 %7.3f ms  p99 %7.3f ms  (generator CPU %.0f%%)"
      % (r["requests_per_s"], r["p50_ms"], r["p99_ms"], r["generator_cpu_pct"]))
PY
}

for i in $(seq 1 "$PAIRS"); do
    echo "pair $i ($(date -u +%H:%M:%S), load average $(cut -d' ' -f1 /proc/loadavg))"
    if (( i % 2 )); then perf_analyzer "$i"; load_tests "$i"; else load_tests "$i"; perf_analyzer "$i"; fi
done
