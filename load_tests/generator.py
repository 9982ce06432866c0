"""Runs one load measurement (closed or open loop) over one or several generator processes.

Timeline of one run, per generator process::

    ModelMetadata -> one validated request per model -> [warm-up | measurement window] -> drain

The loops themselves (and what counts as measured) are in ``loops``. A run is
time-limited (``duration``) or count-limited (``requests``: the window ends at
the N-th measured request). The model may be a weighted mix
(``"mlp:3,matmul16:1"``): each request picks one at random by weight. Inputs are
random tensors of the model's metadata shapes, or arrays from ``.npy`` files.
Generator CPU time (``time.process_time``, all threads) is sampled at the
window's edges.

With ``processes = K`` the concurrency, rate and request count are split over K
spawned processes, each with its own channel and event loop. They validate
their first reply, report ready, and start their clocks together on one event;
their latencies are merged before percentiles are taken.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .clients import CallFailed, Client, auth_metadata, fetch_signature, open_client
from .loops import Tally, Window, closed_loop, cpu_in_window, open_loop, show_progress
from .mix import Mix, parse_mix
from .payloads import InvalidResponse, load_inputs, validate_response
from .report import LoadResult, summarize_load
from .signature import ModelSignature

__all__ = [
    "CLIENTS",
    "MODES",
    "GeneratorError",
    "LoadConfig",
    "parse_mix",
    "run_closed_loop",
    "run_load",
    "split_concurrency",
]

CLIENTS = ("raw", "tritonclient", "sdk")
MODES = ("closed", "open")
_READY_TIMEOUT_S = 60.0  # spawning, importing and the first request of every process
_DRAIN_GRACE_S = 5.0


class GeneratorError(Exception):
    """The run could not be carried out (unreachable server, bad reply, dead process)."""


@dataclass(frozen=True)
class LoadConfig:
    """One run. ``timeout`` is the per-call deadline in seconds; ``rate`` (req/s) is for open loop.

    ``requests`` makes the run count-limited (``duration`` is then ignored);
    ``inputs`` maps input names to ``.npy`` files (their rows are then the batch the result reports, whatever
    ``batch`` says); ``token`` is sent as a bearer token.
    ``deadline`` False sends calls without a gRPC deadline, as perf_analyzer does
    (``timeout`` still bounds the run); the ``sdk`` client always sends one.
    """

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
    mode: str = "closed"
    rate: float = 0.0
    requests: int | None = None
    token: str = ""
    inputs: tuple[tuple[str, str], ...] = ()
    max_in_flight: int = 10_000
    progress: bool = False
    deadline: bool = True
    connections: int = 1  # per process and model: several spread over the workers of a --workers N server

    def __post_init__(self) -> None:
        if self.batch < 1 or self.concurrency < 1 or self.processes < 1:
            raise ValueError("batch, concurrency and processes must be at least 1")
        if self.mode == "closed" and self.processes > self.concurrency:
            raise ValueError(f"{self.processes} processes cannot share {self.concurrency} in flight")
        if self.duration <= 0 or self.warmup < 0 or self.timeout <= 0:
            raise ValueError("duration and timeout must be > 0, warmup >= 0")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError("an open-loop run needs a rate > 0 requests/s")
        if self.requests is not None and self.requests < self.processes:
            raise ValueError(f"{self.requests} requests cannot be split over {self.processes} processes")
        if self.connections < 1:
            raise ValueError("connections must be at least 1")
        if self.connections > 1 and self.client != "raw":
            raise ValueError("several connections per process need the raw client")
        parse_mix(self.model)


@dataclass
class _WorkerResult:
    latencies_s: list[float]
    errors: dict[str, int]
    lags_s: list[float]
    cpu_s: float
    cpu_span_s: float
    window_s: float
    response: str
    batch: int  # rows per request: the .npy files' when they give the inputs, else the config's


def split_concurrency(total: int, parts: int) -> list[int]:
    """Split ``total`` in-flight requests over ``parts`` processes as evenly as possible."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class _Share:
    """One process's part of the run."""

    index: int
    concurrency: int
    rate: float
    requests: int | None


def _shares(config: LoadConfig) -> list[_Share]:
    k = config.processes
    concurrency = split_concurrency(config.concurrency, k) if config.mode == "closed" else [1] * k
    counts = split_concurrency(config.requests, k) if config.requests is not None else [None] * k
    return [_Share(i, concurrency[i], config.rate / k, counts[i]) for i in range(k)]


async def _measure(send: Callable[[], Any], config: LoadConfig, share: _Share) -> _WorkerResult:
    now = time.perf_counter()
    start = now + config.warmup
    window = Window(start, start + config.duration if share.requests is None else math.inf, share.requests)
    tally = Tally([], Counter())
    cpu = asyncio.create_task(cpu_in_window(window))
    if config.mode == "closed":
        loops = [asyncio.create_task(closed_loop(send, window, tally)) for _ in range(share.concurrency)]
    else:
        seed = config.seed * 1000 + share.index
        loops = [asyncio.create_task(open_loop(send, window, share.rate, tally, seed, config.max_in_flight))]
    progress = None
    if config.progress and share.index == 0:
        label = config.label or config.model + (f" (process 1 of {config.processes})" if config.processes > 1 else "")
        duration = config.duration if share.requests is None else None
        progress = asyncio.create_task(show_progress(window, tally, label, duration))
    try:
        await _wait_loops(loops, config, window)
    finally:
        if progress is not None:
            progress.cancel()
            sys.stderr.write("\n")
    cpu_s, span_s = await cpu
    seconds = window.end - window.start
    return _WorkerResult(tally.latencies, dict(tally.errors), tally.lags, cpu_s, span_s, seconds, "", config.batch)


async def _wait_loops(loops: list[asyncio.Task[None]], config: LoadConfig, window: Window) -> None:
    # A count-limited window has no fixed end: bound it by the per-call deadline after each request, roughly.
    budget = config.duration if window.limit is None else window.limit * config.timeout
    bound = config.warmup + budget + config.timeout + _DRAIN_GRACE_S
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


async def _worker(
    config: LoadConfig, signatures: dict[str, ModelSignature], share: _Share, on_ready: Callable[[], None]
) -> _WorkerResult:
    metadata = auth_metadata(config.token)
    clients: list[Client] = []
    weights: list[float] = []
    summaries = []
    batches: set[int] = set()
    connections = config.connections
    try:
        for name, weight in parse_mix(config.model):
            signature = signatures[name]
            arrays = load_inputs(signature, config.batch, dict(config.inputs), config.seed)
            timeout = config.timeout if config.deadline else None
            batch = next(iter(arrays.values())).shape[0] if signature.batched else config.batch
            batches.add(batch)
            for _ in range(connections):  # each one its own connection when there are several
                client = open_client(config.client, config.target, signature, arrays, timeout, metadata,
                                     own_connection=connections > 1)  # fmt: skip
                clients.append(client)
                weights.append(weight / connections)
                try:
                    summary = validate_response(await client.first(), signature, batch)
                except (CallFailed, InvalidResponse) as exc:
                    raise GeneratorError(f"first ModelInfer of {name!r}: {exc}") from None
            summaries.append(summary)
        if len(batches) > 1:  # samples/s is requests/s times one batch size
            sizes = " and ".join(str(b) for b in sorted(batches))
            raise GeneratorError(f"the models of {config.model!r} send batches of {sizes} rows: give them one size")
        on_ready()
        mix = Mix(clients, weights, config.seed + share.index)
        result = await _measure(mix.send, config, share)
        result.response, result.batch = "; ".join(summaries), batches.pop()
        return result
    finally:
        for client in clients:
            await client.close()


def _child(config: LoadConfig, signatures: dict[str, ModelSignature], share: _Share, messages: Any, start: Any) -> None:
    """Body of one generator process: reports ('ready'|'result'|'error', index, payload)."""

    def ready() -> None:
        messages.put(("ready", share.index, None))
        if not start.wait(_READY_TIMEOUT_S):
            raise GeneratorError("no start signal from the parent")

    try:
        result = asyncio.run(_worker(config, signatures, share, ready))
    except BaseException as exc:  # reported to the parent, which raises it
        messages.put(("error", share.index, f"{type(exc).__name__}: {exc}"))
        return
    messages.put(("result", share.index, result))


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


def _run_processes(config: LoadConfig, signatures: dict[str, ModelSignature]) -> list[_WorkerResult]:
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    start = context.Event()
    shares = _shares(config)
    processes = [
        context.Process(target=_child, args=(config, signatures, share, messages, start), daemon=True)
        for share in shares
    ]
    try:
        for process in processes:
            process.start()
        _collect(messages, "ready", len(processes), _READY_TIMEOUT_S)
        start.set()
        budget = config.duration if config.requests is None else config.requests * config.timeout
        bound = config.warmup + budget + config.timeout + 2 * _DRAIN_GRACE_S
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
        batch=workers[0].batch,  # what the requests carried (an .npy input's rows), whatever --batch said
        concurrency=config.concurrency if config.mode == "closed" else 0,
        processes=config.processes,
        warmup_s=config.warmup,
        duration_s=max(worker.window_s for worker in workers),
        latencies_s=[lat for worker in workers for lat in worker.latencies_s],
        lags_s=[lag for worker in workers for lag in worker.lags_s],
        errors=dict(errors),
        cpu_s=sum(worker.cpu_s for worker in workers),
        cpu_span_s=max(worker.cpu_span_s for worker in workers),
        response=workers[0].response,
        label=config.label,
        mode=config.mode,
        rate=config.rate if config.mode == "open" else math.nan,
        deadline=config.deadline,
    )


async def _signatures(config: LoadConfig) -> dict[str, ModelSignature]:
    metadata = auth_metadata(config.token)
    signatures = {}
    for name, _ in parse_mix(config.model):
        try:
            signatures[name] = await fetch_signature(config.target, name, config.timeout, metadata)
        except CallFailed as exc:
            raise GeneratorError(f"ModelMetadata({name!r}) at {config.target}: {exc}") from None
    return signatures


def run_load(config: LoadConfig) -> LoadResult:
    """Run one measurement; raises GeneratorError if it cannot be done.

    Calls ModelMetadata first to learn the inputs, then runs in this process
    (``processes == 1``) or in ``processes`` spawned ones.
    """
    signatures = asyncio.run(_signatures(config))
    if config.processes == 1:
        share = _shares(config)[0]
        workers = [asyncio.run(_worker(config, signatures, share, lambda: None))]
    else:
        workers = _run_processes(config, signatures)
    return _merge(config, workers)


run_closed_loop = run_load  # its name before open loop existed; the suite and other scripts import it
