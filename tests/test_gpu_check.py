"""scripts/gpu_check.sh keeps working on machines without a GPU.

On a GPU machine the script installs onnxruntime-gpu and measures the CUDA
path (docs/gpu.md). CI has no GPU, so it runs the script with ``--cpu
--quick``: every phase (outputs against the CPU, in-process onnxruntime, the
load scenarios, ``--workers``, the execution variants) on the CPU provider,
with small counts, and checks the report it writes. The GPU itself (CUDA
sessions, CUDA graphs, nvidia-smi) is what this cannot cover.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HANG_GUARD_S = 150  # a quick run takes 20 to 30 s; this only stops a hung one (its own budget is 120 s)
pytestmark = pytest.mark.timeout(HANG_GUARD_S + 30)


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [str(SCRIPT), "--cpu", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )
    return done, out


@pytest.fixture(scope="module")
def report(check: tuple[subprocess.CompletedProcess[str], Path]) -> dict[str, Any]:
    done, out = check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result: dict[str, Any] = json.loads((out / "gpu_check.json").read_text())
    return result


def test_the_check_says_where_it_ran(report: dict[str, Any]) -> None:
    assert (report["mode"], report["quick"]) == ("cpu", True)
    assert report["environment"]["device_provider"] == "CPUExecutionProvider"
    assert report["failures"] == []
    assert set(report["phases_s"]) == {"agreement", "compute", "scenarios", "workers", "variants"}


def test_every_demo_model_matches_the_cpu_under_every_variant(report: dict[str, Any]) -> None:
    from infergate.demo import DEMO_MODEL_NAMES

    seen = {(a["variant"], a["model"]) for a in report["agreement"]}
    assert seen == {(v, m) for v in ("cpu_bound", "cpu", "cuda_fallback") for m in DEMO_MODEL_NAMES}
    assert all(a["ok"] and a["requests"] > 0 for a in report["agreement"]), report["agreement"]
    executions = {(a["variant"], a["model"]): a["execution"] for a in report["agreement"]}
    assert executions["cpu_bound", "mlp"] == "io binding on cpu"  # the binding code ran
    assert executions["cpu", "mlp"] == "session.run"
    assert executions["cpu_bound", "multi_io"] == "session.run"  # BYTES tensors cannot be bound


def test_the_load_runs_served_requests_with_both_tools_where_perf_analyzer_is_installed(
    report: dict[str, Any],
) -> None:
    runs = report["scenarios"]
    assert {(r["model"], r["batch"]) for r in runs} == {("matmul16", 1), ("mlp", 8)}
    assert all(r["requests_per_s"] > 0 and r["errors"] == 0 and not r["error"] for r in runs), runs
    tools = {r["tool"] for r in runs}
    if report["environment"]["perf_analyzer"].startswith("not installed"):
        assert tools == {"load_tests"}
    else:
        assert tools == {"load_tests", "perf_analyzer"}
    assert report["variants"] and all(v["requests_per_s"] > 0 for v in report["variants"])


def test_workers_report_their_memory_and_batches(report: dict[str, Any]) -> None:
    (two,) = report["workers"]
    assert two["workers"] == 2 and not two["error"]
    assert len(two["memory"]) == 2
    assert all(m["rss_mib"] > 0 and m["gpu_mib"] is None for m in two["memory"])  # no nvidia-smi here
    assert all(m["cpu_pct"] is not None and m["cpu_pct"] >= 0 for m in two["memory"])
    assert 1 <= len(two["batches"]) <= 2
    assert all(set(b["averages"]) == {"matmul16", "mlp"} for b in two["batches"])
    assert all(r["requests_per_s"] > 0 for r in two["runs"])


def test_the_markdown_has_every_table_and_the_targets(
    check: tuple[subprocess.CompletedProcess[str], Path], report: dict[str, Any]
) -> None:
    _, out = check
    text = (out / "gpu_check.md").read_text()
    for title in ("## Targets", "## Outputs against the CPU", "## In-process onnxruntime", "## Scenarios, one worker"):
        assert title in text
    assert "## --workers N" in text and "## Execution variants, one worker" in text
    assert [t["key"] for t in report["targets"]] == ["gpu-a", "gpu-b", "gpu-c"]
    assert report["targets"][2]["met"] is True  # every output matched
