"""Triton's Prometheus metrics (``nv_inference_*``), read from ModelStatistics' own counters.

Teams moving from Triton keep their dashboards and alerts: the Prometheus
endpoint also serves Triton's per-model counters, with Triton's names, labels
(``model``, ``version``) and meanings (cumulative counts; cumulative
durations in microseconds, each request charged its whole batch's compute
time, as Triton's statistics extension counts them).

Why read :class:`~infergate.models.stats.ModelStats` at scrape time instead of
recording more instruments: those counters are what ModelStatistics answers,
so both agree by construction (the same success/failure decision, the same
batch event), and the hot path pays nothing. The scrape runs on the HTTP
endpoint's thread while the event loop writes: each value is one int read,
atomic under the GIL; a scrape may see a request counted in one series and not
yet in the next, as any concurrent scrape would.

Why the counters are exposed as ``untyped``: Triton declares them counters
but names them without the ``_total`` suffix that OpenMetrics (which
Prometheus negotiates first) requires of a counter. Untyped keeps Triton's
exact names valid in both exposition formats; PromQL (``rate``, ``increase``)
treats them the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client.metrics_core import Metric

from infergate.models.stats import ModelStats

__all__ = ["CUMULATIVE", "TritonMetrics", "TritonRow"]


class TritonRow(NamedTuple):
    """One loaded model version as the collector sees it."""

    model: str
    version: int
    stats: ModelStats
    pending: int  # requests waiting in its queue now


def _us(ns: int) -> int:
    return ns // 1000


# name -> (help, value). Help texts follow Triton's docs/user_guide/metrics.md.
_COUNTERS: dict[str, tuple[str, Callable[[ModelStats], int]]] = {
    "nv_inference_request_success": (
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success.count,
    ),
    "nv_inference_request_failure": (
        "Number of failed inference requests, all batch sizes",
        lambda s: s.fail.count,
    ),
    "nv_inference_count": ("Number of inferences performed (rows; a batch of n counts n)", lambda s: s.inference_count),
    "nv_inference_exec_count": ("Number of model executions performed (batches)", lambda s: s.execution_count),
    "nv_inference_request_duration_us": (
        "Cumulative inference request duration of successful requests in microseconds",
        lambda s: _us(s.success.ns),
    ),
    "nv_inference_queue_duration_us": (
        "Cumulative inference queuing duration in microseconds",
        lambda s: _us(s.queue.ns),
    ),
    "nv_inference_compute_input_duration_us": (
        "Cumulative compute input duration in microseconds (each request charged its batch's time)",
        lambda s: _us(s.compute_input.ns),
    ),
    "nv_inference_compute_infer_duration_us": (
        "Cumulative compute inference duration in microseconds (each request charged its batch's time)",
        lambda s: _us(s.compute_infer.ns),
    ),
    "nv_inference_compute_output_duration_us": (
        "Cumulative inference compute output duration in microseconds (each request charged its batch's time)",
        lambda s: _us(s.compute_output.ns),
    ),
    "nv_cache_num_hits_per_model": ("Number of response cache hits per model", lambda s: s.cache_hit.count),
    "nv_cache_num_misses_per_model": ("Number of response cache misses per model", lambda s: s.cache_miss.count),
    "nv_cache_hit_duration_per_model": (
        "Total cache hit duration per model, in microseconds",
        lambda s: _us(s.cache_hit.ns),
    ),
    "nv_cache_miss_duration_per_model": (
        "Total cache miss duration per model, in microseconds (looking up, then keeping the answer)",
        lambda s: _us(s.cache_miss.ns),
    ),
}

# The untyped families that only ever grow (a merge of several processes sums them and
# carries them over a restart; see infergate.workers.metrics).
CUMULATIVE: frozenset[str] = frozenset(_COUNTERS)


class TritonMetrics:
    """A prometheus_client collector yielding Triton's metrics for every loaded model version.

    ``rows()`` lists the versions; it is called on the scrape thread and must
    only read (see the module docstring).
    """

    def __init__(self, rows: Callable[[], Iterable[TritonRow]]):
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        rows = list(self._rows())
        for name, (description, value) in _COUNTERS.items():
            family = Metric(name, description, "unknown")
            for row in rows:
                family.add_sample(name, {"model": row.model, "version": str(row.version)}, value(row.stats))
            yield family
        pending = Metric(
            "nv_inference_pending_request_count", "Instantaneous number of pending requests awaiting execution", "gauge"
        )
        for row in rows:
            pending.add_sample(pending.name, {"model": row.model, "version": str(row.version)}, row.pending)
        yield pending
