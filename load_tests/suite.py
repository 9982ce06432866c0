"""The side-by-side run that BENCHMARKS.md is made from.

Steps, strictly one after another (never two loads at once):

1. write the demo model repository to a temporary folder (or use ``--model-repository``);
2. start the ceiling server, run every :data:`SCENARIOS` entry against it, stop it;
3. start infergate, run the same scenarios, stop it;
4. measure in-process onnxruntime (:data:`COMPUTE`);
5. compare against the project's targets (:func:`evaluate_targets`) and write
   ``suite.json`` (every figure) and ``suite.md`` (the tables) into the output folder.

Servers log to ``ceiling.log`` and ``infergate.log`` in the output folder. A
scenario that fails is recorded under ``failures`` and the suite goes on.
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .compute import ComputeResult, compute_rows, format_compute_table, run_compute
from .generator import GeneratorError, LoadConfig, run_closed_loop
from .report import (
    LoadResult,
    format_load_table,
    load_rows,
    markdown_table,
    to_jsonable,
    write_json,
)
from .repository import find_model_file
from .servers import free_port, running_server

__all__ = [
    "COMPUTE",
    "SCENARIOS",
    "Scenario",
    "SuiteConfig",
    "SuiteReport",
    "TargetCheck",
    "evaluate_targets",
    "render_markdown",
    "run_suite",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_SERVER_COMMAND = "{python} -m infergate serve --model-repository {repo} --host 127.0.0.1 --port {port}"


@dataclass(frozen=True)
class Scenario:
    """One closed-loop run, made against each server."""

    key: str
    model: str
    batch: int
    concurrency: int


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("matmul16_b1_c1", "matmul16", 1, 1),
    Scenario("matmul16_b1_c64", "matmul16", 1, 64),
    Scenario("mlp_b1_c64", "mlp", 1, 64),
    Scenario("mlp_b8_c32", "mlp", 8, 32),
)
COMPUTE: tuple[tuple[str, tuple[int, ...]], ...] = (("mlp", (1, 8, 64)), ("matmul16", (1, 8, 64)))


@dataclass(frozen=True)
class SuiteConfig:
    """Options of one suite run; ``server_command`` is a template, see DEFAULT_SERVER_COMMAND."""

    out: pathlib.Path
    duration: float = 10.0
    warmup: float = 2.0
    compute_duration: float = 3.0
    processes: int = 1
    ceiling_processes: int = 1
    server_args: tuple[str, ...] = ()
    server_command: str = DEFAULT_SERVER_COMMAND
    intra_op_threads: int = 0
    model_repository: pathlib.Path | None = None
    ready_timeout: float = 60.0


@dataclass(frozen=True)
class TargetCheck:
    """One project target: ``value`` compared with ``target`` by ``op`` ('>=' or '<=')."""

    key: str
    description: str
    value: float
    target: float
    op: str
    unit: str = ""

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.target if self.op == ">=" else self.value <= self.target


@dataclass
class SuiteReport:
    """Everything one suite run measured."""

    config: SuiteConfig
    environment: dict[str, str]
    ceiling: dict[str, LoadResult] = field(default_factory=dict)
    infergate: dict[str, LoadResult] = field(default_factory=dict)
    compute: list[ComputeResult] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _get(results: dict[str, LoadResult], key: str, attribute: str) -> float:
    result = results.get(key)
    return float(getattr(result, attribute)) if result is not None else math.nan


def evaluate_targets(
    ceiling: dict[str, LoadResult],
    infergate: dict[str, LoadResult],
    compute: Sequence[ComputeResult],
) -> list[TargetCheck]:
    """The four figures the project targets; a missing run gives NaN (not met)."""
    best_mlp = max((r.samples_per_s for r in compute if r.model == "mlp"), default=math.nan)
    return [
        TargetCheck(
            "a",
            "matmul16 b1 c64: infergate req/s ÷ ceiling req/s",
            _ratio(
                _get(infergate, "matmul16_b1_c64", "requests_per_s"),
                _get(ceiling, "matmul16_b1_c64", "requests_per_s"),
            ),
            0.75,
            ">=",
        ),
        TargetCheck(
            "b",
            "matmul16 b1 c1: infergate p50 - ceiling p50",
            _get(infergate, "matmul16_b1_c1", "p50_ms") - _get(ceiling, "matmul16_b1_c1", "p50_ms"),
            0.15,
            "<=",
            "ms",
        ),
        TargetCheck(
            "c",
            "mlp b1 c64: infergate samples/s",
            _get(infergate, "mlp_b1_c64", "samples_per_s"),
            2300.0,
            ">=",
            "samples/s",
        ),
        TargetCheck(
            "d",
            "mlp b8 c32: infergate samples/s ÷ best in-process onnxruntime samples/s",
            _ratio(_get(infergate, "mlp_b8_c32", "samples_per_s"), best_mlp),
            0.7,
            ">=",
        ),
    ]


def _progress(message: str) -> None:
    print(f"[suite] {message}", file=sys.stderr, flush=True)


def _load_phase(
    name: str, argv: Callable[[int], list[str]], config: SuiteConfig, report: SuiteReport
) -> dict[str, LoadResult]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    results: dict[str, LoadResult] = {}
    _progress(f"starting {name}: {shlex.join(argv(port))}")
    with running_server(name, argv(port), target, config.out / f"{name}.log", REPO_ROOT, config.ready_timeout):
        for scenario in SCENARIOS:
            load = LoadConfig(
                target=target,
                model=scenario.model,
                batch=scenario.batch,
                concurrency=scenario.concurrency,
                duration=config.duration,
                warmup=config.warmup,
                processes=min(config.processes, scenario.concurrency),
                client="raw",
                label=name,
            )
            try:
                results[scenario.key] = run_closed_loop(load)
            except GeneratorError as exc:
                report.failures.append(f"{name} {scenario.key}: {exc}")
                _progress(f"FAILED {name} {scenario.key}: {exc}")
                continue
            _progress(format_load_table([results[scenario.key]]).splitlines()[1])
    return results


def _ceiling_argv(repo: pathlib.Path, config: SuiteConfig) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable,
        "-m",
        "load_tests",
        "ceiling",
        "--port",
        str(port),
        "--model-repository",
        str(repo),
        "--processes",
        str(config.ceiling_processes),
    ]


def _server_argv(repo: pathlib.Path, config: SuiteConfig) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        words = shlex.split(config.server_command)
        filled = [w.format(python=sys.executable, repo=repo, port=port) for w in words]
        return [*filled, *config.server_args]

    return argv


def _compute_phase(repo: pathlib.Path, config: SuiteConfig) -> list[ComputeResult]:
    results: list[ComputeResult] = []
    for model, batches in COMPUTE:
        _progress(f"in-process onnxruntime: {model} at batch {batches}")
        path, _ = find_model_file(repo, model)
        results += run_compute(path, batches, config.compute_duration, config.intra_op_threads, name=model)
    return results


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def environment() -> dict[str, str]:
    """Versions and machine facts recorded with every suite run."""
    import grpc
    import numpy
    import onnxruntime

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
    }


def _write_demo(folder: pathlib.Path) -> pathlib.Path:
    from infergate.demo import write_demo_repository  # type: ignore[import-untyped,unused-ignore]

    write_demo_repository(folder)
    return folder


def run_suite(config: SuiteConfig) -> SuiteReport:
    """Run the whole suite (see the module docstring); servers are always stopped."""
    config.out.mkdir(parents=True, exist_ok=True)
    report = SuiteReport(config=config, environment=environment())
    with tempfile.TemporaryDirectory(prefix="infergate-suite-") as tmp:
        repo = config.model_repository or _write_demo(pathlib.Path(tmp))
        report.ceiling = _load_phase("ceiling", _ceiling_argv(repo, config), config, report)
        report.infergate = _load_phase("infergate", _server_argv(repo, config), config, report)
        report.compute = _compute_phase(repo, config)
    report.targets = evaluate_targets(report.ceiling, report.infergate, report.compute)
    write_json(config.out / "suite.json", report_json(report))
    (config.out / "suite.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def report_json(report: SuiteReport) -> dict[str, object]:
    """suite.json's content: the report, with each target's ``met`` spelled out."""
    return {
        "environment": report.environment,
        "config": report.config,
        "targets": [{**to_jsonable(t), "met": t.met} for t in report.targets],
        "ceiling": report.ceiling,
        "infergate": report.infergate,
        "compute": report.compute,
        "failures": report.failures,
    }


def _figure(value: float, unit: str) -> str:
    text = f"{value:,.0f}" if unit == "samples/s" else f"{value:,.3f}"
    return f"{text} {unit}".strip()


def _target_rows(targets: Sequence[TargetCheck]) -> list[list[str]]:
    return [
        [
            f"({t.key})",
            t.description,
            _figure(t.value, t.unit),
            f"{t.op} {t.target:,g} {t.unit}".strip(),
            "yes" if t.met else "**no**",
        ]
        for t in targets
    ]


def render_markdown(report: SuiteReport) -> str:
    """suite.md: environment, targets, closed-loop and compute tables, failures."""
    env, cfg = report.environment, report.config
    runs = [*report.ceiling.values(), *report.infergate.values()]
    load_headers, load_cells = load_rows(runs)
    compute_headers, compute_cells = compute_rows(report.compute)
    parts = [
        f"# infergate load suite, {env['date_utc']} UTC",
        "",
        f"commit `{env['commit']}`; {env['machine']}; Python {env['python']}, "
        f"grpcio {env['grpcio']}, onnxruntime {env['onnxruntime']}.",
        f"Closed loop with the raw client, {cfg.processes} generator process(es), "
        f"{cfg.warmup:g} s warm-up then {cfg.duration:g} s measured; "
        f"server args: `{shlex.join(cfg.server_args) or '(none)'}`; "
        f"ceiling processes: {cfg.ceiling_processes}.",
        "",
        "## Targets",
        "",
        markdown_table(["", "figure", "value", "target", "met"], _target_rows(report.targets)),
        "",
        "## Closed loop: ceiling and infergate",
        "",
        markdown_table(load_headers, load_cells),
        "",
        f"## In-process onnxruntime ({cfg.compute_duration:g} s per batch size)",
        "",
        markdown_table(compute_headers, compute_cells),
    ]
    if report.failures:
        parts += ["", "## Failures", "", *(f"- {failure}" for failure in report.failures)]
    return "\n".join(parts) + "\n"


def print_summary(report: SuiteReport) -> None:
    """The console version of suite.md's tables."""
    runs = [*report.ceiling.values(), *report.infergate.values()]
    print(format_load_table(runs))
    print()
    print(format_compute_table(report.compute))
    print()
    print(markdown_table(["", "figure", "value", "target", "met"], _target_rows(report.targets)))
    for failure in report.failures:
        print(f"FAILED: {failure}")
