"""The closed-loop generator: N requests always in flight for a fixed time.

Timeline of one run, per generator process::

    ModelMetadata -> one validated request -> [warm-up | measurement window] -> drain

Each of the N in-flight slots is a task that sends a request, waits for the reply
and immediately sends the next. A request counts only if it *completes* inside
the measurement window ``[warmup, warmup + duration]``; after the window no new
request is sent, and the ones in flight finish within the per-call deadline.
Generator CPU time (``time.process_time``, all threads of the process) is sampled
at the window's edges.

With ``processes = K`` the concurrency is split over K spawned processes, each
with its own channel and event loop. They validate their first reply, report
ready, and start their clocks together on one event; their latencies are merged
before percentiles are taken.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .clients import CallFailed, Client, fetch_signature, open_client
from .payloads import InvalidResponse, random_inputs, validate_response
from .report import LoadResult, summarize_load
from .signature import ModelSignature

__all__ = ["CLIENTS", "GeneratorError", "LoadConfig", "run_closed_loop", "split_concurrency"]

CLIENTS = ("raw", "tritonclient")
_READY_TIMEOUT_S = 60.0  # spawning, importing and the first request of every process
_DRAIN_GRACE_S = 5.0


class GeneratorError(Exception):
    """The run could not be carried out (unreachable server, bad reply, dead process)."""


@dataclass(frozen=True)
class LoadConfig:
    """One closed-loop run. ``timeout`` is the per-call deadline in seconds."""

    target: str
    model: str
    batch: int = 1
    concurrency: int = 64
    duration: float = 10.0
    warmup: float = 2.0
    processes: int = 1
    client: str = "raw"
    timeout: float = 10.0
    seed: int = 0
    label: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # gRPC metadata on every call (e.g. a bearer token)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.concurrency < 1 or self.processes < 1:
            raise ValueError("batch, concurrency and processes must be at least 1")
        if self.processes > self.concurrency:
            raise ValueError(f"{self.processes} processes cannot share {self.concurrency} in flight")
        if self.duration <= 0 or self.warmup < 0 or self.timeout <= 0:
            raise ValueError("duration and timeout must be > 0, warmup >= 0")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}")


@dataclass(frozen=True)
class _Window:
    start: float  # time.perf_counter() values
    end: float


@dataclass
class _WorkerResult:
    latencies_s: list[float]
    errors: dict[str, int]
    cpu_s: float
    cpu_span_s: float
    response: str


def split_concurrency(total: int, parts: int) -> list[int]:
    """Split ``total`` in-flight requests over ``parts`` processes as evenly as possible."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def _closed_loop(
    send: Callable[[], Awaitable[None]],
    window: _Window,
    latencies: list[float],
    errors: Counter[str],
) -> None:
    clock = time.perf_counter
    while (started := clock()) < window.end:
        try:
            await send()
        except CallFailed as exc:
            if window.start <= clock() <= window.end:
                errors[exc.code] += 1
            continue
        done = clock()
        if window.start <= done <= window.end:
            latencies.append(done - started)


async def _cpu_in_window(window: _Window) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) between the window's edges."""
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def _measure(client: Client, config: LoadConfig, concurrency: int, response: str) -> _WorkerResult:
    now = time.perf_counter()
    window = _Window(now + config.warmup, now + config.warmup + config.duration)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    cpu = asyncio.create_task(_cpu_in_window(window))
    loops = [asyncio.create_task(_closed_loop(client.send, window, latencies, errors)) for _ in range(concurrency)]
    bound = config.warmup + config.duration + config.timeout + _DRAIN_GRACE_S
    # asyncio.wait, not gather: on cancellation the tasks stay owned by asyncio.run,
    # which cancels and reaps them without "exception never retrieved" noise.
    done, pending = await asyncio.wait(loops, timeout=bound)
    if pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending)
        raise GeneratorError(f"requests still in flight {bound:.0f}s after the start")
    for task in done:
        task.result()  # re-raise an unexpected error of a loop
    cpu_s, span_s = await cpu
    return _WorkerResult(latencies, dict(errors), cpu_s, span_s, response)


async def _worker(
    config: LoadConfig, signature: ModelSignature, concurrency: int, on_ready: Callable[[], None]
) -> _WorkerResult:
    arrays = random_inputs(signature, config.batch, config.seed)
    client = open_client(config.client, config.target, signature, arrays, config.timeout, config.headers)
    try:
        try:
            response = validate_response(await client.first(), signature, config.batch)
        except (CallFailed, InvalidResponse) as exc:
            raise GeneratorError(f"first ModelInfer of {config.model!r}: {exc}") from None
        on_ready()
        return await _measure(client, config, concurrency, response)
    finally:
        await client.close()


def _child(
    index: int,
    config: LoadConfig,
    signature: ModelSignature,
    concurrency: int,
    messages: Any,
    start: Any,
) -> None:
    """Body of one generator process: reports ('ready'|'result'|'error', index, payload)."""

    def ready() -> None:
        messages.put(("ready", index, None))
        if not start.wait(_READY_TIMEOUT_S):
            raise GeneratorError("no start signal from the parent")

    try:
        result = asyncio.run(_worker(config, signature, concurrency, ready))
    except BaseException as exc:  # reported to the parent, which raises it
        messages.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    messages.put(("result", index, result))


def _collect(messages: Any, kind: str, count: int, timeout: float) -> dict[int, Any]:
    """Wait for ``count`` messages of ``kind``; raises GeneratorError on an error or timeout."""
    deadline = time.monotonic() + timeout
    received: dict[int, Any] = {}
    while len(received) < count:
        try:
            got, index, payload = messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise GeneratorError(f"generator processes: no '{kind}' within {timeout:.0f}s") from None
        if got == "error":
            raise GeneratorError(f"generator process {index}: {payload}")
        received[index] = payload
    return received


def _run_processes(config: LoadConfig, signature: ModelSignature) -> list[_WorkerResult]:
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    start = context.Event()
    shares = split_concurrency(config.concurrency, config.processes)
    processes = [
        context.Process(target=_child, args=(i, config, signature, share, messages, start), daemon=True)
        for i, share in enumerate(shares)
    ]
    try:
        for process in processes:
            process.start()
        _collect(messages, "ready", len(processes), _READY_TIMEOUT_S)
        start.set()
        bound = config.warmup + config.duration + config.timeout + 2 * _DRAIN_GRACE_S
        results = _collect(messages, "result", len(processes), bound)
        return [results[i] for i in range(len(processes))]
    finally:
        for process in processes:
            process.join(timeout=_DRAIN_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join(timeout=_DRAIN_GRACE_S)


def _merge(config: LoadConfig, workers: list[_WorkerResult]) -> LoadResult:
    errors: Counter[str] = Counter()
    for worker in workers:
        errors.update(worker.errors)
    return summarize_load(
        target=config.target,
        model=config.model,
        client=config.client,
        batch=config.batch,
        concurrency=config.concurrency,
        processes=config.processes,
        warmup_s=config.warmup,
        duration_s=config.duration,
        latencies_s=[lat for worker in workers for lat in worker.latencies_s],
        errors=dict(errors),
        cpu_s=sum(worker.cpu_s for worker in workers),
        cpu_span_s=max(worker.cpu_span_s for worker in workers),
        response=workers[0].response,
        label=config.label,
    )


def run_closed_loop(config: LoadConfig) -> LoadResult:
    """Run one closed-loop measurement; raises GeneratorError if it cannot be done.

    Calls ModelMetadata first to learn the inputs, then runs in this process
    (``processes == 1``) or in ``processes`` spawned ones.
    """
    try:
        signature = asyncio.run(fetch_signature(config.target, config.model, config.timeout, config.headers))
    except CallFailed as exc:
        raise GeneratorError(f"ModelMetadata({config.model!r}) at {config.target}: {exc}") from None
    if config.processes == 1:
        workers = [asyncio.run(_worker(config, signature, config.concurrency, lambda: None))]
    else:
        workers = _run_processes(config, signature)
    return _merge(config, workers)
