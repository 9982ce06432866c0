"""Shadow traffic: mirror a request to another version after the caller has its answer.

The caller never waits for a shadow call: :meth:`ShadowQueue.offer` only puts
a job on a bounded queue (dropping, and counting, when it is full) and returns.
A fixed number of tasks — created in :meth:`ShadowQueue.start`, stopped
by :meth:`ShadowQueue.aclose` — run the jobs through the shadow version's own
batcher and compare its outputs with the primary's. Shadow errors and slowness
are counted in :class:`ShadowStats`, never returned to anyone; a shadow that
fails ten times in a row is paused (its calls dropped, those already queued
too) for a back-off that doubles from 0.5 s up to 30 s, so a broken shadow
costs next to nothing.
Each pause is told to an optional :class:`ShadowEvents` (the audit log).
With :class:`ShadowSpans` (telemetry, when tracing), a shadow call of a traced
request gets a span of its own, linked to the request's (``offer`` captures it
in the caller's context), as a root: it runs after the caller's trace ended.

Lowering the shadow's thread priority (runner.py) is not enough on its own:
on a small machine the shadow still competes for caches, memory bandwidth and
the sibling hyperthread. So each (model, shadow version) may keep shadow
calls running for at most ``busy_share`` of wall time (``max_busy_fraction``
in the routing config, 10% by default); beyond it, copies are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from infergate.models.spec import Tensors

__all__ = [
    "OutputAgreement",
    "ShadowEvents",
    "ShadowJob",
    "ShadowQueue",
    "ShadowRecorder",
    "ShadowSpan",
    "ShadowSpans",
    "ShadowStats",
    "compare_outputs",
]

log = logging.getLogger(__name__)


PAUSE_AFTER_ERRORS = 10
PAUSE_MIN_S = 0.5
PAUSE_MAX_S = 30.0
MAX_BUSY_CREDIT_S = 0.5  # how much shadow busy time may be saved up for a burst
_MAX_DOUBLINGS = 16  # 0.5 s * 2**16 is far past PAUSE_MAX_S; caps the power before it overflows a float


@dataclass(slots=True)
class OutputAgreement:
    """Running agreement of one output between primary and shadow."""

    compared: int = 0
    max_abs_diff: float = 0.0  # the largest seen in any comparison
    sum_max_abs_diff: float = 0.0  # for the mean of the per-comparison maxima
    mismatched: int = 0  # shapes or types differed, or non-numeric values were unequal
    top1_rows: int = 0
    top1_agreed: int = 0

    @property
    def mean_max_abs_diff(self) -> float:
        return self.sum_max_abs_diff / self.compared if self.compared else 0.0


@dataclass(slots=True)
class ShadowStats:
    """What became of the shadow calls of one (model, shadow version)."""

    version: int
    model: str = ""
    sent: int = 0
    dropped: int = 0
    errors: int = 0
    compared: int = 0
    outputs: dict[str, OutputAgreement] = field(default_factory=dict)
    # A shadow that keeps failing is paused (its calls dropped) for a back-off that doubles up to a limit.
    consecutive_errors: int = 0
    paused_until: float = 0.0
    # Busy-time credit: shadow calls may keep this (model, version) busy for at most a share of wall time.
    busy_credit_s: float = MAX_BUSY_CREDIT_S
    credit_at: float = 0.0

    def has_credit(self, now: float, share: float) -> bool:
        """Accrue ``share`` seconds of credit per second (up to a cap); True while some is left."""
        if self.credit_at:
            self.busy_credit_s = min(self.busy_credit_s + (now - self.credit_at) * share, MAX_BUSY_CREDIT_S)
        self.credit_at = now
        return self.busy_credit_s > 0

    def failed(self, now: float) -> float | None:
        """Count one failed shadow call; returns the pause it starts (seconds), if this failure starts one."""
        self.errors += 1
        self.consecutive_errors += 1
        if self.consecutive_errors % PAUSE_AFTER_ERRORS:
            return None
        doublings = min(self.consecutive_errors // PAUSE_AFTER_ERRORS - 1, _MAX_DOUBLINGS)
        pause: float = min(PAUSE_MIN_S * 2.0**doublings, PAUSE_MAX_S)
        self.paused_until = now + pause
        return pause

    def record(self, primary: Tensors, shadow: Tensors) -> tuple[bool, float]:
        """Count one comparison; returns (whether every output agreed, the largest difference)."""
        self.consecutive_errors = 0
        self.compared += 1
        agreed, largest = True, 0.0
        for name, agreement in compare_outputs(primary, shadow).items():
            agreed = agreed and not agreement.mismatched and agreement.top1_agreed == agreement.top1_rows
            largest = max(largest, agreement.max_abs_diff)
            total = self.outputs.setdefault(name, OutputAgreement())
            total.compared += 1
            total.max_abs_diff = max(total.max_abs_diff, agreement.max_abs_diff)
            total.sum_max_abs_diff += agreement.max_abs_diff
            total.mismatched += agreement.mismatched
            total.top1_rows += agreement.top1_rows
            total.top1_agreed += agreement.top1_agreed
        return agreed, largest


def compare_outputs(primary: Tensors, shadow: Tensors) -> dict[str, OutputAgreement]:
    """Per output of the primary: max |difference|, and top-1 agreement for [rows, classes] scores."""
    out: dict[str, OutputAgreement] = {}
    for name, a in primary.items():
        b = shadow.get(name)
        result = OutputAgreement(compared=1)
        if b is None or a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            result.mismatched, result.max_abs_diff = 1, float("inf")
        elif a.dtype.kind in "biuf":
            if a.size:
                result.max_abs_diff, result.mismatched = _max_abs_diff(a, b)
            if a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] > 1:
                result.top1_rows = a.shape[0]
                result.top1_agreed = int(np.count_nonzero(a.argmax(axis=1) == b.argmax(axis=1)))
        elif not np.array_equal(a, b):  # BYTES and other non-numeric outputs: equal or not
            result.mismatched = 1
        out[name] = result
    return out


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Largest |a - b| (NaN against NaN agrees); a NaN on one side only is a mismatch, reported as inf."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(x) & np.isnan(y)
    with np.errstate(invalid="ignore"):  # inf - inf on both sides: agreement, handled below
        diff = np.where(both_nan | (x == y), 0.0, np.abs(x - y))
    if np.isnan(diff).any():
        return float("inf"), 1
    return float(diff.max()), 0


@dataclass(slots=True)
class ShadowJob:
    """Run ``call`` (the shadow version's inference) and compare with ``primary``."""

    call: Callable[[], Awaitable[Tensors]]
    primary: Tensors
    stats: ShadowStats
    timeout_s: float
    busy_share: float = 1.0  # the most of wall time its shadow calls may take (see ShadowStats.has_credit)


class ShadowRecorder(Protocol):
    """Where each shadow call's outcome goes besides ShadowStats (telemetry's ``record_shadow``)."""

    def __call__(
        self, model: str, *, agreement: bool | None, max_abs_diff: float | None, error: bool, dropped: bool
    ) -> None: ...


class ShadowEvents(Protocol):
    """Told of each pause of a failing shadow (the audit log); cheap, never raises, called on the event loop."""

    def shadow_paused(self, model: str, version: int, seconds: float, reason: str) -> None: ...


class ShadowSpan(Protocol):
    """One shadow call's span, current while the call runs."""

    def finish(self, *, agreed: bool | None, max_abs_diff: float | None, error: BaseException | None) -> None:
        """The call ended: compared (``agreed``: whether every output agreed; the largest difference)
        or failed with ``error``."""


class ShadowSpans(Protocol):
    """Traces shadow calls (``telemetry/shadows.py``)."""

    def capture(self) -> object | None:
        """In the caller's request: what links its shadow call to it; None when the request is not traced."""

    def open(self, captured: object, model: str, version: int) -> ShadowSpan:
        """A shadow call of the request ``captured`` starts, on ``version`` of ``model``."""


class ShadowQueue:
    """A bounded queue of shadow calls and the tasks that run them."""

    def __init__(
        self,
        max_size: int = 1024,
        concurrency: int = 4,
        recorder: ShadowRecorder | None = None,
        events: ShadowEvents | None = None,
        spans: ShadowSpans | None = None,
    ):
        self._recorder = recorder
        self._events = events
        self._spans = spans
        # Each job with what links it to its caller's trace (None: not traced).
        self._queue: asyncio.Queue[tuple[ShadowJob, object | None]] = asyncio.Queue(max_size)
        self._concurrency = concurrency  # shadow calls running at once
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"shadow-{i}") for i in range(self._concurrency)]

    def offer(self, job: ShadowJob, limit: int) -> bool:
        """Queue ``job`` unless ``limit`` jobs (or the queue's capacity) already wait; never blocks."""
        now = time.monotonic()
        stats = job.stats
        busy = self._queue.qsize() >= limit or not self._tasks
        if busy or now < stats.paused_until or not stats.has_credit(now, job.busy_share):
            self._dropped(job.stats)
            return False
        try:
            self._queue.put_nowait((job, self._spans.capture() if self._spans is not None else None))
        except asyncio.QueueFull:
            self._dropped(job.stats)
            return False
        job.stats.sent += 1
        return True

    async def _work(self) -> None:
        while True:
            job, captured = await self._queue.get()
            started = time.monotonic()
            if started < job.stats.paused_until:  # queued before its shadow was paused: dropped, never sent
                job.stats.sent -= 1
                self._dropped(job.stats)
                self._queue.task_done()
                continue
            span = None
            if self._spans is not None and captured is not None:
                span = self._spans.open(captured, job.stats.model, job.stats.version)
            agreed: bool | None = None
            largest: float | None = None
            error: BaseException | None = None
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that races a finished call.
                async with asyncio.timeout(job.timeout_s):
                    shadow = await job.call()
                agreed, largest = job.stats.record(job.primary, shadow)
                self._record(job.stats, agreement=agreed, max_abs_diff=largest, error=False, dropped=False)
            except asyncio.CancelledError as exc:
                error = exc
                self._dropped(job.stats)  # stopped by aclose: never compared
                raise
            except Exception as exc:  # a shadow's failure is counted, never anyone else's problem
                error = exc
                pause = job.stats.failed(time.monotonic())
                self._record(job.stats, agreement=None, max_abs_diff=None, error=True, dropped=False)
                log.debug("shadow call to version %d failed: %s", job.stats.version, exc)
                if pause is not None:
                    self._paused(job.stats, pause, exc)
            finally:
                if span is not None:
                    span.finish(agreed=agreed, max_abs_diff=largest, error=error)
                job.stats.busy_credit_s -= time.monotonic() - started
                self._queue.task_done()

    def _paused(self, stats: ShadowStats, seconds: float, error: Exception) -> None:
        # The error's kind, not its message: a runtime's message may quote a value from the request.
        reason = f"{stats.consecutive_errors} shadow calls failed in a row (the last: {type(error).__name__})"
        log.warning("model %s: shadow version %d paused for %gs: %s", stats.model, stats.version, seconds, reason)
        if self._events is not None:
            self._events.shadow_paused(stats.model, stats.version, seconds, reason)

    def _dropped(self, stats: ShadowStats) -> None:
        stats.dropped += 1
        self._record(stats, agreement=None, max_abs_diff=None, error=False, dropped=True)

    def _record(
        self, stats: ShadowStats, *, agreement: bool | None, max_abs_diff: float | None, error: bool, dropped: bool
    ) -> None:
        if self._recorder is not None:
            self._recorder(stats.model, agreement=agreement, max_abs_diff=max_abs_diff, error=error, dropped=dropped)

    async def aclose(self) -> None:
        """Stop the tasks; queued shadow calls are dropped (they were best-effort)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while not self._queue.empty():
            job, _ = self._queue.get_nowait()
            self._dropped(job.stats)
