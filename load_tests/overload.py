"""Overload: how fast the excess is refused, and what the admitted calls see, at k times a model's capacity.

Starts infergate on a repository with one model and a server-wide limit on
inference calls (``limits.max_inference_calls``), measures the model's
capacity with a closed loop at that many calls in flight, then sends calls
open-loop at ``factor`` times that rate (one process, pre-serialised requests,
each with a 1 s deadline) and reports, per outcome, how many and how fast:
admitted (answered), refused (UNAVAILABLE: overloaded) and anything else —
plus the server's CPU share over the run.

Latencies count from when a call was due, not from when the generator got
round to sending it, so a generator that falls behind does not hide waiting.
It also reports the generator's own lag (how late calls left, p99): when that
is large the row measures the generator, not the server, and says so.

Two models: ``slow`` is compute-bound (about 20 ms per batch of up to 4),
``tiny`` is the demo's 16x16 product, bound by the server's per-call cost.

On one machine the generator takes CPU from the server it measures. To keep
them apart, either pin the server to some of the cores and the generator to
the rest (``server_cpus``), or write the repository
(:func:`write_overload_repository`), serve it where you like, and measure it
from elsewhere (:func:`run_overload_against`): the server's CPU share is then
read only when it listens on this machine.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np
import onnx

from infergate._proto import grpc_service_pb2 as pb
from infergate.demo import build_matmul16

from .clients import OWN_CONNECTION
from .generator import LoadConfig, run_closed_loop
from .models import build_slow_model
from .pinning import cpu_list, generator_pinned, on_cpus
from .procfs import listener_pid, tree_cpu_seconds
from .servers import free_port, running_server, wait_ready

__all__ = [
    "OverloadPlan",
    "OverloadRun",
    "format_overload",
    "run_overload",
    "run_overload_against",
    "write_overload_repository",
]

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODELS = ("slow", "tiny")
GENERATOR_LAG_LIMIT_MS = 50.0


@dataclass(frozen=True)
class OverloadPlan:
    """One overload measurement: ``model`` at ``factor`` times its capacity with ``limit`` calls admitted,
    open loop for ``duration`` s from ``processes`` generator processes."""

    model: str
    limit: int
    factor: float
    duration: float
    processes: int = 1


@dataclass
class OverloadRun:
    model: str
    limit: int
    capacity_per_s: float  # closed loop at ``limit`` in flight
    offered_per_s: float
    duration_s: float
    admitted: int = 0
    refused: int = 0
    other: dict[str, int] = field(default_factory=dict)
    admitted_p50_ms: float = math.nan
    admitted_p99_ms: float = math.nan
    refused_p50_ms: float = math.nan
    refused_p99_ms: float = math.nan
    server_cpu_share: float = math.nan  # of one core, over the open-loop run; NaN for a server elsewhere
    send_lag_p99_ms: float = math.nan  # how late the generator sent calls
    processes: int = 1  # generator processes that shared the offered rate
    server_cpus: list[int] | None = None  # the cores the server was pinned to, read back from it (None: not pinned)
    generator_cpus: list[int] | None = None  # the cores left to the generator then

    @property
    def generator_bound(self) -> bool:
        """True when calls left so late that the row measures the load generator, not the server."""
        return not self.send_lag_p99_ms < GENERATOR_LAG_LIMIT_MS


def write_overload_repository(root: pathlib.Path, limit: int) -> list[str]:
    """Write ``root/models`` (``slow`` and ``tiny``) and ``root/server.yaml`` (the limit); return the serve command."""
    _write_models(root / "models")
    (root / "server.yaml").write_text(f"limits: {{max_inference_calls: {limit}}}\n")
    return ["infergate", "serve", "--model-repository", str(root / "models"), "--config", str(root / "server.yaml")]


def _write_models(root: pathlib.Path) -> None:
    for name, model, config in (
        ("slow", build_slow_model(20), "max_batch_size: 4\nsession_options: {intra_op_num_threads: 1}\n"),
        ("tiny", build_matmul16(), "max_batch_size: 64\n"),
    ):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(model, root / name / "1" / "model.onnx")
        (root / name / "config.yaml").write_text(config)


def _request(model: str) -> bytes:
    width = 4 if model == "slow" else 16
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, width])
    message = pb.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[np.ones((1, width), np.float32).tobytes()]
    )
    return message.SerializeToString()


@dataclass
class _Samples:
    """What one generator process saw: seconds from due to answer, by outcome, and how late calls left."""

    admitted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    other: Counter[str] = field(default_factory=Counter)

    def add(self, other: _Samples) -> None:
        self.admitted += other.admitted
        self.refused += other.refused
        self.lags += other.lags
        self.other.update(other.other)


async def _open_loop(target: str, model: str, rate: float, duration: float, start_at: float) -> _Samples:
    """Calls at ``rate`` per second for ``duration`` s from wall-clock time ``start_at`` (a shared start)."""
    body = _request(model)
    seen = _Samples()
    channels = [grpc.aio.insecure_channel(target, options=[OWN_CONNECTION]) for _ in range(4)]
    calls = [channel.unary_unary(INFER) for channel in channels]

    async def one(index: int, due: float) -> None:
        seen.lags.append(time.perf_counter() - due)
        try:
            await calls[index % len(calls)](body, timeout=1.0)
        except grpc.aio.AioRpcError as exc:
            overloaded = exc.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in (exc.details() or "")
            if overloaded:
                seen.refused.append(time.perf_counter() - due)
            else:
                seen.other[exc.code().name] += 1
            return
        seen.admitted.append(time.perf_counter() - due)

    for channel in channels:
        await channel.channel_ready()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    pending: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    index = 0
    while (now := time.perf_counter()) < start + duration:
        due = start + index / rate
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(one(index, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        index += 1
    await asyncio.gather(*pending)
    for channel in channels:
        await channel.close()
    return seen


def _generator_process(target: str, model: str, rate: float, duration: float, start_at: float) -> _Samples:
    return asyncio.run(_open_loop(target, model, rate, duration, start_at))


# Time for every generator process to start and connect before the shared start.
_SPAWN_S = 3.0


def _offer(
    target: str,
    model: str,
    rate: float,
    duration: float,
    processes: int,
    run: OverloadRun,
    starting: Callable[[], None],
) -> None:
    """Send ``rate`` calls a second for ``duration`` s from ``processes`` processes; fill ``run``'s outcomes.

    ``starting`` is called as the calls begin (after the processes have had
    time to start). One Python process sends and completes about as many calls
    a second as a server answers on one core. Beyond that its own event loop
    falls behind, so a server on a bigger machine needs several.
    """
    if processes == 1:
        starting()
        seen = asyncio.run(_open_loop(target, model, rate, duration, time.time()))
    else:
        seen = _Samples()
        start_at = time.time() + _SPAWN_S
        share = (target, model, rate / processes, duration, start_at)
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = pool.map(_generator_process, *zip(*[share] * processes, strict=True))
            time.sleep(max(0.0, start_at - time.time()))
            starting()
            for part in parts:
                seen.add(part)
    run.admitted, run.refused, run.other = len(seen.admitted), len(seen.refused), dict(seen.other)
    run.send_lag_p99_ms = _percentile(seen.lags, 0.99) * 1e3
    if seen.admitted:
        run.admitted_p50_ms = statistics.median(seen.admitted) * 1e3
        run.admitted_p99_ms = _percentile(seen.admitted, 0.99) * 1e3
    if seen.refused:
        run.refused_p50_ms = statistics.median(seen.refused) * 1e3
        run.refused_p99_ms = _percentile(seen.refused, 0.99) * 1e3


def _share(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0%}"


def _percentile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] if values else math.nan


def run_overload(plan: OverloadPlan, out: pathlib.Path, server_cpus: frozenset[int] | None = None) -> OverloadRun:
    """Start a server whose limit is ``plan.limit`` and measure ``plan`` against it.

    ``server_cpus`` pins the server to those cores (taskset) and the generator to the others, so
    that on one machine the generator does not take the server's CPU.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp, generator_pinned(server_cpus) as generator_cpus:
        command = write_overload_repository(pathlib.Path(tmp), plan.limit)
        port = free_port()
        target = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", *command, "--port", str(port)]
        if server_cpus is not None:
            argv = on_cpus(argv, server_cpus)
        with running_server("infergate", argv, target, out / "overload-server.log", pathlib.Path.cwd()) as server:
            run = _measure(target, plan, server.pid)
            if generator_cpus is not None:  # pinned
                run.server_cpus = sorted(os.sched_getaffinity(server.pid))
                run.generator_cpus = sorted(generator_cpus)
    (out / f"overload-{plan.model}.json").write_text(json.dumps(asdict(run), indent=2))
    return run


def run_overload_against(
    target: str, plan: OverloadPlan, out: pathlib.Path, ready_timeout: float = 60.0
) -> OverloadRun:
    """The same against a server already serving :func:`write_overload_repository`'s models at ``target``.

    ``plan.limit`` should be the server's ``limits.max_inference_calls``: the capacity is measured
    with that many calls in flight. Its CPU share is read when it listens on this machine.
    ``plan.processes`` generator processes share the rate (see :func:`_offer`). It waits up to
    ``ready_timeout`` seconds for the model to be ready first.
    """
    out.mkdir(parents=True, exist_ok=True)
    wait_ready(target, None, ready_timeout, (plan.model,))  # a server started beside this command may still load
    host, _, port = target.rpartition(":")
    local = host.strip("[]") in ("127.0.0.1", "localhost", "::1")
    run = _measure(target, plan, listener_pid(int(port)) if local else None)
    (out / f"overload-{plan.model}.json").write_text(json.dumps(asdict(run), indent=2))
    return run


def _measure(target: str, plan: OverloadPlan, pid: int | None) -> OverloadRun:
    model, factor, duration, processes = plan.model, plan.factor, plan.duration, plan.processes
    capacity = run_closed_loop(
        LoadConfig(target=target, model=model, concurrency=plan.limit, duration=max(duration / 2, 2.0), warmup=1.0)
    ).requests_per_s
    run = OverloadRun(model, plan.limit, capacity, factor * capacity, duration, processes=processes)
    begun: list[float] = []  # the server's CPU seconds and the clock when the calls began

    def starting() -> None:
        if pid:
            begun[:] = [tree_cpu_seconds(pid), time.perf_counter()]

    _offer(target, model, factor * capacity, duration, processes, run, starting)
    if pid:
        cpu_before, wall_before = begun
        run.server_cpu_share = (tree_cpu_seconds(pid) - cpu_before) / (time.perf_counter() - wall_before)
    return run


def format_overload(runs: list[OverloadRun]) -> str:
    lines = [
        "| model | limit | capacity req/s | offered req/s | admitted | admitted p50 / p99 ms | refused "
        "| refused p50 / p99 ms | other | server CPU | generator lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.model} | {r.limit} | {r.capacity_per_s:.0f} | {r.offered_per_s:.0f} | {r.admitted} "
            f"| {r.admitted_p50_ms:.1f} / {r.admitted_p99_ms:.1f} | {r.refused} "
            f"| {r.refused_p50_ms:.1f} / {r.refused_p99_ms:.1f} | {r.other or '-'} | {_share(r.server_cpu_share)} "
            f"| {r.send_lag_p99_ms:.1f}{' (generator-bound: not a server figure)' if r.generator_bound else ''} |"
        )
    lines += [
        f"\n{r.model}: server pinned to cores {cpu_list(r.server_cpus)}, "
        f"generator to {cpu_list(r.generator_cpus or [])}"
        for r in runs
        if r.server_cpus is not None
    ]
    return "\n".join(lines)
