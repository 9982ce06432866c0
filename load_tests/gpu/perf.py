"""Triton's perf_analyzer (C++) as a second load generator: find it, run one scenario, read its CSV.

A C++ client leaves the cores to the server, so on a many-core GPU machine it
can push harder than the Python harness. It is optional: where it is missing or
does not run, the check says so in its report and carries on.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["PerfResult", "find_perf_analyzer", "run_perf_analyzer"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_MEASURE_S_MIN = 0.5


@dataclass(frozen=True)
class PerfResult:
    """One perf_analyzer run: throughput and client-side latency percentiles (ms)."""

    model: str
    batch: int
    concurrency: int
    requests_per_s: float
    samples_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_ms: float


def find_perf_analyzer() -> tuple[list[str] | None, str]:
    """The command that runs perf_analyzer, and how it was found (or why not)."""
    candidates: list[list[str]] = []
    reason = ""
    if env := os.environ.get("PERF_ANALYZER"):
        candidates.append([env])
    wrapper = REPO_ROOT / "scripts" / "perf_analyzer"
    if (REPO_ROOT / ".tools" / "perf_analyzer" / "bin" / "perf_analyzer").exists():
        candidates.append([str(wrapper)])
    if found := shutil.which("perf_analyzer"):
        candidates.append([found])
    for command in candidates:
        # Builds differ in how they show their usage: tritonclient's prints it for --help; the
        # perf-analyzer 2.60 wheel's refuses --help and -h ("Invalid option") and prints it when run bare.
        for flags in ([], ["--help"]):
            try:
                probe = subprocess.run([*command, *flags], capture_output=True, text=True, timeout=30, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                reason = f"{command[0]}: {exc}"
                break
            if "concurrency-range" in probe.stdout + probe.stderr:
                return command, command[0]
            reason = f"{command[0]} does not run: {(probe.stdout + probe.stderr).strip().splitlines()[-1:]}"
    if not candidates:
        return None, "not installed (scripts/install_perf_analyzer.sh, or the perf-analyzer wheel)"
    return None, reason


def _ms(row: dict[str, str], key: str) -> float:
    try:
        return float(row[key]) / 1000.0
    except (KeyError, ValueError):
        return math.nan


def run_perf_analyzer(
    command: list[str], target: str, model: str, batch: int, concurrency: int, seconds: float, csv_path: pathlib.Path
) -> PerfResult:
    """Run one closed-loop scenario for about ``seconds``; raises RuntimeError with perf_analyzer's words."""
    window_ms = max(int(seconds * 1000 / 3), int(_MEASURE_S_MIN * 1000))
    argv = [
        *command,
        *("-m", model, "-u", target, "-i", "grpc", "-b", str(batch)),
        *("--concurrency-range", str(concurrency), "--measurement-interval", str(window_ms)),
        # Throughput over three windows; "stable" is not asked for, a busy machine is never stable.
        *("--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv_path)),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 4 + 60, check=False)
    if done.returncode != 0 or not csv_path.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"perf_analyzer exited {done.returncode}: {' | '.join(tail)}")
    with csv_path.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    samples = float(row["Inferences/Second"])
    return PerfResult(
        model=model,
        batch=batch,
        concurrency=concurrency,
        requests_per_s=samples / batch,
        samples_per_s=samples,
        p50_ms=_ms(row, "p50 latency"),
        p90_ms=_ms(row, "p90 latency"),
        p99_ms=_ms(row, "p99 latency"),
        server_queue_ms=_ms(row, "Server Queue"),
        server_compute_ms=_ms(row, "Server Compute Infer"),
    )
