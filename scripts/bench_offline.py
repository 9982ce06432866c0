"""Offline scoring speed and memory: ``infergate batch`` against in-process onnxruntime on the demo mlp.

    .venv/bin/python scripts/bench_offline.py --workdir /tmp/bench-offline --out results/offline.json

1. Sweep: onnxruntime in this process, the mlp's session options from its
   config.yaml, one session, random inputs already in memory, at each of
   ``--batch-sizes``; the best samples/s picks the batch size.
2. For each of ``--sizes-mb`` (default 100 and 1000): a random ``.npy`` input of
   that size (2 KiB a row), scored by ``infergate batch`` as a subprocess at
   that batch size into ``--output-format`` (npz by default), ``--rounds``
   times. Its samples/s is the command's own scoring time and its peak RSS the
   process's own ``VmHWM``, both from its ``--summary`` (loading the model not
   counted in the time; counted in the memory).
3. Each of those runs is bracketed: onnxruntime alone at the same batch size
   over the same number of rows just before and just after it. The run's ratio
   is its samples/s over the mean of its two brackets, so a machine that speeds
   up or slows down between runs moves both sides; the sweep's best, a maximum
   over short noisy runs, is reported beside it.
4. Prints the table and the two checks: the median ratio of every input size
   at least 0.9, and peak RSS within 20% from the smallest to the largest input.

Needs free disk of about twice the largest input (input and output), and memory
for ``--sweep-rows`` rows. Run it on a quiet machine: the numbers are only as
good as that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from infergate.demo import write_demo_repository
from infergate.models.config import ModelConfig, load_model_config

ROW_BYTES = 512 * 4  # the mlp's input row: 512 float32
MODEL = "mlp"


def session(path: Path, config: ModelConfig) -> ort.InferenceSession:
    """One session with the options infergate gives this model (its config.yaml)."""
    opts = config.session_options
    options = ort.SessionOptions()
    options.intra_op_num_threads = opts.intra_op_num_threads
    options.inter_op_num_threads = opts.inter_op_num_threads
    spin = "1" if opts.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _timed(runner: ort.InferenceSession, data: np.ndarray, batch_size: int, rows: int) -> float:
    """Samples/s of ``rows`` rows in batches of ``batch_size``, cycling through ``data``, after one warm-up run."""
    runner.run(None, {"x": data[:batch_size]})
    per_pass = len(data) - len(data) % batch_size
    started = time.perf_counter()
    for lo in range(0, rows, batch_size):
        at = lo % per_pass
        runner.run(None, {"x": data[at : at + min(batch_size, rows - lo)]})
    return rows / (time.perf_counter() - started)


def sweep(runner: ort.InferenceSession, data: np.ndarray, batch_sizes: list[int]) -> dict[str, Any]:
    """Samples/s of onnxruntime alone at each batch size over ``len(data)`` rows."""
    results = {}
    for size in batch_sizes:
        results[size] = _timed(runner, data, size, len(data))
        print(f"onnxruntime batch {size:5d}: {results[size]:10,.0f} samples/s", flush=True)
    best = max(results, key=lambda s: results[s])
    return {"samples_per_second": results, "best_batch_size": best, "best_samples_per_second": results[best]}


def write_input(path: Path, megabytes: int) -> int:
    """A random .npy of about ``megabytes`` MiB written block by block (this script stays small too)."""
    rows = megabytes * (1 << 20) // ROW_BYTES
    rng = np.random.default_rng(megabytes)
    with path.open("wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": (rows, 512)})
        for lo in range(0, rows, 8192):
            file.write(rng.random((min(8192, rows - lo), 512), dtype=np.float32).tobytes())
    return rows


def run_batch(repository: Path, source: Path, output: Path, batch_size: int) -> dict[str, Any]:
    """One ``infergate batch`` process: its summary and its own peak RSS."""
    summary = output.with_suffix(".summary.json")
    command = [
        sys.executable, "-m", "infergate", "batch", "--model-repository", str(repository), "--model", MODEL,
        "--input", str(source), "--output", str(output), "--batch-size", str(batch_size), "--summary", str(summary),
    ]  # fmt: skip
    log = output.with_suffix(".log")
    started = time.perf_counter()
    with log.open("w") as stderr:
        done = subprocess.run(command, stderr=stderr, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"infergate batch failed:\n{log.read_text()}")
    body = json.loads(summary.read_text())
    return {
        "rows": body["rows"],
        "scoring_seconds": body["seconds"],
        "samples_per_second": body["rows_per_second"],
        "wall_seconds": wall,
        # The command's own VmHWM: wait4's ru_maxrss would also count this script's memory before the exec.
        "peak_rss_mb": body["peak_rss_mb"],
    }


def bracketed(
    runner: ort.InferenceSession, data: np.ndarray, repository: Path, source: Path, output: Path, batch_size: int
) -> dict[str, Any]:
    """One ``infergate batch`` run between two onnxruntime runs over the same rows."""
    rows = np.load(source, mmap_mode="r").shape[0]
    before = _timed(runner, data, batch_size, rows)
    output.unlink(missing_ok=True)
    run = run_batch(repository, source, output, batch_size)
    output.unlink()
    after = _timed(runner, data, batch_size, rows)
    onnxruntime = (before + after) / 2
    return run | {
        "onnxruntime_before": before,
        "onnxruntime_after": after,
        "ratio": run["samples_per_second"] / onnxruntime,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("results/bench-offline"))
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 512])
    parser.add_argument("--sweep-rows", type=int, default=20_000, help="rows per batch size in the sweep")
    parser.add_argument("--rounds", type=int, default=3, help="bracketed runs per input size")
    parser.add_argument("--batch-size", type=int, help="infergate's batch size (default: the sweep's best)")
    parser.add_argument("--output-format", choices=["npz", "parquet", "jsonl"], default="npz")
    args = parser.parse_args()

    repository = args.workdir / "models"
    write_demo_repository(repository)
    runner = session(repository / MODEL / "1" / "model.onnx", load_model_config(repository / MODEL / "config.yaml"))
    data = np.random.default_rng(0).random((args.sweep_rows, 512), dtype=np.float32)
    base = sweep(runner, data, args.batch_sizes)
    batch_size = args.batch_size or base["best_batch_size"]
    runs: dict[int, list[dict[str, Any]]] = {}
    for megabytes in args.sizes_mb:
        source = args.workdir / f"input-{megabytes}MB.npy"
        if not source.exists():
            write_input(source, megabytes)
        output = args.workdir / f"output-{megabytes}MB.{args.output_format}"
        runs[megabytes] = []
        for _ in range(args.rounds):
            runs[megabytes].append(bracketed(runner, data, repository, source, output, batch_size))
            print(f"infergate batch {megabytes:5d} MB: {json.dumps(runs[megabytes][-1])}", flush=True)

    ratios = {mb: statistics.median(r["ratio"] for r in done) for mb, done in runs.items()}
    peak = {mb: max(r["peak_rss_mb"] for r in done) for mb, done in runs.items()}
    rss_growth = peak[max(peak)] / peak[min(peak)] - 1
    best = base["best_samples_per_second"]
    against_sweep = min(statistics.median(r["samples_per_second"] for r in done) for done in runs.values()) / best
    results = {
        "sweep": base,
        "infergate_batch_size": batch_size,
        "runs_by_input_mb": runs,
        "median_ratio_by_input_mb": ratios,
        "ratio_to_sweep_best": against_sweep,
        "peak_rss_mb_by_input_mb": peak,
        "rss_growth": rss_growth,
        "checks": {
            "throughput_at_least_0.9x": min(ratios.values()) >= 0.9,
            "rss_flat_within_20pct": abs(rss_growth) <= 0.2,
        },
    }
    shown = ", ".join(f"{mb} MB {ratio:.2f}x" for mb, ratio in ratios.items())
    print(
        f"\nthroughput at batch {batch_size}, median of {args.rounds} bracketed runs: {shown} onnxruntime's; "
        f"{against_sweep:.2f}x the sweep's best ({best:,.0f} samples/s at batch {base['best_batch_size']})"
    )
    print(f"peak RSS {peak[min(peak)]:.0f} MB -> {peak[max(peak)]:.0f} MB ({rss_growth:+.0%})")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
