"""The side-by-side run that BENCHMARKS.md is made from.

Steps, strictly one after another (never two loads at once):

1. write the demo model repository to a temporary folder (or use ``--model-repository``);
2. start the ceiling server, run every :data:`SCENARIOS` entry against it, stop it;
3. start infergate, check one answer per model against onnxruntime, run the same
   scenarios, stop it;
4. with ``peers``: the same for each peer server in turn (``load_tests.peers``),
   each serving the same ONNX files with onnxruntime;
5. measure in-process onnxruntime (:data:`COMPUTE`) as one session with onnxruntime's
   threads and also as infergate served the model (its sessions and their threads,
   asked of it while it was up: ``layouts``), the baseline being the best of them;
6. compare against the project's targets (:func:`evaluate_targets`,
   :func:`evaluate_peer_targets`) and write ``suite.json`` (every figure) and
   ``suite.md`` (the tables) into the output folder.

Every server must listen on loopback only (checked once it is ready). Servers
log to ``<name>.log`` in the output folder. A scenario that fails, or a peer
that does not start or answers wrongly, is recorded under ``failures`` and the
suite goes on.
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
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from .answers import WrongAnswer, check_answers
from .compute import ComputeResult, Layout, compute_rows, format_compute_table, run_compute
from .generator import GeneratorError, LoadConfig, run_closed_loop
from .layouts import served_layouts
from .peers.launch import PEERS, peer_models
from .peers.serve import PeerNotInstalled, running_peer
from .procfs import ROLES, cpu_by_role, process_tree, thread_cpu
from .report import (
    HeadlineColumn,
    LoadResult,
    format_load_table,
    format_table,
    headline_rows,
    load_rows,
    markdown_table,
    to_jsonable,
    write_json,
)
from .repository import find_model_file
from .servers import ServerFailed, check_loopback_only, free_port, running_server

__all__ = [
    "CEILING_SHARE_TARGET",
    "COMPUTE",
    "COMPUTE_SHARE_TARGET",
    "HEADLINE",
    "SCENARIOS",
    "Scenario",
    "SuiteConfig",
    "SuiteReport",
    "TargetCheck",
    "evaluate_peer_targets",
    "evaluate_targets",
    "render_markdown",
    "run_suite",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The project's targets (BENCHMARKS.md, "The targets at a glance"): what evaluate_targets judges "met" against.
CEILING_SHARE_TARGET = 0.85  # (a) matmul16 b1 c64: infergate's req/s at least this share of the ceiling's
COMPUTE_SHARE_TARGET = 0.8  # (d) mlp b8 c32: infergate's samples/s at least this share of the best in-process
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
# The side-by-side table (BENCHMARKS.md's headline): one figure per scenario, one row per server.
HEADLINE: tuple[HeadlineColumn, ...] = (
    HeadlineColumn("matmul16_b1_c1", "matmul16 b1 c1: p50 ms", "p50_ms"),
    HeadlineColumn("matmul16_b1_c64", "matmul16 b1 c64: req/s", "requests_per_s"),
    HeadlineColumn("mlp_b1_c64", "mlp b1 c64: samples/s", "samples_per_s"),
    HeadlineColumn("mlp_b8_c32", "mlp b8 c32: samples/s", "samples_per_s"),
)


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
    scenarios: tuple[str, ...] = ()  # keys of SCENARIOS to run; empty: all
    peers: tuple[str, ...] = ()  # names in load_tests.peers.launch.PEERS, run in this order
    peer_intra_op_threads: int = 1
    peer_instances: int = 1  # sessions per model in the peers that have model instances (Triton, MLServer)
    peer_queue_delay_us: int | None = None  # None: each model's own max_queue_delay_microseconds

    def __post_init__(self) -> None:
        unknown = sorted(set(self.scenarios) - {s.key for s in SCENARIOS})
        if unknown:
            raise ValueError(f"unknown scenario(s) {', '.join(unknown)}: use {', '.join(s.key for s in SCENARIOS)}")
        unknown = sorted(set(self.peers) - set(PEERS))
        if unknown:
            raise ValueError(f"unknown peer(s) {', '.join(unknown)}: use {', '.join(PEERS)}")

    @property
    def selected(self) -> tuple[Scenario, ...]:
        return tuple(s for s in SCENARIOS if not self.scenarios or s.key in self.scenarios)


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
    peers: dict[str, dict[str, LoadResult]] = field(default_factory=dict)  # by peer name, then scenario
    peer_setup: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each peer ran with
    compute: list[ComputeResult] = field(default_factory=list)
    # Cores each role of threads used (procfs.ROLES), by server (ceiling, infergate), then scenario.
    server_cpu: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
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
    """The four figures the project targets; a missing run gives NaN (not met).

    (d) is read against the best in-process figure for mlp, whatever its batch and layout (named in it).
    """
    best = max((r for r in compute if r.model == "mlp"), key=lambda r: r.samples_per_s, default=None)
    best_mlp = best.samples_per_s if best is not None else math.nan
    best_at = f" ({best.layout}, batch {best.batch})" if best is not None else ""
    return [
        TargetCheck(
            "a",
            "matmul16 b1 c64: infergate req/s ÷ ceiling req/s",
            _ratio(
                _get(infergate, "matmul16_b1_c64", "requests_per_s"),
                _get(ceiling, "matmul16_b1_c64", "requests_per_s"),
            ),
            CEILING_SHARE_TARGET,
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
            f"mlp b8 c32: infergate samples/s ÷ best in-process onnxruntime samples/s{best_at}",
            _ratio(_get(infergate, "mlp_b8_c32", "samples_per_s"), best_mlp),
            COMPUTE_SHARE_TARGET,
            ">=",
        ),
    ]


def _best(peers: dict[str, dict[str, LoadResult]], key: str, attribute: str, lowest: bool = False) -> tuple[str, float]:
    """The peer with the best ``attribute`` in run ``key`` (highest, or lowest), and that figure.

    NaN when any peer lacks the run: a comparison with a peer missing is not a comparison.
    """
    figures = [(name, _get(runs, key, attribute)) for name, runs in peers.items()]
    missing = [name for name, value in figures if math.isnan(value)]
    if missing or not figures:
        return f"missing: {', '.join(missing) or 'no peer'}", math.nan
    pick = min if lowest else max
    return pick(figures, key=lambda pair: pair[1])


def evaluate_peer_targets(
    infergate: dict[str, LoadResult], peers: dict[str, dict[str, LoadResult]]
) -> list[TargetCheck]:
    """infergate against the best peer; empty when no peer was asked for.

    (e), (f): at least 1.5x the best peer's throughput; (g): a p50 at one in
    flight no higher than that of any peer that batches.
    """
    if not peers:
        return []
    rps_peer, rps = _best(peers, "matmul16_b1_c64", "requests_per_s")
    mlp_peer, mlp = _best(peers, "mlp_b1_c64", "samples_per_s")
    batching = {name: runs for name, runs in peers.items() if PEERS[name].batches}
    p50_peer, p50 = _best(batching, "matmul16_b1_c1", "p50_ms", lowest=True)
    return [
        TargetCheck(
            "e",
            f"matmul16 b1 c64: infergate req/s ÷ best peer's ({rps_peer})",
            _ratio(_get(infergate, "matmul16_b1_c64", "requests_per_s"), rps),
            1.5,
            ">=",
        ),
        TargetCheck(
            "f",
            f"mlp b1 c64: infergate samples/s ÷ best peer's ({mlp_peer})",
            _ratio(_get(infergate, "mlp_b1_c64", "samples_per_s"), mlp),
            1.5,
            ">=",
        ),
        TargetCheck(
            "g",
            f"matmul16 b1 c1: infergate p50 - best batching peer's ({p50_peer})",
            _get(infergate, "matmul16_b1_c1", "p50_ms") - p50,
            0.0,
            "<=",
            "ms",
        ),
    ]


def _progress(message: str) -> None:
    print(f"[suite] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Serving:
    """A started server: where to reach it and, for a process this suite started itself, its pid."""

    target: str
    pid: int | None = None


Started = Callable[[], AbstractContextManager[Serving]]  # starts a server, yields it, stops it


def _subprocess_server(name: str, argv: Callable[[int], list[str]], config: SuiteConfig) -> Started:
    """Starts ``argv(port)`` on a free port and waits for its ServerReady."""

    @contextmanager
    def start() -> Iterator[Serving]:
        port = free_port()
        target = f"127.0.0.1:{port}"
        _progress(f"starting {name}: {shlex.join(argv(port))}")
        log = config.out / f"{name}.log"
        with running_server(name, argv(port), target, log, REPO_ROOT, config.ready_timeout) as process:
            _progress(f"{name} listens on {', '.join(check_loopback_only(name, process))}")
            yield Serving(target, process.pid)

    return start


def _scenario_models(config: SuiteConfig) -> list[str]:
    """Every model some scenario loads (served and checked even when ``--scenarios`` leaves it out)."""
    return sorted({scenario.model for scenario in SCENARIOS})


def _load_phase(
    name: str,
    start: Started,
    config: SuiteConfig,
    report: SuiteReport,
    repo: pathlib.Path | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> dict[str, LoadResult]:
    """Start a server, check its answers (when ``repo`` is given), call ``on_ready`` with its target, run
    the scenarios, stop it.

    For a server the suite started itself it also records, per scenario, where the server's CPU
    went (``report.server_cpu``).
    """
    results: dict[str, LoadResult] = {}
    with start() as serving:
        target = serving.target
        if repo is not None:
            check_answers(target, repo, _scenario_models(config))
            _progress(f"{name} answers as onnxruntime does ({', '.join(_scenario_models(config))})")
        if on_ready is not None:
            on_ready(target)
        for scenario in config.selected:
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
                results[scenario.key], spent = _measured(load, serving.pid)
            except GeneratorError as exc:
                report.failures.append(f"{name} {scenario.key}: {exc}")
                _progress(f"FAILED {name} {scenario.key}: {exc}")
                continue
            if spent is not None:
                report.server_cpu.setdefault(name, {})[scenario.key] = spent
            _progress(format_load_table([results[scenario.key]]).splitlines()[1])
    return results


def _measured(load: LoadConfig, pid: int | None) -> tuple[LoadResult, dict[str, float] | None]:
    """Run ``load``; with the server's ``pid``, also its CPU by thread role, in cores (warm-up included)."""
    if pid is None:
        return run_closed_loop(load), None
    before, started = thread_cpu(process_tree(pid)), time.perf_counter()
    result = run_closed_loop(load)
    spent = cpu_by_role(before, thread_cpu(process_tree(pid)))
    wall = time.perf_counter() - started
    return result, {role: seconds / wall for role, seconds in spent.items()}


def _peer_phase(name: str, repo: pathlib.Path, tmp: pathlib.Path, config: SuiteConfig, report: SuiteReport) -> None:
    """Serve the scenarios' models on peer ``name`` and load it; a peer that fails is recorded, not raised."""
    peer = PEERS[name]
    models = peer_models(
        repo, _scenario_models(config), config.peer_intra_op_threads, config.peer_queue_delay_us, config.peer_instances
    )
    setup: dict[str, Any] = {"title": peer.title, "versions": peer.versions(), "configuration": peer.configuration}
    setup["models"] = {m.name: {"max_batch_size": m.max_batch_size, "max_queue_delay_us": m.max_queue_delay_us,
                                "intra_op_threads": m.intra_op_threads, "instances": m.instances}
                       for m in models}  # fmt: skip
    report.peer_setup[name] = setup

    @contextmanager
    def start() -> Iterator[Serving]:
        _progress(f"starting {name} ({peer.title}) from {peer.venv}")
        with running_peer(peer, models, tmp / name, config.out / f"{name}.log", config.ready_timeout, _progress) as run:
            setup["listening"], setup["start_attempts"] = run.listening, run.attempts
            _progress(f"{name} listens on {', '.join(run.listening)}")
            yield Serving(run.target)  # a peer's threads are its own: no CPU by role

    report.peers[name] = {}  # stays empty when the peer fails, so the side-by-side table shows it
    try:
        report.peers[name] = _load_phase(name, start, config, report, repo)
    except (PeerNotInstalled, ServerFailed, WrongAnswer, GeneratorError) as exc:
        report.failures.append(f"{name}: {exc}")
        _progress(f"FAILED {name}: {exc}")


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


def _compute_phase(repo: pathlib.Path, config: SuiteConfig, served: dict[str, Layout]) -> list[ComputeResult]:
    """Every :data:`COMPUTE` model in one session of ``--intra-op-threads``, and in the layout infergate
    served it with when that differs (``served``): a baseline is the best the same compute can do."""
    results: list[ComputeResult] = []
    own = Layout(1, config.intra_op_threads)
    for model, batches in COMPUTE:
        path, _ = find_model_file(repo, model)
        for layout in dict.fromkeys([own, served.get(model, own)]):
            _progress(f"in-process onnxruntime: {model} at batch {batches}, {layout}")
            results += run_compute(path, batches, config.compute_duration, name=model, layout=layout)
    return results


def _ask_layouts(served: dict[str, Layout]) -> Callable[[str], None]:
    """What to call with infergate's target while it is up: fills ``served`` with how it runs each
    :data:`COMPUTE` model."""

    def ask(target: str) -> None:
        served.update(served_layouts(target, [model for model, _ in COMPUTE]))
        said = "; ".join(f"{model} as {layout}" for model, layout in served.items())
        _progress(f"infergate runs {said}" if said else "infergate did not say how it runs the models (ModelConfig)")

    return ask


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
        "event_loop": _default_event_loop(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
    }


def _default_event_loop() -> str:
    """The loop infergate and the ceiling run on by default (both ``auto``)."""
    from infergate.eventloop import describe_choice  # type: ignore[import-untyped,unused-ignore]

    return str(describe_choice("auto"))


def _write_demo(folder: pathlib.Path) -> pathlib.Path:
    from infergate.demo import write_demo_repository  # type: ignore[import-untyped,unused-ignore]

    write_demo_repository(folder)
    return folder


def run_suite(config: SuiteConfig) -> SuiteReport:
    """Run the whole suite (see the module docstring); servers are always stopped."""
    config.out.mkdir(parents=True, exist_ok=True)
    report = SuiteReport(config=config, environment=environment())
    with tempfile.TemporaryDirectory(prefix="infergate-suite-") as tmp:
        repo = config.model_repository or _write_demo(pathlib.Path(tmp) / "repository")
        ceiling = _subprocess_server("ceiling", _ceiling_argv(repo, config), config)
        report.ceiling = _load_phase("ceiling", ceiling, config, report)
        server = _subprocess_server("infergate", _server_argv(repo, config), config)
        served: dict[str, Layout] = {}
        report.infergate = _load_phase("infergate", server, config, report, repo, _ask_layouts(served))
        for name in config.peers:
            _peer_phase(name, repo, pathlib.Path(tmp) / "peers", config, report)
        report.compute = _compute_phase(repo, config, served)
    report.targets = evaluate_targets(report.ceiling, report.infergate, report.compute)
    report.targets += evaluate_peer_targets(report.infergate, report.peers)
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
        "peers": report.peers,
        "peer_setup": report.peer_setup,
        "compute": report.compute,
        "server_cpu": report.server_cpu,
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


def side_by_side(report: SuiteReport) -> tuple[list[str], list[list[str]]]:
    """The headline table: ceiling, infergate and each peer that was asked for, one figure per scenario."""
    servers: list[tuple[str, dict[str, LoadResult]]] = [
        ("transport ceiling (bare grpc.aio)", report.ceiling),
        ("infergate", report.infergate),
    ]
    servers += [(PEERS[name].title, report.peers.get(name, {})) for name in report.config.peers]
    return headline_rows(servers, HEADLINE)


def _all_runs(report: SuiteReport) -> list[LoadResult]:
    peer_runs = [run for runs in report.peers.values() for run in runs.values()]
    return [*report.ceiling.values(), *report.infergate.values(), *peer_runs]


def _peer_section(report: SuiteReport) -> list[str]:
    cfg = report.config
    delay = "each model's own" if cfg.peer_queue_delay_us is None else f"{cfg.peer_queue_delay_us} µs for every model"
    lines = [
        "## Peers",
        "",
        f"Each serves the same ONNX files with onnxruntime ({cfg.peer_intra_op_threads} intra-op thread(s), "
        f"{cfg.peer_instances} instance(s) per model where the peer has model instances); "
        f"max batch size and queue delay: {delay} (below).",
        "",
    ]
    for name, setup in report.peer_setup.items():
        versions = ", ".join(f"{package} {version}" for package, version in setup["versions"].items())
        batching = "; ".join(
            f"{model}: max batch {m['max_batch_size']}, delay {m['max_queue_delay_us']} µs"
            for model, m in setup["models"].items()
        )
        if not PEERS[name].batches:
            batching = "Every request runs on its own"
        title = f"**{setup['title']}** ({versions or 'versions unknown'})"
        lines.append(f"- {title}: {setup['configuration']}. {batching}.")
    return lines


def _cpu_section(report: SuiteReport) -> list[str]:
    """Where each server's CPU went, per scenario, beside the load generator's."""
    headers = ["server", "scenario", "total", *ROLES, "load generator", "server CPU µs per request"]
    cells = []
    for server, scenarios in report.server_cpu.items():
        runs = report.ceiling if server == "ceiling" else report.infergate
        for key, cores in scenarios.items():
            run = runs.get(key)
            generator = run.generator_cpu_pct / 100 if run else math.nan
            total = sum(cores.values())
            per_request = total / run.requests_per_s * 1e6 if run and run.requests_per_s > 0 else math.nan
            shares = [f"{cores[role]:.2f}" for role in ROLES]
            cells.append([server, key, f"{total:.2f}", *shares, f"{generator:.2f}", f"{per_request:,.0f}"])
    return [
        "## Where the CPU went (cores, over warm-up and measurement)",
        "",
        f"This machine has {os.cpu_count()} logical CPUs; the client runs on them too. By thread: the event "
        "loop (each process's main thread), models (onnxruntime's threads and infergate's instance threads, "
        "`ort-*`; a model that runs on the event loop counts there), gRPC core's own threads, and other "
        "threads (grpc.aio's completion-queue poller among them); the load generator's over the measured "
        "seconds alone. CPU per request is the server's cores "
        "divided by its requests per second: what each call costs it, the per-call budget.",
        "",
        markdown_table(headers, cells),
    ]


def render_markdown(report: SuiteReport) -> str:
    """suite.md: environment, side by side, targets, closed-loop and compute tables, peers, failures."""
    env, cfg = report.environment, report.config
    load_headers, load_cells = load_rows(_all_runs(report))
    compute_headers, compute_cells = compute_rows(report.compute)
    parts = [
        f"# infergate load suite, {env['date_utc']} UTC",
        "",
        f"commit `{env['commit']}`; {env['machine']}; Python {env['python']}, "
        f"grpcio {env['grpcio']}, onnxruntime {env['onnxruntime']}; "
        f"event loop of infergate and the ceiling unless server args say otherwise: "
        f"{env.get('event_loop', 'asyncio')}.",
        f"Closed loop with the raw client, {cfg.processes} generator process(es), "
        f"{cfg.warmup:g} s warm-up then {cfg.duration:g} s measured; "
        f"server args: `{shlex.join(cfg.server_args) or '(none)'}`; "
        f"ceiling processes: {cfg.ceiling_processes}.",
        "",
        "## Side by side",
        "",
        markdown_table(*side_by_side(report)),
        "",
        "## Targets",
        "",
        markdown_table(["", "figure", "value", "target", "met"], _target_rows(report.targets)),
        "",
        "## Closed loop: every server",
        "",
        markdown_table(load_headers, load_cells),
        "",
        f"## In-process onnxruntime ({cfg.compute_duration:g} s per batch size and layout)",
        "",
        markdown_table(compute_headers, compute_cells),
    ]
    if report.server_cpu:
        parts += ["", *_cpu_section(report)]
    if report.peer_setup:
        parts += ["", *_peer_section(report)]
    if report.failures:
        parts += ["", "## Failures", "", *(f"- {failure}" for failure in report.failures)]
    return "\n".join(parts) + "\n"


def print_summary(report: SuiteReport) -> None:
    """The console version of suite.md's tables."""
    print(format_load_table(_all_runs(report)))
    print()
    headers, cells = side_by_side(report)
    print(format_table(headers, ["<", *">" * (len(headers) - 1)], cells))
    print()
    print(format_compute_table(report.compute))
    print()
    print(markdown_table(["", "figure", "value", "target", "met"], _target_rows(report.targets)))
    for failure in report.failures:
        print(f"FAILED: {failure}")
