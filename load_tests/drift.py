"""What drift monitoring costs the caller: the same load with ``sample_fraction`` off, 0, 0.1 and 1.0.

    python -m load_tests drift-overhead [--model matmul16] [--concurrency 64] [--rounds 3] [--out DIR]

Each variant serves the demo model from its own repository: ``off`` has no
``monitoring:`` block, the others ``monitoring.drift`` with that
``sample_fraction`` and a reference profile written by ``infergate profile``
from a standard-normal sample (the distribution the generator sends, so the
scores stay low and the monitor does its steady-state work). Every round
starts a fresh server per variant, keeps them all up and loads each in turn,
``--slices`` times with the order rotating (``interleave``), so drift on a
shared machine hits them alike; throughput (also paired slot by slot, with
its 95% interval over rounds: ``ratios``), latency and the server's CPU per request are
reported side by side, with what the monitor has sampled and dropped so far
(from DriftStatus; "-" where the server does not answer it).

The overhead of ``sample_fraction: 0`` is the per-request check alone; 0.1 is
the recommended setting; 1.0 hands every request to the accumulator.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate.demo import write_demo_repository
from infergate.monitoring.profiling import profile_version

from .interleave import OverheadRun, SlotFigures, Variant, measured
from .report import LoadResult, format_table, parse_variants
from .suite import REPO_ROOT, environment

__all__ = ["VARIANTS", "DriftOverheadConfig", "DriftOverheadReport", "build_repositories", "run_drift_overhead"]

# Variant name -> sample_fraction (None: no monitoring block at all).
VARIANTS: dict[str, float | None] = {"off": None, "0": 0.0, "0.1": 0.1, "1.0": 1.0}
SAMPLE_ROWS = 4000


@dataclass(frozen=True)
class DriftOverheadConfig(OverheadRun):
    window: int = 2000
    variants: tuple[str, ...] = tuple(VARIANTS)


@dataclass
class DriftOverheadReport(SlotFigures):
    config: DriftOverheadConfig
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # server CPU µs per request, per slot
    client_cpu_us: dict[str, list[float]] = field(default_factory=dict)  # the client's, per slot
    monitor: dict[str, list[str]] = field(default_factory=dict)  # "sampled/dropped" so far, per slot

    def table(self) -> str:
        base = statistics.fmean(r.requests_per_s for r in self.runs["off"]) if self.runs.get("off") else float("nan")
        cpu_base = statistics.fmean(self.cpu_us["off"]) if self.cpu_us.get("off") else float("nan")
        ratios = self.paired_rates()
        rows = []
        for variant, runs in self.runs.items():
            mean = statistics.fmean(r.requests_per_s for r in runs)
            cpu = statistics.fmean(self.cpu_us[variant])
            rows.append([
                variant, f"{mean:,.0f}", " / ".join(f"{r.requests_per_s:,.0f}" for r in runs), f"{mean / base:.3f}",
                str(ratios[variant]) if variant in ratios else "-",
                f"{statistics.fmean(r.p50_ms for r in runs):.2f}", f"{statistics.fmean(r.p99_ms for r in runs):.2f}",
                f"{cpu:.0f}", f"{cpu / cpu_base:.3f}", " ".join(self.monitor[variant]),
            ])  # fmt: skip
        headers = ["sample_fraction", "mean req/s", "per slot", "÷ off", "paired ÷ off", "p50 ms", "p99 ms",
                   "server CPU µs/req", "÷ off", "sampled/dropped so far, per slot"]  # fmt: skip
        return format_table(headers, ["<", ">", ">", ">", ">", ">", ">", ">", ">", "<"], rows) + self.config.pinning()


def build_repositories(
    root: pathlib.Path, model: str, window: int, variants: tuple[str, ...]
) -> dict[str, pathlib.Path]:
    """One repository per variant holding the demo ``model``; monitored ones get their block and profile."""
    demo = root / "demo"
    write_demo_repository(demo)
    sample = root / "sample.npy"
    width = _width(demo / model)
    np.save(sample, np.random.default_rng(0).standard_normal((SAMPLE_ROWS, width)).astype(np.float32))
    out: dict[str, pathlib.Path] = {}
    for variant in variants:
        repo = root / f"variant-{variant}"
        shutil.copytree(demo / model, repo / model)
        fraction = VARIANTS[variant]
        if fraction is not None:
            with (repo / model / "config.yaml").open("a", encoding="utf-8") as config:
                config.write(f"monitoring:\n  drift: {{sample_fraction: {fraction}, window: {window}}}\n")
            profile_version(repo, model, 1, sample, progress=False)
        out[variant] = repo
    return out


def _width(model_dir: pathlib.Path) -> int:
    """The last dimension of the model's single input (the demo models the harness loads are [batch, N])."""
    import onnx

    graph = onnx.load(str(model_dir / "1" / "model.onnx"), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(graph.input) != 1 or len(dims) != 2:
        raise ValueError(f"{model_dir.name}: drift-overhead needs a model with one [batch, N] input")
    return int(dims[1].dim_value)


def run_drift_overhead(config: DriftOverheadConfig) -> DriftOverheadReport:
    """Every variant in every slot of every round (see ``interleave``); writes drift-overhead.json and .md."""
    report = DriftOverheadReport(config, {v: [] for v in config.variants}, {v: [] for v in config.variants},
                                 monitor={v: [] for v in config.variants})  # fmt: skip
    config.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="drift-overhead-") as tmp:
        repositories = build_repositories(pathlib.Path(tmp), config.model, config.window, config.variants)
        serve = (sys.executable, "-m", "infergate", "serve", "--model-repository")
        variants = [Variant(name, (*serve, str(repositories[name]))) for name in config.variants]
        for slot, sample in measured(variants, config, REPO_ROOT, "sample_fraction {}".format):
            report.add(slot, sample)
            monitored = VARIANTS[slot.variant.name] is not None
            report.monitor[slot.variant.name].append(_monitor_counters(slot.target, config.model) if monitored else "-")
    _write(report)
    return report


def _monitor_counters(target: str, model: str) -> str:
    """``sampled/dropped`` from DriftStatus, or "-" when the server does not answer it."""
    try:
        with grpc.insecure_channel(target) as channel:
            stub = apb_grpc.InferGateAdminStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.DriftStatus(apb.DriftStatusRequest(name=model), timeout=10)
    except grpc.RpcError:
        return "-"
    return "/".join(f"{m.sampled}/{m.dropped}" for m in reply.models) or "-"


def _write(report: DriftOverheadReport) -> None:
    data = {
        "environment": environment(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: str(v) for k, v in vars(report.config).items()},
        **report.figures_json(),
        "monitor_sampled_dropped": report.monitor,
        "paired_ratio_to_off": {v: vars(r) for v, r in report.paired_rates().items()},
    }
    (report.config.out / "drift-overhead.json").write_text(json.dumps(data, indent=2, default=str))
    (report.config.out / "drift-overhead.md").write_text(report.table() + "\n")


def variants(text: str) -> tuple[str, ...]:
    """``--variants``: a comma list of :data:`VARIANTS`."""
    return parse_variants(text, VARIANTS)
