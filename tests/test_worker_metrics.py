"""--workers N: how the supervisor's one scrape combines the workers' series (infergate.workers.metrics).

Each "worker" here is a real metrics pipeline, the one a worker process runs:
``ServerMetrics`` recording through OpenTelemetry's Prometheus reader, Triton's
collector beside it, rendered as Prometheus text by prometheus_client. Only the
state it reports (a canary's step, a drift alert, a queue) is set by the test.
Amounts add up over the workers; flags, scores and settings do not: two workers
both in drift alert are one pod in alert (1), not 2.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from infergate.config import TelemetryConfig
from infergate.models.stats import ModelStats
from infergate.telemetry import Telemetry
from infergate.telemetry.aggregate import Histograms
from infergate.telemetry.providers import build_meter_provider, build_resource
from infergate.telemetry.triton import TritonRow
from infergate.workers import metrics as worker_metrics
from infergate.workers.metrics import Families, WorkerMetrics, merge, parse


class Worker:
    """One worker's metrics, from the real pipeline; the attributes are the state it reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        histograms = Histograms("infergate")
        provider = build_meter_provider(build_resource(), histograms, self.registry)
        telemetry = Telemetry(
            TelemetryConfig(metrics_port=0), meter_provider=provider, histograms=histograms, prometheus=self.registry
        )
        assert telemetry.metrics is not None
        self.metrics = telemetry.metrics
        self.canary: tuple[float, str] | None = None  # (weight in percent, state)
        self.drift_score: float | None = None
        self.drift_alert: int | None = None
        self.queue = 0
        self.pending = 0
        self.stats = ModelStats()
        self.metrics.watch_canaries(self._canaries)
        self.metrics.watch_drift(self)
        self.metrics.watch_queue("scale", 1, self)
        assert telemetry.serve_triton_metrics(lambda: [TritonRow("scale", 1, self.stats, self.pending)])

    def _canaries(self) -> list[tuple[str, int, float, str]]:
        return [("scale", 2, *self.canary)] if self.canary is not None else []

    # DriftSource and QueueSource
    def scores(self) -> list[tuple[float, Mapping[str, str]]]:
        labels = {"model": "scale", "version": "1", "input": "x", "feature": "0", "method": "psi", "io": "input"}
        return [(self.drift_score, labels)] if self.drift_score is not None else []

    def alerts(self) -> list[tuple[int, Mapping[str, str]]]:
        return [(self.drift_alert, {"model": "scale", "version": "1"})] if self.drift_alert is not None else []

    def queue_depth(self) -> int:
        return self.queue

    def report(self, family: str, value: float) -> None:
        """Make this worker report ``value`` for ``family`` (one series), as the server would come to."""
        if family == "infergate_canary_weight_percent":
            self.canary = (value, "ramping")
        elif family == "infergate_canary_rolled_back":
            self.canary = (0.0, "rolled_back") if value else (30.0, "ramping")
        elif family == "infergate_drift_score":
            self.drift_score = value
        elif family == "infergate_drift_alert":
            self.drift_alert = int(value)
        elif family == "infergate_queue_depth":
            self.queue = int(value)
        elif family == "nv_inference_pending_request_count":
            self.pending = int(value)
        elif family == "infergate_requests_active":
            for _ in range(int(value)):
                self.metrics.request_started("ModelInfer")
        elif family == "infergate_streams_paused":
            self.metrics.stream_paused(int(value))
        elif family == "infergate_model_loads":
            for _ in range(int(value)):
                self.metrics.record_model_load("scale", ok=True)
        elif family == "nv_inference_request_success":
            self.stats.success.count = int(value)
        else:
            raise AssertionError(f"no way to make a worker report {family}")

    def exposition(self) -> str:
        """What the worker's endpoint answers a scrape with."""
        return generate_latest(self.registry).decode()


def _merged(*texts: str) -> Families:
    """The supervisor's merge of the workers' answers, in the order they answered."""
    total: Families = {}
    for text in texts:
        merge(total, parse(text).values())
    return total


def _values(families: Families, family: str) -> list[float]:
    return list(families[family].samples.values())


# family, worker 0's value, worker 1's, what the pod's scrape says
CASES = [
    # amounts: the pod holds what its workers hold together
    ("infergate_queue_depth", 3, 4, 7),
    ("nv_inference_pending_request_count", 2, 5, 7),
    ("infergate_requests_active", 2, 1, 3),
    ("infergate_streams_paused", 1, 2, 3),
    # settings, flags and scores: each worker's own reading of the same thing
    ("infergate_canary_weight_percent", 30, 30, 30),  # both at the 30% step: the pod is at 30%
    ("infergate_canary_weight_percent", 30, 60, 60),  # out of lockstep: the furthest step reached
    ("infergate_canary_rolled_back", 1, 1, 1),
    ("infergate_canary_rolled_back", 0, 1, 1),  # rolled back in one worker: an alert either way
    ("infergate_drift_alert", 1, 1, 1),  # both in alert: the rule's 1, not 2
    ("infergate_drift_alert", 0, 1, 1),
    ("infergate_drift_alert", 0, 0, 0),
    ("infergate_drift_score", 0.25, 0.25, 0.25),
    ("infergate_drift_score", 0.25, 0.5, 0.5),  # the worst score any worker's traffic has
    # cumulative: summed, as before
    ("infergate_model_loads", 1, 2, 3),
    ("nv_inference_request_success", 4, 5, 9),
]


@pytest.mark.parametrize(("family", "first", "second", "pod"), CASES)
def test_the_workers_values_of_a_family_combine_by_what_it_measures(
    family: str, first: float, second: float, pod: float
) -> None:
    workers = [Worker(), Worker()]
    for worker, value in zip(workers, (first, second), strict=True):
        worker.report(family, value)
    texts = [w.exposition() for w in workers]
    assert [_values(parse(t), family) for t in texts] == [[first], [second]]  # one series in each
    assert _values(_merged(*texts), family) == [pod]
    assert _values(_merged(*reversed(texts)), family) == [pod]


def test_resident_memory_is_the_sum_of_the_workers() -> None:
    texts = [Worker().exposition() for _ in range(2)]
    each = [_values(parse(t), "process_memory_usage_bytes")[0] for t in texts]
    assert all(v > 0 for v in each)
    assert _values(_merged(*texts), "process_memory_usage_bytes") == [sum(each)]


def test_every_gauge_a_worker_exports_has_a_rule_in_the_table() -> None:
    worker = Worker()
    for family in ("infergate_canary_weight_percent", "infergate_drift_score", "infergate_drift_alert"):
        worker.report(family, 1)
    families = parse(worker.exposition())
    gauges = {name for name, family in families.items() if not family.cumulative}
    assert {"infergate_canary_rolled_back", "infergate_drift_alert", "process_memory_usage_bytes"} <= gauges
    rules = set(worker_metrics.GAUGES)
    assert gauges <= rules, f"no merge rule for {gauges - rules}"


def test_a_gauge_missing_from_the_table_is_merged_with_max() -> None:
    text = '# HELP new_flag A flag\n# TYPE new_flag gauge\nnew_flag{model="scale"} 1.0\n'
    assert _values(_merged(text, text, text), "new_flag") == [1.0]


@contextmanager
def _served(workers: list[Worker]) -> Iterator[WorkerMetrics]:
    """The supervisor's collector over the workers' endpoints, each on its own 127.0.0.1 port."""
    servers: list[Any] = []
    collector = WorkerMetrics(len(workers))
    try:
        for index, worker in enumerate(workers):
            server, _ = start_http_server(0, "127.0.0.1", worker.registry)
            servers.append(server)
            collector.worker_started(index, f"http://127.0.0.1:{server.server_port}/metrics", restarted=False)
        yield collector
    finally:
        collector.close()
        for server in servers:
            server.shutdown()
            server.server_close()


def test_one_scrape_of_two_workers_both_in_drift_alert_says_1_and_keeps_their_step() -> None:
    workers = [Worker(), Worker()]
    for worker in workers:
        worker.report("infergate_drift_alert", 1)
        worker.report("infergate_drift_score", 0.75)
        worker.report("infergate_canary_weight_percent", 30)
        worker.report("infergate_queue_depth", 2)
    with _served(workers) as collector:
        scraped = {m.name: [s.value for s in m.samples] for m in collector.collect()}
    assert scraped["infergate_worker_up"] == [1.0, 1.0]
    assert scraped["infergate_drift_alert"] == [1.0]
    assert scraped["infergate_drift_score"] == [0.75]
    assert scraped["infergate_canary_weight_percent"] == [30.0]
    assert scraped["infergate_queue_depth"] == [4.0]
