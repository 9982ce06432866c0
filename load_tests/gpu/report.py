"""The GPU check's report: the targets it judges, ``gpu_check.json`` and ``gpu_check.md``."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..compute import ComputeResult
from ..report import markdown_table, to_jsonable, write_json
from ..suite import TargetCheck
from .agreement import Agreement
from .phases import RunRecord, WorkerRecord

__all__ = ["CheckReport", "evaluate_targets", "render_markdown", "write_report"]


@dataclass
class CheckReport:
    """Everything one check measured, and what it could not do."""

    mode: str  # gpu or cpu
    quick: bool
    environment: dict[str, str]
    budget_s: float
    elapsed_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=dict)
    agreement: list[Agreement] = field(default_factory=list)
    compute: list[ComputeResult] = field(default_factory=list)
    scenarios: list[RunRecord] = field(default_factory=list)
    variants: list[RunRecord] = field(default_factory=list)
    workers: list[WorkerRecord] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _worker_rps(workers: Sequence[WorkerRecord], n: int, model: str) -> float:
    for record in workers:
        if record.workers == n:
            for run in record.runs:
                if run.model == model and not run.error:
                    return run.requests_per_s
    return math.nan


def evaluate_targets(report: CheckReport, device_provider: str) -> list[TargetCheck]:
    """The issue's two figures (on a GPU run they decide; on a CPU run they only show the check works)."""
    in_process = max(
        (
            c.samples_per_s
            for c in report.compute
            if c.model == "mlp" and c.batch == 64 and c.provider == device_provider
        ),
        default=math.nan,
    )
    served = max(
        (r.samples_per_s for w in report.workers for r in w.runs if r.model == "mlp" and r.batch == 64 and not r.error),
        default=math.nan,
    )
    one = _worker_rps(report.workers, 1, "matmul16")
    four = _worker_rps(report.workers, 4, "matmul16")
    return [
        TargetCheck(
            "gpu-a",
            "mlp batch 64 through the server (best --workers) ÷ in-process onnxruntime at batch 64",
            _ratio(served, in_process),
            0.5,
            ">=",
        ),
        TargetCheck("gpu-b", "matmul16 req/s: --workers 4 ÷ (4 x --workers 1)", _ratio(four, 4 * one), 0.7, ">="),
        TargetCheck(
            "gpu-c",
            "models whose outputs match the CPU's, ÷ models checked",
            _ratio(sum(a.ok for a in report.agreement), len(report.agreement)),
            1.0,
            ">=",
        ),
    ]


def write_report(report: CheckReport, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write gpu_check.json (every figure) and gpu_check.md (the tables); returns both paths."""
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    payload: dict[str, Any] = {
        **{k: v for k, v in vars(report).items() if k != "targets"},
        "targets": [{**to_jsonable(t), "met": t.met} for t in report.targets],
    }
    write_json(json_path, payload)
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path


def _f(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _run_rows(runs: Sequence[RunRecord]) -> list[list[str]]:
    return [
        [
            r.tool,
            r.variant,
            r.model,
            str(r.batch),
            str(r.concurrency),
            str(r.processes),
            _f(r.requests_per_s),
            _f(r.samples_per_s),
            _f(r.p50_ms, 2),
            _f(r.p99_ms, 2),
            _f(r.gpu.util_mean_pct),
            r.error[:80] or str(r.errors),
        ]
        for r in runs
    ]


_RUN_HEADERS = ["tool", "variant", "model", "batch", "in flight", "clients", "req/s", "samples/s"]
_RUN_HEADERS += ["p50 ms", "p99 ms", "GPU util %", "errors"]


def _worker_rows(workers: Sequence[WorkerRecord]) -> list[list[str]]:
    rows = []
    for w in workers:
        gpu = [m.gpu_mib for m in w.memory if m.gpu_mib is not None]
        rss = [m.rss_mib for m in w.memory if m.rss_mib is not None]
        busy = [m.cpu_pct for m in w.memory if m.cpu_pct is not None]
        for r in w.runs or [None]:  # type: ignore[list-item]
            batches = [(b.worker, b.averages.get(r.model, math.nan)) for b in w.batches] if r is not None else []
            rows.append(
                [
                    str(w.workers),
                    str(w.client_processes),
                    r.model if r else "-",
                    str(r.batch) if r else "-",
                    str(r.concurrency) if r else "-",
                    _f(r.requests_per_s) if r else "-",
                    _f(r.samples_per_s) if r else "-",
                    _f(r.p99_ms, 2) if r else "-",
                    " / ".join(f"{who} {_f(avg, 1)}" if who != "?" else _f(avg, 1) for who, avg in batches) or "-",
                    " / ".join(_f(g) for g in gpu) or "-",
                    _f(r.gpu.memory_used_max_mib) if r else "-",
                    " / ".join(_f(m) for m in rss) or "-",
                    " / ".join(_f(c) for c in busy) or "-",
                    _f(r.gpu.util_mean_pct) if r else "-",
                    (w.error or (r.error if r else ""))[:80],
                ]
            )
    return rows


_WORKER_HEADERS = ["workers", "clients", "model", "batch", "in flight", "req/s", "samples/s", "p99 ms"]
_WORKER_HEADERS += ["avg batch per worker", "GPU MiB per worker", "GPU MiB in use (all)", "RSS MiB per worker"]
_WORKER_HEADERS += ["CPU % per worker (all runs)"]
_WORKER_HEADERS += ["GPU util %", "error"]


def _sections(report: CheckReport) -> list[tuple[str, list[str], list[list[str]]]]:
    agreement = [
        [
            a.variant,
            a.model,
            a.provider,
            a.execution,
            str(a.requests),
            f"{a.max_abs_error:.2e}",
            f"{a.max_rel_error:.2e}",
            "yes" if a.ok else "**no**",
            a.error[:80],
        ]
        for a in report.agreement
    ]
    compute = [
        [c.model, c.provider, str(c.batch), _f(c.samples_per_s), _f(c.calls_per_s), _f(c.p50_ms, 3)]
        for c in report.compute
    ]
    targets = [
        [t.key, t.description, _f(t.value, 2), f"{t.op} {t.target:g}", "yes" if t.met else "**no**"]
        for t in report.targets
    ]
    return [
        ("Targets", ["", "figure", "value", "target", "met"], targets),
        (
            "Outputs against the CPU",
            [
                "variant",
                "model",
                "provider",
                "execution",
                "requests",
                "max abs err",
                "max err / max abs out",
                "ok",
                "error",
            ],
            agreement,
        ),
        (
            "In-process onnxruntime (numpy in and out)",
            ["model", "provider", "batch", "samples/s", "calls/s", "p50 ms"],
            compute,
        ),
        ("Scenarios, one worker", _RUN_HEADERS, _run_rows(report.scenarios)),
        ("Execution variants, one worker", _RUN_HEADERS, _run_rows(report.variants)),
        ("--workers N", _WORKER_HEADERS, _worker_rows(report.workers)),
    ]


def render_markdown(report: CheckReport) -> str:
    env = report.environment
    facts = ", ".join(f"{k} {v}" for k, v in env.items())
    parts = [
        f"# infergate GPU check ({report.mode}{', quick' if report.quick else ''}), {env.get('date_utc', '')} UTC",
        "",
        facts + ".",
        f"Took {report.elapsed_s:.0f} s of a {report.budget_s:.0f} s budget: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in report.phases_s.items())
        + ".",
    ]
    for title, headers, rows in _sections(report):
        parts += ["", f"## {title}", "", markdown_table(headers, rows) if rows else "(not run)"]
    if report.skipped:
        parts += ["", "## Skipped", "", *(f"- {s}" for s in report.skipped)]
    if report.failures:
        parts += ["", "## Failures", "", *(f"- {f}" for f in report.failures)]
    return "\n".join(parts) + "\n"
