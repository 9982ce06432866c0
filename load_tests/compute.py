"""The compute ceiling: onnxruntime ``session.run`` in-process, no server, no network.

For each batch size it runs the model back to back on the same random inputs
(after a short warm-up) for ``duration`` seconds and reports samples/s and the
per-call latency. What a server reaches against this figure is the share of the
model's own speed that survives the serving path, so the figure must be the
best the same compute can do: a :class:`Layout` says how the model runs, one
session with onnxruntime's own threads, or several sessions of a few threads
each, every one driven from a thread of its own (as infergate runs a model's
instances).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from infergate.models.datatypes import from_onnx_type

from .payloads import random_inputs
from .report import format_table
from .signature import ModelSignature, TensorSpec

__all__ = [
    "ComputeResult",
    "Layout",
    "feeds",
    "format_compute_table",
    "measure_batch",
    "open_session",
    "run_compute",
    "session_signature",
]

_WARMUP_CALLS = 5


@dataclass(frozen=True)
class Layout:
    """How the model runs in-process: ``sessions`` sessions of ``threads`` intra-op threads each (0:
    onnxruntime's own choice), every session driven back to back from a thread of its own."""

    sessions: int = 1
    threads: int = 0

    def __str__(self) -> str:
        sessions = f"{self.sessions} session{'s' if self.sessions > 1 else ''}"
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else "onnxruntime's threads"
        return f"{sessions} x {threads}"


@dataclass(frozen=True)
class ComputeResult:
    """One batch size of one model: throughput and per-call latency."""

    model: str
    batch: int
    calls: int
    seconds: float
    samples_per_s: float
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    intra_op_threads: int  # per session
    provider: str = "CPUExecutionProvider"
    sessions: int = 1  # run at the same time, each from a thread of its own

    @property
    def layout(self) -> Layout:
        return Layout(self.sessions, self.intra_op_threads)


def open_session(model_file: pathlib.Path, intra_op_threads: int = 0, provider: str = "CPUExecutionProvider") -> Any:
    """An onnxruntime session on ``provider`` alone; ``intra_op_threads`` 0 keeps onnxruntime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(model_file), sess_options=options, providers=[provider])


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, from_onnx_type(node.type).name, shape)


def session_signature(session: Any, name: str) -> ModelSignature:
    """The signature onnxruntime reports for ``session``."""
    return ModelSignature(
        name=name,
        inputs=tuple(_spec(node) for node in session.get_inputs()),
        outputs=tuple(_spec(node) for node in session.get_outputs()),
    )


def feeds(signature: ModelSignature, batch: int, seed: int = 0) -> dict[str, Any]:
    """Random inputs of ``batch`` rows, as onnxruntime takes them."""
    return _feeds(signature, batch, seed)


def _feeds(signature: ModelSignature, batch: int, seed: int = 0) -> dict[str, Any]:
    arrays = random_inputs(signature, batch, seed)
    # onnxruntime wants text, not bytes, for string tensors.
    return {
        spec.name: arrays[spec.name].astype(str) if spec.datatype == "BYTES" else arrays[spec.name]
        for spec in signature.inputs
    }


def measure_batch(
    sessions: Sequence[Any], signature: ModelSignature, batch: int, duration: float, threads: int, provider: str
) -> ComputeResult:
    """Run every one of ``sessions`` at ``batch``, all at once, each from a thread of its own, for ``duration``
    seconds after a few warm-up calls each (``threads``: the intra-op threads each session was opened with)."""
    feeds = _feeds(signature, batch)
    for session in sessions:
        for _ in range(_WARMUP_CALLS):
            session.run(None, feeds)
    with ThreadPoolExecutor(len(sessions), thread_name_prefix="compute") as pool:
        start = time.perf_counter()
        end = start + duration
        per_session = list(pool.map(lambda session: _back_to_back(session, feeds, end), sessions))
        seconds = time.perf_counter() - start
    latencies = [latency for each in per_session for latency in each]
    values = np.asarray(latencies) * 1000.0
    p50, p99 = np.percentile(values, [50, 99])
    return ComputeResult(
        model=signature.name,
        batch=batch,
        calls=len(latencies),
        seconds=seconds,
        samples_per_s=len(latencies) * batch / seconds,
        calls_per_s=len(latencies) / seconds,
        p50_ms=float(p50),
        p99_ms=float(p99),
        mean_ms=float(values.mean()),
        intra_op_threads=threads,
        provider=provider,
        sessions=len(sessions),
    )


def _back_to_back(session: Any, feeds: dict[str, Any], end: float) -> list[float]:
    """Run ``session`` until ``end`` (``time.perf_counter``); each call's seconds."""
    latencies: list[float] = []
    clock = time.perf_counter
    while (before := clock()) < end:
        session.run(None, feeds)
        latencies.append(clock() - before)
    return latencies


def run_compute(
    model_file: pathlib.Path,
    batches: Sequence[int],
    duration: float,
    layout: Layout = Layout(),
    name: str | None = None,
    provider: str = "CPUExecutionProvider",
) -> list[ComputeResult]:
    """Measure ``model_file`` at every batch size on ``provider``, one after another (numpy in and out), in
    ``layout`` (default: one session with onnxruntime's own threads)."""
    if duration <= 0 or not batches or min(batches) < 1:
        raise ValueError("need duration > 0 and batch sizes >= 1")
    if layout.sessions < 1 or layout.threads < 0:
        raise ValueError(f"need at least one session and threads >= 0, got {layout!r}")
    sessions = [open_session(model_file, layout.threads, provider) for _ in range(layout.sessions)]
    signature = session_signature(sessions[0], name or model_file.parent.parent.name)
    return [measure_batch(sessions, signature, batch, duration, layout.threads, provider) for batch in batches]


_COLUMNS = (
    ("model", "<", lambda r: r.model),
    ("batch", ">", lambda r: str(r.batch)),
    ("sessions", ">", lambda r: str(r.sessions)),
    ("threads", ">", lambda r: str(r.intra_op_threads or "default")),
    ("calls", ">", lambda r: str(r.calls)),
    ("samples/s", ">", lambda r: f"{r.samples_per_s:,.0f}"),
    ("calls/s", ">", lambda r: f"{r.calls_per_s:,.0f}"),
    ("p50 ms", ">", lambda r: f"{r.p50_ms:.3f}"),
    ("p99 ms", ">", lambda r: f"{r.p99_ms:.3f}"),
)


def compute_rows(results: Sequence[ComputeResult]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the compute table."""
    return [c[0] for c in _COLUMNS], [[c[2](r) for c in _COLUMNS] for r in results]


def format_compute_table(results: Sequence[ComputeResult]) -> str:
    """One line per (model, batch) under a header line."""
    return format_table([c[0] for c in _COLUMNS], [c[1] for c in _COLUMNS], compute_rows(results)[1])
