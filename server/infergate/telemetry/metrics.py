"""infergate's metrics, as OpenTelemetry instruments, and the typed methods that record them.

Names and units follow the OpenTelemetry conventions (seconds, ``{request}``
annotations); the Prometheus exporter turns ``infergate.queue.duration`` (s)
into ``infergate_queue_duration_seconds`` and counters into ``*_total``.
docs/observability.md lists every metric with its Prometheus name and Triton's
name for the same concept.

Every method is called on the event loop except the observable callbacks,
which the SDK calls from its reader (a scrape or an export thread).
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Meter, Observation

__all__ = ["BATCH_ROWS", "SECONDS", "ServerMetrics"]

# Sub-millisecond to seconds: a small model answers in 100 µs, a big batch in seconds.
SECONDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROWS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ServerMetrics:
    """Every instrument infergate records; one instance per server, made from its ``Meter``."""

    def __init__(self, meter: Meter):
        self._depths: dict[tuple[str, int], Callable[[], int]] = {}
        self._lock = threading.Lock()  # the depth table is read from the reader's thread
        self._requests = meter.create_counter(
            "infergate.requests", unit="{request}", description="RPCs answered, by method, model, version and status"
        )
        self._request_duration = meter.create_histogram(
            "infergate.request.duration", unit="s", description="Time from receiving an RPC to answering it",
            explicit_bucket_boundaries_advisory=SECONDS,
        )  # fmt: skip
        self._active = meter.create_up_down_counter(
            "infergate.requests.active", unit="{request}", description="RPCs being served now"
        )
        self._queue_duration = meter.create_histogram(
            "infergate.queue.duration", unit="s", description="Time a request waited in its model's queue",
            explicit_bucket_boundaries_advisory=SECONDS,
        )  # fmt: skip
        self._compute_duration = meter.create_histogram(
            "infergate.compute.duration", unit="s",
            description="Time one batch took to run: gather inputs, execute, split outputs",
            explicit_bucket_boundaries_advisory=SECONDS,
        )  # fmt: skip
        self._batch_size = meter.create_histogram(
            "infergate.batch.size", unit="{row}", description="Rows in each executed batch",
            explicit_bucket_boundaries_advisory=BATCH_ROWS,
        )  # fmt: skip
        self._loads = meter.create_counter(
            "infergate.model.loads", unit="{load}", description="Model loads, by model and outcome"
        )
        self._auth_refusals = meter.create_counter(
            "infergate.auth.refusals", unit="{request}", description="Calls refused by authentication, by reason"
        )
        self._shadow_comparisons = meter.create_counter(
            "infergate.shadow.comparisons", unit="{comparison}",
            description="Shadow answers compared with the primary's, by agreement (true, false, unknown)",
        )  # fmt: skip
        self._shadow_diff = meter.create_histogram(
            "infergate.shadow.max_abs_diff", description="Largest absolute difference between shadow and primary"
        )
        self._shadow_errors = meter.create_counter(
            "infergate.shadow.errors", unit="{request}", description="Shadow calls that failed"
        )
        self._shadow_dropped = meter.create_counter(
            "infergate.shadow.dropped", unit="{request}", description="Shadow calls dropped (shadow queue full)"
        )
        meter.create_observable_gauge(
            "infergate.queue.depth", [self._observe_depths], unit="{request}",
            description="Requests waiting in each model version's queue",
        )  # fmt: skip
        meter.create_observable_counter(
            "process.cpu.time", [_observe_cpu], unit="s", description="CPU time this process used"
        )
        meter.create_observable_up_down_counter(
            "process.memory.usage", [_observe_memory], unit="By", description="Resident memory of this process"
        )

    # --- RPCs (the interceptor) ------------------------------------------------------------

    def request_started(self, method: str) -> None:
        self._active.add(1, {"rpc.method": method})

    def request_finished(self, method: str, model: str, version: str, status: int, seconds: float) -> None:
        """One answered RPC; ``model``/``version`` are empty for calls that name none."""
        self._active.add(-1, {"rpc.method": method})
        attributes: dict[str, str | int] = {
            "rpc.method": method, "model": model, "model_version": version, "rpc.grpc.status_code": status,
        }  # fmt: skip
        self._requests.add(1, attributes)
        self._request_duration.record(seconds, attributes)

    # --- models (the batcher's events, the same ones ModelStatistics counts) --------------

    def record_batch(self, model: str, version: int, rows: int, queue_seconds: Sequence[float], compute: float) -> None:
        """One executed batch: each request's queue wait and the batch's compute time."""
        attributes = {"model": model, "model_version": str(version)}
        for wait in queue_seconds:
            self._queue_duration.record(wait, attributes)
        self._compute_duration.record(compute, attributes)
        self._batch_size.record(rows, attributes)

    def record_model_load(self, model: str, ok: bool) -> None:
        self._loads.add(1, {"model": model, "outcome": "success" if ok else "failure"})

    def watch_queue(self, model: str, version: int, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as this version's queue depth from now on."""
        with self._lock:
            self._depths[(model, version)] = depth

    # --- for the auth and routing layers ---------------------------------------------------

    def record_auth_refusal(self, reason: str) -> None:
        """A call refused before it reached the servicer; ``reason`` is a short fixed word
        (``missing_token``, ``expired``, ``forbidden``…), never the token or a claim value."""
        self._auth_refusals.add(1, {"reason": reason})

    def record_shadow(
        self, model: str, *, agreement: bool | None, max_abs_diff: float | None, error: bool, dropped: bool
    ) -> None:
        """One shadow call: dropped before it ran, failed, or compared (``agreement`` None: not comparable)."""
        attributes = {"model": model}
        if dropped:
            self._shadow_dropped.add(1, attributes)
            return
        if error:
            self._shadow_errors.add(1, attributes)
            return
        label = "unknown" if agreement is None else str(agreement).lower()
        self._shadow_comparisons.add(1, {"model": model, "agreement": label})
        if max_abs_diff is not None:
            self._shadow_diff.record(max_abs_diff, attributes)

    def _observe_depths(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            depths = list(self._depths.items())
        return [Observation(depth(), {"model": m, "model_version": str(v)}) for (m, v), depth in depths]


def _observe_cpu(options: CallbackOptions) -> Iterable[Observation]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return [Observation(usage.ru_utime, {"cpu.mode": "user"}), Observation(usage.ru_stime, {"cpu.mode": "system"})]


def _observe_memory(options: CallbackOptions) -> Iterable[Observation]:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident = int(statm.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the peak is the best the standard library offers
        resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return [Observation(resident)]
