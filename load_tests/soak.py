"""Soak: mixed load against one server for N minutes while its memory and open files are sampled.

``concurrency`` callers each run one operation after another, picked at random
by weight (:data:`OPERATIONS`): ModelInfer on a weighted mix of models (by
default every demo model), ModelStreamInfer streams of a few requests,
metadata and statistics reads, a call on a fresh connection, and calls that
must fail: a wrong shape (INVALID_ARGUMENT), an unknown model (NOT_FOUND), a
1 ms deadline (DEADLINE_EXCEEDED, or OK on a fast enough server) and a stream
the client cancels after its first answer. Any other outcome is *unexpected*.

Every ``sample_seconds`` the server's process tree is read from /proc
(procstat.py): resident memory (RSS), open file descriptors, threads. The
verdict is the RSS growth from the end of the warm-up (minute 2 by default, or
half the run when that is shorter) to the end, each the median of three
samples, against a bound (5%): memory that keeps growing under a steady load
is a leak.
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.demo import write_demo_repository

from .clients import CHANNEL_OPTIONS
from .payloads import build_infer_request, random_inputs
from .procfs import ProcessUsage, listener_pid, usage
from .servers import free_port, running_server
from .signature import signature_from_metadata

__all__ = ["DEFAULT_MODELS", "OPERATIONS", "Sample", "SoakConfig", "format_report", "rss_growth", "run_soak", "soak"]

DEFAULT_MODELS = "matmul16:4,mlp:2,cnn:1,multi_io:1,identity_all:1"
UNKNOWN_MODEL = "soak-no-such-model"
STREAM_LENGTH = 4
_LEVEL_SAMPLES = 3  # a level is the median of this many samples: one sample can catch a passing peak


@dataclass(frozen=True)
class SoakConfig:
    minutes: float
    models: tuple[tuple[str, float], ...]
    concurrency: int = 8
    sample_seconds: float = 5.0
    warmup_minutes: float = 2.0
    bound_percent: float = 5.0
    call_timeout: float = 10.0
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    """The server's process tree at ``t`` seconds into the run, and the calls finished by then."""

    t: float
    rss_bytes: int
    fds: int
    threads: int
    processes: int
    calls: int


class Unexpected(Exception):
    """A call that returned OK with a wrong answer."""


@dataclass
class Tally:
    """Outcomes (status code names) per operation, and the first few unexpected ones in words."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    unexpected_count: int = 0

    def record(self, operation: Operation, outcome: str, detail: str) -> None:
        self.outcomes[(operation.name, outcome)] += 1
        if outcome not in operation.expected:
            self.unexpected_count += 1
            if len(self.unexpected) < 10:
                self.unexpected.append(f"{operation.name}: {outcome}: {detail[:200]}")

    @property
    def calls(self) -> int:
        return sum(self.outcomes.values())


class Workload:
    """The operations, over one shared channel (``new_connection`` opens its own)."""

    def __init__(self, target: str, requests: dict[str, pb.ModelInferRequest], config: SoakConfig) -> None:
        self._target = target
        self._requests = requests
        self._names = list(requests)
        self._weights = [dict(config.models)[name] for name in self._names]
        self._timeout = config.call_timeout
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def _request(self, rng: random.Random) -> pb.ModelInferRequest:
        return self._requests[rng.choices(self._names, self._weights)[0]]

    async def unary(self, rng: random.Random) -> str:
        await self._stub.ModelInfer(self._request(rng), timeout=self._timeout)
        return "OK"

    async def stream(self, rng: random.Random) -> str:
        call = self._stub.ModelStreamInfer(timeout=self._timeout)
        for _ in range(STREAM_LENGTH):
            await call.write(self._request(rng))
        await call.done_writing()
        answers = [answer async for answer in call]
        errors = [answer.error_message for answer in answers if answer.error_message]
        if errors or len(answers) != STREAM_LENGTH:
            raise Unexpected(f"{len(answers)} answers to {STREAM_LENGTH} requests; errors: {errors[:2]}")
        return "OK"

    async def metadata(self, rng: random.Random) -> str:
        name = rng.choice(self._names)
        await self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=self._timeout)
        await self._stub.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=self._timeout)
        return "OK"

    async def new_connection(self, rng: random.Random) -> str:
        async with grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            await stub.ModelInfer(self._request(rng), timeout=self._timeout)
        return "OK"

    async def bad_shape(self, rng: random.Random) -> str:
        request = pb.ModelInferRequest()
        request.CopyFrom(self._request(rng))
        request.inputs[0].shape[-1] += 1  # the contents no longer fit the shape
        await self._stub.ModelInfer(request, timeout=self._timeout)
        return "OK"

    async def unknown_model(self, rng: random.Random) -> str:
        request = pb.ModelInferRequest()
        request.CopyFrom(self._request(rng))
        request.model_name = UNKNOWN_MODEL  # one fixed name: a soak must not grow label sets on purpose
        await self._stub.ModelInfer(request, timeout=self._timeout)
        return "OK"

    async def short_deadline(self, rng: random.Random) -> str:
        await self._stub.ModelInfer(self._request(rng), timeout=0.001)
        return "OK"

    async def cancelled_stream(self, rng: random.Random) -> str:
        call = self._stub.ModelStreamInfer(timeout=self._timeout)
        await call.write(self._request(rng))
        await call.write(self._request(rng))
        await call.read()
        call.cancel()  # with a request still in the server's hands
        return "CANCELLED"

    async def close(self) -> None:
        await self._channel.close()


@dataclass(frozen=True)
class Operation:
    name: str
    weight: float
    expected: frozenset[str]


def _expect(*codes: str) -> frozenset[str]:
    return frozenset(codes)


OPERATIONS: tuple[Operation, ...] = (
    Operation("unary", 60, _expect("OK")),
    Operation("stream", 12, _expect("OK")),
    Operation("metadata", 5, _expect("OK")),
    Operation("new_connection", 4, _expect("OK")),
    Operation("bad_shape", 5, _expect("INVALID_ARGUMENT")),
    Operation("unknown_model", 4, _expect("NOT_FOUND")),
    Operation("short_deadline", 6, _expect("DEADLINE_EXCEEDED", "OK")),
    Operation("cancelled_stream", 4, _expect("CANCELLED")),
)


async def _model_requests(target: str, config: SoakConfig) -> dict[str, pb.ModelInferRequest]:
    """One ModelInferRequest of random batch-1 inputs per model, shaped by its ModelMetadata."""
    requests = {}
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for index, (name, _) in enumerate(config.models):
            try:
                reply = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=config.call_timeout)
            except grpc.aio.AioRpcError as exc:
                raise ValueError(f"model {name!r} at {target}: {exc.code().name}: {exc.details()}") from None
            signature = signature_from_metadata(reply)
            requests[name] = build_infer_request(signature, random_inputs(signature, 1, config.seed + index))
    return requests


async def _caller(workload: Workload, rng: random.Random, stop: asyncio.Event, tally: Tally) -> None:
    weights = [operation.weight for operation in OPERATIONS]
    while not stop.is_set():
        operation = rng.choices(OPERATIONS, weights)[0]
        run: Callable[[random.Random], Awaitable[str]] = getattr(workload, operation.name)
        try:
            outcome, detail = await run(rng), ""
        except grpc.aio.AioRpcError as exc:
            outcome, detail = exc.code().name, exc.details() or ""
        except Unexpected as exc:
            outcome, detail = "WRONG_ANSWER", str(exc)
        tally.record(operation, outcome, detail)


def _sample(pid: int, started: float, tally: Tally) -> Sample:
    now: ProcessUsage = usage(pid)
    return Sample(round(time.monotonic() - started, 3), now.rss_bytes, now.fds, now.threads, now.processes, tally.calls)


def _progress(sample: Sample, first: Sample, tally: Tally) -> None:
    growth = (sample.rss_bytes - first.rss_bytes) / first.rss_bytes * 100
    sys.stderr.write(
        f"{sample.t:7.0f}s  rss {sample.rss_bytes / 2**20:8.1f} MiB ({growth:+5.1f}% since start)  "
        f"fds {sample.fds:4d}  threads {sample.threads:3d}  calls {sample.calls:,}  "
        f"unexpected {tally.unexpected_count}\n"
    )


async def _sampler(pid: int, interval: float, started: float, samples: list[Sample], tally: Tally) -> None:
    """Sample every ``interval`` seconds until cancelled (reading /proc takes a few ms: fine on the loop)."""
    while True:
        samples.append(_sample(pid, started, tally))
        _progress(samples[-1], samples[0], tally)
        await asyncio.sleep(interval)


async def soak(target: str, pid: int, config: SoakConfig) -> dict[str, Any]:
    """Run the mixed load for ``config.minutes`` against ``target`` (served by process ``pid``); the report."""
    workload = Workload(target, await _model_requests(target, config), config)
    tally, stop = Tally(), asyncio.Event()
    samples: list[Sample] = []
    started = time.monotonic()
    sampler = asyncio.create_task(_sampler(pid, config.sample_seconds, started, samples, tally))
    callers = [
        asyncio.create_task(_caller(workload, random.Random(config.seed * 1000 + i), stop, tally))
        for i in range(config.concurrency)
    ]
    try:
        await asyncio.sleep(config.minutes * 60)
    finally:
        stop.set()
        await asyncio.gather(*callers, return_exceptions=True)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await workload.close()
    samples.append(_sample(pid, started, tally))
    return _report(config, samples, tally)


def run_soak(
    config: SoakConfig,
    out: pathlib.Path,
    target: str | None = None,
    pid: int | None = None,
    server_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Soak ``target`` (its server found by its port unless ``pid`` is given), or, without a target,
    a server started here over the demo repository (its log in ``out/server.log``), always stopped."""
    if target is not None:
        port = int(target.rsplit(":", 1)[1])
        pid = pid or listener_pid(port)
        if pid is None:
            raise ValueError(f"no process listening on port {port} is visible here: pass --pid")
        return asyncio.run(soak(target, pid, config))
    with tempfile.TemporaryDirectory(prefix="soak-models-") as repository:
        write_demo_repository(pathlib.Path(repository))
        port = free_port()
        target = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", repository]
        argv += ["--host", "127.0.0.1", "--port", str(port), *server_args]
        with running_server("infergate", argv, target, out / "server.log", pathlib.Path.cwd(), 120.0) as server:
            return asyncio.run(soak(target, server.pid, config))


def rss_growth(samples: list[Sample], warmup_s: float, bound_percent: float) -> dict[str, Any]:
    """RSS growth from the first sample at or after ``warmup_s`` to the end, each a median of a few samples."""
    start = next((i for i, s in enumerate(samples) if s.t >= warmup_s), len(samples) - 1)
    start = min(start, max(0, len(samples) - _LEVEL_SAMPLES))  # keep a whole level before the end one
    before = int(statistics.median(s.rss_bytes for s in samples[start : start + _LEVEL_SAMPLES]))
    after = int(statistics.median(s.rss_bytes for s in samples[-_LEVEL_SAMPLES:]))
    percent = (after - before) / before * 100
    return {
        "from_s": samples[start].t,
        "to_s": samples[-1].t,
        "from_bytes": before,
        "to_bytes": after,
        "growth_percent": round(percent, 2),
        "bound_percent": bound_percent,
        "within_bound": percent < bound_percent,
    }


def _report(config: SoakConfig, samples: list[Sample], tally: Tally) -> dict[str, Any]:
    warmup_s = min(config.warmup_minutes * 60, samples[-1].t / 2)
    start = next((s for s in samples if s.t >= warmup_s), samples[-1])
    per_operation: dict[str, dict[str, int]] = {}
    for (name, outcome), count in sorted(tally.outcomes.items()):
        per_operation.setdefault(name, {})[outcome] = count
    return {
        "config": {**asdict(config), "models": dict(config.models)},
        "duration_s": samples[-1].t,
        "calls": tally.calls,
        "operations": per_operation,
        "unexpected": {"count": tally.unexpected_count, "first": tally.unexpected},
        "rss": rss_growth(samples, warmup_s, config.bound_percent),
        "fds": {"from": start.fds, "to": samples[-1].fds, "growth": samples[-1].fds - start.fds},
        "threads": {"from": start.threads, "to": samples[-1].threads, "growth": samples[-1].threads - start.threads},
        "samples": [asdict(s) for s in samples],
    }


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal: calls, outcomes, growth and the verdict."""
    rss = report["rss"]
    lines = [f"{report['calls']:,} calls in {report['duration_s']:.0f} s"]
    for name, outcomes in report["operations"].items():
        lines.append(f"  {name:<17} " + ", ".join(f"{outcome} {count:,}" for outcome, count in outcomes.items()))
    lines += [
        f"unexpected outcomes: {report['unexpected']['count']}",
        *(f"  {line}" for line in report["unexpected"]["first"]),
        f"RSS {rss['from_bytes'] / 2**20:.1f} MiB at {rss['from_s']:.0f} s -> {rss['to_bytes'] / 2**20:.1f} MiB "
        f"at {rss['to_s']:.0f} s: {rss['growth_percent']:+.2f}% "
        f"({'within' if rss['within_bound'] else 'OVER'} the {rss['bound_percent']:g}% bound)",
        f"open files {report['fds']['from']} -> {report['fds']['to']}, "
        f"threads {report['threads']['from']} -> {report['threads']['to']}",
    ]
    return "\n".join(lines)
