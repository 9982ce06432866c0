"""The measured parts of the GPU check, each against a real server on loopback.

- :func:`scenario_runs`: one server (one worker), the suite's scenarios and a
  sweep of batch 1 and 8 at 1 to 256 in flight, with the load harness and with
  perf_analyzer, sampling the GPU during each run.
- :func:`variant_runs`: the same few runs against each way a model can execute
  (session.run, IO binding, CUDA graphs), to see what each is worth.
- :func:`worker_runs`: ``--workers N``: req/s with enough client processes,
  and, per worker, its average batch size (from its own ModelStatistics), its
  GPU memory (nvidia-smi) and its resident memory.

Every run is bounded in time; a run that fails is recorded and the rest go on.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.telemetry.logs import LISTENING

from ..clients import OWN_CONNECTION
from ..generator import GeneratorError, LoadConfig, run_closed_loop
from ..servers import free_port, running_server
from .perf import run_perf_analyzer
from .probe import GpuSample, children, cpu_seconds, gpu_memory_by_pid, rss_mib, sampling

__all__ = [
    "Budget",
    "RunRecord",
    "Scenario",
    "Timing",
    "WorkerBatches",
    "WorkerMemory",
    "WorkerRecord",
    "scenario_runs",
    "serve",
    "variant_runs",
    "worker_runs",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_READY_TIMEOUT_S = 180.0  # every model on every worker: CUDA contexts, cuDNN searches, graph captures
_STATS_TRIES_PER_WORKER = 8


@dataclass(frozen=True)
class Scenario:
    model: str
    batch: int
    concurrency: int


@dataclass(frozen=True)
class Timing:
    """How long each run lasts: warm-up and measured seconds."""

    warmup_s: float
    measure_s: float


@dataclass
class Budget:
    """A deadline on the monotonic clock; phases ask it before each run."""

    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


@dataclass
class RunRecord:
    """One closed-loop measurement against one server."""

    tool: str  # load_tests or perf_analyzer
    variant: str
    workers: int
    model: str
    batch: int
    concurrency: int
    processes: int
    connections: int = 1  # per process
    requests_per_s: float = math.nan
    samples_per_s: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    errors: int = 0
    gpu: GpuSample = field(default_factory=GpuSample)
    error: str = ""


@dataclass
class WorkerMemory:
    """What one worker process held after the runs, and how busy it was during them (None: not measurable)."""

    pid: int
    rss_mib: float | None
    gpu_mib: float | None
    cpu_pct: float | None = None  # of one core, over the runs (warm-ups included)


@dataclass
class WorkerBatches:
    """One worker's average batch size per model (inferences ÷ executions); ``worker`` as it names itself."""

    worker: str  # "INDEX/COUNT", or "?" where the server does not say
    averages: dict[str, float]


@dataclass
class WorkerRecord:
    """``--workers N``: its runs, each worker's memory, and the average batch of each worker reached.

    ``batches`` has one entry per worker whose statistics a fresh connection
    reached; statistics carry no pid, so they are not matched to ``memory``.
    """

    workers: int
    client_processes: int
    runs: list[RunRecord] = field(default_factory=list)
    memory: list[WorkerMemory] = field(default_factory=list)
    batches: list[WorkerBatches] = field(default_factory=list)
    error: str = ""


@contextlib.contextmanager
def serve(repo: pathlib.Path, out: pathlib.Path, label: str, workers: int = 1) -> Iterator[tuple[str, int]]:
    """``infergate serve`` over ``repo`` on a free loopback port; yields (target, pid) once ready."""
    port = free_port()
    # Ready once loading finished, even if a model failed: its runs then fail fast and say why,
    # instead of the whole phase waiting for a readiness that never comes.
    config = repo.parent / "server.yaml"
    config.write_text("strict_readiness: false\n", encoding="utf-8")
    argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(repo), "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    log = out / "logs" / f"{label}.log"
    target = f"127.0.0.1:{port}"
    with running_server(label, argv, target, log, REPO_ROOT, _READY_TIMEOUT_S, announces=LISTENING) as process:
        yield target, process.pid


def load_run(
    target: str, scenario: Scenario, timing: Timing, processes: int, variant: str, workers: int, connections: int = 1
) -> RunRecord:
    """One load-harness run (raw client, no gRPC deadline, as perf_analyzer sends); ``connections`` per process."""
    processes = max(1, min(processes, scenario.concurrency))
    record = RunRecord(
        "load_tests", variant, workers, scenario.model, scenario.batch, scenario.concurrency, processes, connections
    )
    config = LoadConfig(
        target=target,
        model=scenario.model,
        batch=scenario.batch,
        concurrency=scenario.concurrency,
        duration=timing.measure_s,
        warmup=timing.warmup_s,
        processes=processes,
        client="raw",
        label=variant,
        deadline=False,
        connections=connections,
    )
    with sampling() as sampler:
        try:
            result = run_closed_loop(config)
        except GeneratorError as exc:
            record.error = str(exc)
    record.gpu = sampler.result()
    if not record.error:
        record.requests_per_s, record.samples_per_s = result.requests_per_s, result.samples_per_s
        record.p50_ms, record.p99_ms, record.errors = result.p50_ms, result.p99_ms, result.error_count
    return record


def perf_run(
    command: list[str], target: str, scenario: Scenario, timing: Timing, out: pathlib.Path, variant: str
) -> RunRecord:
    """One perf_analyzer run of ``scenario``."""
    record = RunRecord("perf_analyzer", variant, 1, scenario.model, scenario.batch, scenario.concurrency, 1)
    csv_path = out / "perf_analyzer" / f"{variant}-{scenario.model}-b{scenario.batch}-c{scenario.concurrency}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with sampling() as sampler:
        try:
            result = run_perf_analyzer(
                command, target, scenario.model, scenario.batch, scenario.concurrency, timing.measure_s, csv_path
            )
        except (RuntimeError, OSError, subprocess.SubprocessError, StopIteration, KeyError, ValueError) as exc:
            record.error = str(exc) or type(exc).__name__
    record.gpu = sampler.result()
    if not record.error:
        record.requests_per_s, record.samples_per_s = result.requests_per_s, result.samples_per_s
        record.p50_ms, record.p99_ms = result.p50_ms, result.p99_ms
    return record


def _run_estimate(timing: Timing) -> float:
    return timing.warmup_s + timing.measure_s + 3.0  # process spawn, first requests, drain


def scenario_runs(
    repo: pathlib.Path,
    out: pathlib.Path,
    variant: str,
    scenarios: Sequence[Scenario],
    timing: Timing,
    processes: int,
    perf_command: list[str] | None,
    budget: Budget,
    skipped: list[str],
    perf_runs: int | None = None,
) -> list[RunRecord]:
    """Every scenario with the load harness, then (the first ``perf_runs``, or all) with perf_analyzer."""
    records: list[RunRecord] = []
    with serve(repo, out, f"scenarios-{variant}") as (target, _):
        for index, scenario in enumerate(scenarios):
            if not budget.allows(_run_estimate(timing)):
                skipped.append(f"scenario {scenario} (load_tests): out of time")
                continue
            records.append(load_run(target, scenario, timing, processes, variant, 1))
            if perf_command is None or (perf_runs is not None and index >= perf_runs):
                continue
            if not budget.allows(_run_estimate(timing)):
                skipped.append(f"scenario {scenario} (perf_analyzer): out of time")
                continue
            records.append(perf_run(perf_command, target, scenario, timing, out, variant))
    return records


def variant_runs(
    repos: dict[str, pathlib.Path],
    out: pathlib.Path,
    scenarios: Sequence[Scenario],
    timing: Timing,
    processes: int,
    budget: Budget,
    skipped: list[str],
) -> list[RunRecord]:
    """The same load-harness runs against each variant's server, one server at a time."""
    records: list[RunRecord] = []
    for variant, repo in repos.items():
        if not budget.allows(len(scenarios) * _run_estimate(timing) + 10):
            skipped.append(f"variant {variant}: out of time")
            continue
        with serve(repo, out, f"variant-{variant}") as (target, _):
            records += [load_run(target, s, timing, processes, variant, 1) for s in scenarios]
    return records


# Servers that run as one of --workers N mark per-worker answers with this initial metadata ("INDEX/COUNT").
WORKER_HEADER = "infergate-worker"


def _statistics(target: str, models: Sequence[str]) -> tuple[str, tuple[tuple[int, int] | None, ...]]:
    """The worker a fresh connection reaches ('' if it does not say) and each model's
    (inference_count, execution_count) there, all asked on that one connection."""
    options = [OWN_CONNECTION]  # a connection of its own, so the kernel may pick another worker
    counts: list[tuple[int, int] | None] = []
    worker = ""
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for model in models:
            try:
                reply, call = stub.ModelStatistics.with_call(pb.ModelStatisticsRequest(name=model), timeout=10)
            except grpc.RpcError:
                counts.append(None)
                continue
            worker = worker or dict(call.initial_metadata() or ()).get(WORKER_HEADER, "")
            stats = reply.model_stats
            counts.append((int(stats[0].inference_count), int(stats[0].execution_count)) if stats else None)
    return worker, tuple(counts)


def worker_batches(target: str, models: Sequence[str], workers: int) -> list[WorkerBatches]:
    """Average batch size per model, for as many distinct workers as fresh connections reach.

    Each worker keeps its own statistics. A worker that names itself (``infergate-worker``)
    is told apart by that; otherwise by its counts, which no longer change once the load
    has stopped, so replies that differ come from different workers.
    """
    seen: dict[object, WorkerBatches] = {}
    for _ in range(_STATS_TRIES_PER_WORKER * workers):
        worker, counts = _statistics(target, models)
        key = worker or counts
        if key not in seen:
            averages = {m: (c[0] / c[1] if c and c[1] else math.nan) for m, c in zip(models, counts, strict=True)}
            seen[key] = WorkerBatches(worker or "?", averages)
        if len(seen) >= workers:
            break
    return sorted(seen.values(), key=lambda b: b.worker)


def _busy(pid: int, before: float | None, wall: float) -> float | None:
    after = cpu_seconds(pid)
    return 100.0 * (after - before) / wall if after is not None and before is not None and wall > 0 else None


def _worker_pids(pid: int, workers: int) -> list[int]:
    return [pid] if workers == 1 else children(pid)


# Connections per worker the clients open in all: the kernel hashes each connection to a worker, so a
# few connections leave some workers idle (seen on the H200: 8 connections, 8 workers, one got none).
CONNECTIONS_PER_WORKER = 8


def _connections_per_client(workers: int, clients: int) -> int:
    return 1 if workers == 1 else -(-CONNECTIONS_PER_WORKER * workers // clients)


def worker_runs(
    repo: pathlib.Path,
    out: pathlib.Path,
    variant: str,
    counts: Sequence[int],
    scenarios: Callable[[int], list[Scenario]],
    clients: Callable[[int], int],
    timing: Timing,
    budget: Budget,
    skipped: list[str],
) -> list[WorkerRecord]:
    """For each N in ``counts``: a server with ``--workers N``, ``scenarios(N)`` with ``clients(N)`` processes."""
    records: list[WorkerRecord] = []
    for n in counts:
        runs = scenarios(n)
        if not budget.allows(len(runs) * _run_estimate(timing) + 15):
            skipped.append(f"--workers {n}: out of time")
            continue
        record = WorkerRecord(n, clients(n))
        try:
            with serve(repo, out, f"workers-{n}", workers=n) as (target, pid):
                pids = _worker_pids(pid, n)
                before, began = {p: cpu_seconds(p) for p in pids}, time.monotonic()
                connections = _connections_per_client(n, clients(n))
                record.runs = [load_run(target, s, timing, clients(n), variant, n, connections) for s in runs]
                wall = time.monotonic() - began
                record.batches = worker_batches(target, sorted({s.model for s in runs}), n)
                gpu = gpu_memory_by_pid()
                record.memory = [
                    WorkerMemory(p, rss_mib(p), gpu.get(p) if gpu is not None else None, _busy(p, before[p], wall))
                    for p in pids
                ]
        except Exception as exc:  # a server that would not start is a finding; the next N still runs
            record.error = str(exc)
        records.append(record)
    return records
