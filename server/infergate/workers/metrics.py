"""The supervisor's Prometheus endpoint: every worker's series in one scrape, merged family by family.

Why not prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``):
it aggregates only what is recorded through prometheus_client's own Counter,
Gauge and Histogram objects, which write to shared memory-mapped files.
infergate records through OpenTelemetry instruments and pre-aggregated
histograms (``telemetry/aggregate.py``) that the OpenTelemetry Prometheus
reader turns into metric families at scrape time, in each process; nothing of
that reaches the files, so the merged scrape would be empty. Instead each
worker serves its own endpoint on 127.0.0.1 (a free port it prints at start),
and when Prometheus scrapes the supervisor, :class:`WorkerMetrics` scrapes every
worker and merges what they report:

* **cumulative** series — counters, histograms (buckets, ``_count``, ``_sum``),
  summaries and Triton's untyped counters — are summed. A worker that exits
  leaves its last scraped values behind (carried over), so the sum never goes
  backwards when a crashed worker is restarted, which Prometheus would read
  as a counter reset. Only what a worker counted after its last scrape is lost.
* **gauges** — over the workers that answered, each family by its rule in
  :data:`GAUGES`: an amount (queue depth, requests in flight, resident
  memory) is **summed**, since the pod's total is what dashboards and
  autoscalers want; a flag, score, ratio or setting (canary weight and
  rollback, drift score and alert, ``target_info``) is each worker's own
  reading of one shared thing, so it takes the **max**: two workers both at
  the canary's 30% step are a pod at 30%, not 60%, and two workers in drift
  alert are a pod in alert (1), not 2. A gauge the table does not name is
  merged with max (see :data:`GAUGES` for why).
  ``target_info`` stays one series per worker (each has its own
  ``service_instance_id``).
* **per worker**: ``infergate_worker_up{worker}`` (1 when that worker's endpoint
  answered this scrape) and ``infergate_worker_restarts_total{worker}``.

A worker that does not answer in ``timeout`` seconds counts as down for that
scrape; its cumulative series still count, with their last values.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from infergate import threadnames
from infergate.telemetry.triton import CUMULATIVE as TRITON_CUMULATIVE

__all__ = ["GAUGES", "Family", "WorkerMetrics", "merge", "parse"]

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric family: its metadata and its samples by (sample name, sorted labels)."""

    name: str
    type: str
    documentation: str
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    @property
    def cumulative(self) -> bool:
        return self.type in ("counter", "histogram", "summary") or self.name in TRITON_CUMULATIVE


Families = dict[str, Family]


def parse(text: str) -> Families:
    """A Prometheus text exposition as families (raises ValueError when it is not one)."""
    out: Families = {}
    for metric in text_string_to_metric_families(text):
        family = out.setdefault(metric.name, Family(metric.name, metric.type, metric.documentation))
        for sample in metric.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            family.samples[key] = family.samples.get(key, 0.0) + sample.value
    return out


Combine = Callable[[float, float], float]


def _sum(total: float, value: float) -> float:
    return total + value


def _max(total: float, value: float) -> float:
    return value if value > total else total


# How the workers' values of one series of a gauge family (any family that is not cumulative) become the
# pod's. The question for each: is the value an amount this worker holds (the pod holds the sum), or this
# worker's reading of something every worker shares (the pod's reading is one of theirs, not their sum)?
# Every gauge a worker exports must be named here (tests/test_worker_metrics.py and tests/test_workers.py
# check a real worker's scrape against this table).
GAUGES: dict[str, Combine] = {
    # Amounts: each worker holds its own, and the pod holds them all.
    "infergate_queue_depth": _sum,  # requests waiting in this worker's batch queues
    "nv_inference_pending_request_count": _sum,  # Triton's name for the same
    "infergate_requests_active": _sum,  # RPCs this worker is serving now
    "infergate_streams_paused": _sum,  # this worker's paused streams
    "process_memory_usage_bytes": _sum,  # this worker's resident memory: the pod's is the total
    # Settings, flags and scores: every worker runs the same config on its share of the traffic, so each
    # reports its own reading of one thing. Summing made them N times too large (a canary at 30% read 60%,
    # an alert read 2); max gives what at least one worker reports, which is the right reading for each:
    "infergate_canary_weight_percent": _max,  # in lockstep, the step itself; out of it, the furthest step
    # reached (the traffic each version really got is in infergate_requests_total by model_version)
    "infergate_canary_rolled_back": _max,  # 1 once any worker rolled its canary back (docs/workers.md)
    "infergate_drift_alert": _max,  # 1 while any worker's traffic is in alert: the pod sees drifted traffic
    "infergate_drift_score": _max,  # the worst score any worker's sample of the traffic reaches; alert and
    # score then agree (a score above threshold somewhere is an alert somewhere)
    "target_info": _max,  # an info series (always 1), one per worker by its service_instance_id
}
# A gauge not named above (one added to the server without a rule here: the tests check that none is)
# is merged with max. Of the two possible mistakes, max is the milder: an amount merged with max reads as
# the busiest worker's, too low but a value a worker really has, and still 0 when all are 0; a flag, ratio
# or setting summed reads as a value no worker reported (N, N times 30%), out of its range, which silently
# breaks ``== 1`` rules and thresholds.
_DEFAULT: Combine = _max


def merge(into: Families, part: Iterable[Family]) -> None:
    """Combine ``part``'s samples into ``into`` (metadata from the first family of each name): cumulative
    families are summed, gauges combined by their rule in :data:`GAUGES`."""
    for family in part:
        total = into.setdefault(family.name, Family(family.name, family.type, family.documentation))
        combine = _sum if family.cumulative else GAUGES.get(family.name, _DEFAULT)
        for key, value in family.samples.items():
            previous = total.samples.get(key)
            total.samples[key] = value if previous is None else combine(previous, value)


def _metric(family: Family) -> Metric:
    metric = Metric(family.name, family.documentation, family.type)
    for (name, labels), value in family.samples.items():
        metric.add_sample(name, dict(labels), value)
    return metric


@dataclass
class _Worker:
    generation: int  # which process of this index: a scrape of an exited one is not kept
    url: str


class WorkerMetrics:
    """A prometheus_client collector merging the workers' endpoints (see the module docstring).

    The supervisor's event loop reports starts and exits; ``collect`` runs on the
    endpoint's thread; a lock keeps the two apart.
    """

    def __init__(self, count: int, timeout: float = 5.0):
        self._count = count
        self._timeout = timeout
        self._lock = threading.Lock()
        self._workers: dict[int, _Worker] = {}
        self._last: dict[int, Families] = {}  # cumulative families of each live worker's last answer
        self._carried: Families = {}  # cumulative totals left by exited workers
        self._restarts = [0] * count
        self._generation = 0
        self._pool = ThreadPoolExecutor(
            max_workers=min(count, 16), thread_name_prefix="infergate-scrape", initializer=threadnames.name_after_python
        )

    def worker_started(self, index: int, url: str, restarted: bool) -> None:
        with self._lock:
            self._generation += 1
            self._workers[index] = _Worker(self._generation, url)
            if restarted:
                self._restarts[index] += 1

    def worker_exited(self, index: int) -> None:
        """Carry the exited worker's cumulative series over into the totals."""
        with self._lock:
            self._workers.pop(index, None)
            merge(self._carried, self._last.pop(index, {}).values())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, url: str) -> Families | None:
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as response:
                return parse(response.read().decode())
        except (OSError, ValueError) as exc:
            log.warning("worker metrics at %s: %s", url, exc)
            return None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            workers = dict(self._workers)
        answers = dict(zip(workers, self._pool.map(self._fetch, [w.url for w in workers.values()]), strict=True))
        total: Families = {}
        with self._lock:
            for index, families in answers.items():
                if families is None:
                    continue
                current = self._workers.get(index)
                if current is not None and current.generation == workers[index].generation:
                    self._last[index] = {n: f for n, f in families.items() if f.cumulative}
                merge(total, (f for f in families.values() if not f.cumulative))
            for last in self._last.values():
                merge(total, last.values())
            merge(total, self._carried.values())
            restarts = list(self._restarts)
        yield from (_metric(f) for f in total.values())
        up = Metric("infergate_worker_up", "1 when the worker's metrics answered this scrape", "gauge")
        restarted = Metric("infergate_worker_restarts", "Times the supervisor restarted the worker", "counter")
        for index in range(self._count):
            up.add_sample(up.name, {"worker": str(index)}, float(answers.get(index) is not None))
            restarted.add_sample(restarted.name + "_total", {"worker": str(index)}, restarts[index])
        yield up
        yield restarted
