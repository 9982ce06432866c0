"""Hot-path aggregation: counters and histograms kept in plain Python, reported through OpenTelemetry.

One call into the OpenTelemetry Python metrics SDK costs 6 to 30 µs on the
development VM, depending on its load (attribute cleaning and hashing, a
Measurement object, exemplar checks, locks). infergate makes six
measurements per request, and a matmul16 request costs the server about
450 µs of CPU, so the SDK on the hot path would add roughly 10 to 35%. Here all
six cost about 4 µs together (``python -m load_tests telemetry-overhead
--costs-only``); the SDK sees the totals only when a reader collects:

* counters through ``ObservableCounter`` callbacks (the SDK's own API);
* histograms as ready-made cumulative :class:`~opentelemetry.sdk.metrics.export.Metric`
  points that :func:`with_histograms` adds to what a reader collected, the
  way an OpenTelemetry *metric producer* does in the SDKs that have one.

Only the event loop writes; readers run on other threads, so histograms take
a lock (uncontended: ~0.1 µs) and counters are copied in one C-level step.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ScopeMetrics,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["Counter", "HistogramSet", "Histograms", "Key", "with_histograms"]

Key = tuple[tuple[str, str | int], ...]  # attributes, in a fixed order


class Counter:
    """A monotonic counter per attribute set; ``observe`` is an ObservableCounter callback."""

    def __init__(self) -> None:
        self._values: dict[Key, int] = {}

    def add(self, key: Key, amount: int = 1) -> None:
        self._values[key] = self._values.get(key, 0) + amount

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, dict(key)) for key, value in dict(self._values).items()]


class _Buckets:
    __slots__ = ("count", "counts", "max", "min", "start_ns", "sum")

    def __init__(self, size: int) -> None:
        self.start_ns = time.time_ns()  # a series dropped and begun again starts again (a reset, for OTLP)
        self.counts = [0] * size
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class HistogramSet:
    """One histogram metric (explicit bucket bounds) per attribute set."""

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float], lock: threading.Lock):
        self.name, self.unit, self.description = name, unit, description
        self._bounds = list(bounds)
        self._lock = lock
        self._series: dict[Key, _Buckets] = {}

    def record(self, key: Key, value: float) -> None:
        with self._lock:
            self._add(key, value)

    def record_many(self, key: Key, values: Iterable[float]) -> None:
        with self._lock:
            for value in values:
                self._add(key, value)

    def observe_counts(self, options: CallbackOptions) -> Iterable[Observation]:
        """The samples recorded per attribute set, as an ObservableCounter callback: a counter of
        the same events as this histogram costs the hot path nothing of its own."""
        with self._lock:
            counts = [(key, series.count) for key, series in self._series.items()]
        return [Observation(count, dict(key)) for key, count in counts]

    def drop(self, matches: Callable[[Key], bool]) -> None:
        """Forget the attribute sets ``matches`` accepts; they leave the next collection."""
        with self._lock:
            for key in [key for key in self._series if matches(key)]:
                del self._series[key]

    def _add(self, key: Key, value: float) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Buckets(len(self._bounds) + 1)
        series.counts[bisect.bisect_left(self._bounds, value)] += 1  # buckets are (lower, upper]
        series.count += 1
        series.sum += value
        if value < series.min:  # comparisons, not min()/max(): two calls fewer per sample
            series.min = value
        if value > series.max:
            series.max = value

    def metric(self, now_ns: int) -> Metric | None:
        """The cumulative points so far (call with the lock held), or None before any sample."""
        points = [
            HistogramDataPoint(
                attributes=dict(key), start_time_unix_nano=s.start_ns, time_unix_nano=now_ns, count=s.count,
                sum=s.sum, bucket_counts=list(s.counts), explicit_bounds=self._bounds, min=s.min, max=s.max,
            )
            for key, s in self._series.items()
        ]  # fmt: skip
        if not points:
            return None
        data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        return Metric(name=self.name, description=self.description, unit=self.unit, data=data)


class Histograms:
    """infergate's histograms, shared by the server (which records) and the readers (which collect)."""

    def __init__(self, scope: str) -> None:
        self.scope = InstrumentationScope(scope)
        self._lock = threading.Lock()
        self._sets: list[HistogramSet] = []

    def create(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> HistogramSet:
        histogram = HistogramSet(name, unit, description, bounds, self._lock)
        self._sets.append(histogram)
        return histogram

    def metrics(self) -> list[Metric]:
        now = time.time_ns()
        with self._lock:
            found = [h.metric(now) for h in self._sets]
        return [m for m in found if m is not None]


def with_histograms(data: MetricsData | None, histograms: Histograms) -> MetricsData | None:
    """``data`` (what a reader collected) with the histograms added to their scope."""
    metrics = histograms.metrics()
    if data is None or not metrics or not data.resource_metrics:
        return data
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for i, scope in enumerate(scopes):
        if scope.scope.name == histograms.scope.name:
            scopes[i] = replace(scope, metrics=[*scope.metrics, *metrics])
            break
    else:
        scopes.append(ScopeMetrics(scope=histograms.scope, metrics=metrics, schema_url=""))
    return MetricsData(resource_metrics=[replace(first, scope_metrics=scopes), *rest])
