#!/usr/bin/env bash
# What an ensemble step costs: the demo's matmul16 against the README's ensemble `twice` (matmul16
# applied twice, in one call), on one server, each load run in turn for ROUNDS rounds in the same run.
#
# Usage: scripts/bench_ensemble.sh [WORKDIR] [ROUNDS] [SECONDS]   (from the repository root, after make test or make demo)
# Prints each round's req/s and p50/p99, and the medians as a markdown table.
set -euo pipefail
WORK=${1:-/tmp/bench-ensemble}
ROUNDS=${2:-5}
SECONDS_EACH=${3:-5}
PORT=${PORT:-8131}
PY=${PY:-.venv/bin/python}

rm -rf "$WORK" && mkdir -p "$WORK/json"
"$PY" - "$WORK/models" <<'PY'
import sys
from pathlib import Path

from infergate.demo import write_demo_repository

root = Path(sys.argv[1])
write_demo_repository(root)
readme = Path("README.md").read_text(encoding="utf-8")
section = readme[readme.index("### Ensembles: pipelines of models") :]
config = section[section.index("```yaml\n") + len("```yaml\n") :]
(root / "twice" / "1").mkdir(parents=True)
(root / "twice" / "config.yaml").write_text(config[: config.index("```")])
PY

"$PY" -m infergate serve --model-repository "$WORK/models" --model-control-mode explicit \
    --load-model matmul16 --load-model twice --port "$PORT" > "$WORK/server.out" 2> "$WORK/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 120); do grep -q "listening" "$WORK/server.out" 2>/dev/null && break; sleep 0.5; done

for round in $(seq "$ROUNDS"); do
  for concurrency in 1 64; do
    for model in matmul16 twice; do
      "$PY" -m load_tests closed --url "127.0.0.1:$PORT" --model "$model" --concurrency "$concurrency" \
          --duration "$SECONDS_EACH" --warmup 1 --no-progress --json "$WORK/json/$model-c$concurrency-r$round.json" > /dev/null
    done
  done
done

"$PY" - "$WORK/json" <<'PY'
import json
import statistics
import sys
from pathlib import Path

runs: dict[tuple[str, int], list[dict]] = {}
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    model, concurrency, _ = path.stem.rsplit("-", 2)
    runs.setdefault((model, int(concurrency[1:])), []).extend(json.loads(path.read_text())["runs"])
print("| load | model | req/s per round | median req/s | median p50 ms | median p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
for (model, concurrency), results in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0])):
    rates = [r["requests_per_s"] for r in results]
    errors = sum(sum(r["errors"].values()) for r in results)
    print(
        f"| {concurrency} in flight | `{model}` | {', '.join(f'{x:,.0f}' for x in rates)} | "
        f"{statistics.median(rates):,.0f} | {statistics.median(r['p50_ms'] for r in results):.3f} | "
        f"{statistics.median(r['p99_ms'] for r in results):.2f} | {errors} |"
    )
PY
