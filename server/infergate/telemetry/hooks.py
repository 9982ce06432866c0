"""The model hooks: what telemetry does when a request is queued and when its batch ran.

A request's span is captured when it is submitted (it travels through the
batcher as an opaque tag). When its batch finished, each request gets a
``queue`` child span covering its wait, and the batch gets one span of its own
— a root, since it serves many traces — **linked** to every request's span.
Metrics are recorded from the same event that feeds ModelStatistics.

Lifetime: a version holds its :class:`ModelHooks`, the hooks hold the
version's queue-depth reader, and everything else here holds the hooks only
weakly, so nothing in telemetry keeps a retired version alive.
:meth:`RepositoryHooks.forget` removes a version's own series (its queue-depth
gauge and batch histograms) the moment it stops serving, and its batches still
draining are traced but no longer measured, so they cannot bring them back.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, Tracer

from infergate.models.stats import BatchTimings, ModelObserver
from infergate.telemetry.metrics import ServerMetrics

__all__ = ["ModelHooks", "RepositoryHooks"]


class RepositoryHooks:
    """The repository's observer: counts loads and gives each loaded version its hooks."""

    def __init__(self, tracer: Tracer | None, metrics: ServerMetrics | None):
        self._tracer = tracer
        self._metrics = metrics
        # Per version, the hooks handed out and not yet forgotten (two while a reload replaces one).
        self._serving: dict[tuple[str, int], list[weakref.ref[ModelHooks]]] = {}

    def model_loaded(self, name: str, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.record_model_load(name, ok)

    def for_model(self, name: str, version: int, queue_depth: Callable[[], int], owner: object) -> ModelObserver:
        hooks = ModelHooks(name, version, self._tracer, self._metrics, queue_depth, owner)
        if self._metrics is not None:
            self._serving.setdefault((name, version), []).append(weakref.ref(hooks))
            self._metrics.watch_queue(name, version, hooks)  # weakly too: the owner holds its hooks
        return hooks

    def forget(self, name: str, version: int, owner: object) -> None:
        """``owner`` left service; when no replacement serves its version, neither do its series."""
        key = (name, version)
        live = [hooks for ref in self._serving.pop(key, ()) if (hooks := ref()) is not None]
        leaving = [hooks for hooks in live if hooks.owned_by(owner)]
        staying = [weakref.ref(hooks) for hooks in live if not hooks.owned_by(owner)]
        if staying:
            self._serving[key] = staying
        if not leaving or staying or self._metrics is None:
            return  # never handed hooks, or a reload: the replacement's gauge is watched, the series go on
        for hooks in leaving:
            hooks.stop_measuring()
        self._metrics.forget(name, version)


class ModelHooks:
    """One model version's :class:`~infergate.stats.ModelObserver`, and the source of its queue-depth gauge."""

    def __init__(
        self,
        name: str,
        version: int,
        tracer: Tracer | None,
        metrics: ServerMetrics | None,
        queue_depth: Callable[[], int] = lambda: 0,
        owner: object = None,
    ):
        self._owner = weakref.ref(owner) if owner is not None else None
        self._name = name
        self._version = version
        self._tracer = tracer
        self._metrics = metrics
        self._queue_depth = queue_depth
        self._attributes = {"infergate.model.name": name, "infergate.model.version": str(version)}

    def queue_depth(self) -> int:
        return self._queue_depth()

    def owned_by(self, owner: object) -> bool:
        return self._owner is not None and self._owner() is owner

    def stop_measuring(self) -> None:
        """The version's series are gone: its batches still draining are traced but not measured."""
        self._metrics = None

    def capture(self) -> object:
        """The current request's span when it records (else None: nothing to link or time)."""
        if self._tracer is None:
            return None
        span = trace.get_current_span()
        return span if span.is_recording() else None

    def batch(
        self, tags: Sequence[object], rows: int, enqueued: Sequence[float], started: float, timings: BatchTimings
    ) -> None:
        if self._metrics is not None:
            compute = (timings.input_ns + timings.infer_ns + timings.output_ns) / 1e9
            self._metrics.record_batch(self._name, self._version, rows, [started - t for t in enqueued], compute)
        if self._tracer is not None:
            spans = [(tag, t) for tag, t in zip(tags, enqueued, strict=True) if isinstance(tag, Span)]
            if spans:
                self._trace_batch(self._tracer, spans, rows, len(tags), started, timings)

    def cache_lookup(self, hit: bool) -> None:
        if self._metrics is not None:
            self._metrics.record_cache_lookup(self._name, hit)
        if self._tracer is not None:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute("infergate.cache.hit", hit)

    def _trace_batch(
        self,
        tracer: Tracer,
        spans: list[tuple[Span, float]],
        rows: int,
        requests: int,
        started: float,
        timings: BatchTimings,
    ) -> None:
        # Batcher times are time.monotonic(); spans want the wall clock in ns.
        now_mono, now_ns = time.monotonic(), time.time_ns()

        def wall(t: float) -> int:
            return now_ns - int((now_mono - t) * 1e9)

        batch_start = wall(started)
        for span, enqueued in spans:
            span.set_attribute("infergate.batch.size", rows)
            queue = tracer.start_span(
                "queue", trace.set_span_in_context(span), start_time=wall(enqueued), attributes=self._attributes
            )
            queue.end(end_time=batch_start)
        batch = tracer.start_span(
            f"batch {self._name}",
            Context(),  # a root: it belongs to every request's trace at once
            links=[Link(span.get_span_context()) for span, _ in spans],
            start_time=batch_start,
            attributes={
                **self._attributes,
                "infergate.batch.size": rows,
                "infergate.batch.requests": requests,
                "infergate.compute.input_ns": timings.input_ns,
                "infergate.compute.infer_ns": timings.infer_ns,
                "infergate.compute.output_ns": timings.output_ns,
            },
        )
        batch.end(end_time=now_ns)
