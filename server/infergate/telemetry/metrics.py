"""infergate's metrics, as OpenTelemetry instruments, and the typed methods that record them.

Names and units follow the OpenTelemetry conventions (seconds, ``{request}``
annotations); the Prometheus exporter turns ``infergate.queue.duration`` (s)
into ``infergate_queue_duration_seconds`` and counters into ``*_total``.
docs/observability.md lists every metric with its Prometheus name and Triton's
name for the same concept.

Every recording method is called on the event loop; the observable callbacks
and the histogram snapshots run on a reader's thread (a scrape or an export).

A model version's own series live as long as it serves: :meth:`ServerMetrics.forget`
drops its queue-depth gauge and its queue, compute and batch-size histograms
when it leaves service, and the gauge holds its source only weakly, so a missed
``forget`` can never keep a retired version in memory. The request counts and
durations are per RPC, labelled with the model and version the call named when
the server has them, and stay.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from infergate.telemetry.aggregate import Counter, Histograms, Key

__all__ = [
    "BATCH_ROWS",
    "MAX_MODEL_LABELS",
    "OTHER_MODELS",
    "SECONDS",
    "CanarySource",
    "DriftSource",
    "QueueSource",
    "ServerMetrics",
]

# Sub-millisecond to seconds: a small model answers in 100 µs, a big batch in seconds.
SECONDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROWS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DIFFS: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
# (model, canary version, weight in percent, state: ramping | complete | rolled_back) for each canary.
CanarySource = Callable[[], Iterable[tuple[str, int, float, str]]]
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class DriftSource(Protocol):
    """What the drift gauges report at each collection (``infergate.monitoring.metrics.DriftReadings``).

    Read on the reader's thread; only the versions served at that moment are
    yielded, so a version's series disappear when it is unloaded.
    """

    def scores(self) -> Iterable[tuple[float, Mapping[str, str]]]: ...

    def alerts(self) -> Iterable[tuple[int, Mapping[str, str]]]: ...


class QueueSource(Protocol):
    """What the queue-depth gauge reads; held weakly (see :meth:`ServerMetrics.watch_queue`)."""

    def queue_depth(self) -> int:
        """Requests waiting in the version's queue now (called from a reader's thread)."""
        ...


MAX_MODEL_LABELS = 1024  # model and version pairs that label request metrics; the rest share OTHER_MODELS
OTHER_MODELS = "_other"


class ServerMetrics:
    """Every instrument infergate records; one per server, from its ``Meter`` and ``Histograms``.

    Recording methods cost a dictionary update or a bisect (see aggregate.py);
    the SDK reads the totals when a reader collects.
    """

    def __init__(self, meter: Meter, histograms: Histograms):
        self._depths: dict[tuple[str, int], weakref.ref[QueueSource]] = {}
        self._canaries: CanarySource | None = None
        self._lock = threading.Lock()  # the depth table is read from the reader's thread
        self._active: dict[str, int] = {}
        self._labelled: set[tuple[str, str]] = set()  # model and version labels in use (see request_finished)
        self._served: dict[str, set[str]] = {}  # versions of each model that ever served, or tried to load
        self._streams_paused = 0
        self._drift: DriftSource | None = None
        self._loads = self._counter(meter, "infergate.model.loads", "{load}", "Model loads, by model and outcome")
        self._cache_lookups = self._counter(
            meter, "infergate.response_cache.lookups", "{request}", "Response cache lookups, by model and result"
        )
        self._auth_refusals = self._counter(
            meter, "infergate.auth.refusals", "{request}", "Calls refused by authentication, by reason"
        )
        self._admission_refusals = self._counter(
            meter,
            "infergate.admission.refusals",
            "{request}",
            "Inference calls refused before they were read: overloaded (over the limit) or draining",
        )
        self._shadow_comparisons = self._counter(
            meter,
            "infergate.shadow.comparisons",
            "{comparison}",
            "Shadow answers compared with the primary's, by agreement (true, false, unknown)",
        )
        self._shadow_errors = self._counter(meter, "infergate.shadow.errors", "{request}", "Shadow calls that failed")
        self._shadow_dropped = self._counter(
            meter,
            "infergate.shadow.dropped",
            "{request}",
            "Shadow calls dropped: queue full, busy-time budget spent, or shadow paused",
        )
        self._request_duration = histograms.create(
            "infergate.request.duration", "s", "Time from receiving an RPC to answering it", SECONDS
        )
        meter.create_observable_counter(  # the duration histogram's counts: one record per request, not two
            "infergate.requests",
            [self._request_duration.observe_counts],
            unit="{request}",
            description="RPCs answered, by method, model, version and status",
        )
        self._queue_duration = histograms.create(
            "infergate.queue.duration", "s", "Time a request waited in its model's queue", SECONDS
        )
        self._compute_duration = histograms.create(
            "infergate.compute.duration",
            "s",
            "Time one batch took to run: gather inputs, execute, split outputs",
            SECONDS,
        )
        self._batch_size = histograms.create("infergate.batch.size", "{row}", "Rows in each executed batch", BATCH_ROWS)
        self._shadow_diff = histograms.create(
            "infergate.shadow.max_abs_diff", "", "Largest absolute difference between shadow and primary", DIFFS
        )
        meter.create_observable_up_down_counter(
            "infergate.requests.active", [self._observe_active], unit="{request}", description="RPCs being served now"
        )
        meter.create_observable_up_down_counter(
            "infergate.streams.paused",
            [self._observe_paused],
            unit="{stream}",
            description="ModelStreamInfer streams that stopped reading requests until their client reads answers",
        )
        meter.create_observable_gauge(
            "infergate.queue.depth",
            [self._observe_depths],
            unit="{request}",
            description="Requests waiting in each model version's queue",
        )
        meter.create_observable_gauge(
            "infergate.canary.weight",
            [self._observe_canary_weights],
            unit="%",
            description="Share of a model's unpinned requests its canary version gets now",
        )
        meter.create_observable_gauge(
            "infergate.canary.rolled_back",
            [self._observe_canary_rollbacks],
            unit="1",
            description="1 when a model's canary was rolled back (its limits were breached), else 0",
        )
        meter.create_observable_gauge(
            "infergate.drift.score",
            [self._observe_drift_scores],
            description="How far a feature of a model version's live traffic is from its reference profile",
        )
        meter.create_observable_gauge(
            "infergate.drift.alert",
            [self._observe_drift_alerts],
            description="1 while any feature of the model version scores above its drift threshold",
        )
        meter.create_observable_counter(
            "process.cpu.time", [_observe_cpu], unit="s", description="CPU time this process used"
        )
        meter.create_observable_up_down_counter(
            "process.memory.usage", [_observe_memory], unit="By", description="Resident memory of this process"
        )

    @staticmethod
    def _counter(meter: Meter, name: str, unit: str, description: str) -> Counter:
        counter = Counter()
        meter.create_observable_counter(name, [counter.observe], unit=unit, description=description)
        return counter

    # --- RPCs (the interceptor) ------------------------------------------------------------

    def request_started(self, method: str) -> None:
        self._active[method] = self._active.get(method, 0) + 1

    def request_finished(self, method: str, model: str, version: str, status: int, seconds: float) -> None:
        """One answered RPC; ``model``/``version`` are empty for calls that name none.

        The names come from the caller, so only names the server has become labels, whatever the
        status: a model that loaded (or tried to) since the server started, and a version of it
        that served. Another model name is labelled with none, another version (not a number, one
        the model lacks) with the model alone. Past ``MAX_MODEL_LABELS`` model and version pairs
        the rest are labelled ``OTHER_MODELS`` (a repository adding versions without end).
        """
        self._active[method] -= 1
        versions = self._served.get(model)
        if versions is None:
            model = version = ""
        elif version not in versions:
            version = ""  # not a number, or a version it lacks: the model still names one the server has
        if (model, version) not in self._labelled:
            if len(self._labelled) < MAX_MODEL_LABELS:
                self._labelled.add((model, version))
            else:
                model, version = OTHER_MODELS, ""
        key = (("rpc.method", method), ("model", model), ("model_version", version), ("rpc.grpc.status_code", status))
        self._request_duration.record(key, seconds)  # and counts it in infergate.requests

    # --- models (the batcher's events, the same ones ModelStatistics counts) --------------

    def record_batch(self, model: str, version: int, rows: int, queue_seconds: Sequence[float], compute: float) -> None:
        """One executed batch: each request's queue wait and the batch's compute time."""
        key = (("model", model), ("model_version", str(version)))
        self._queue_duration.record_many(key, queue_seconds)
        self._compute_duration.record(key, compute)
        self._batch_size.record(key, rows)

    def record_cache_lookup(self, model: str, hit: bool) -> None:
        """A request of a model with the response cache on, answered from it (``hit``) or not."""
        self._cache_lookups.add((("model", model), ("result", "hit" if hit else "miss")))

    def record_model_load(self, model: str, ok: bool) -> None:
        """A version of ``model`` loaded or failed to; either way ``model`` may label the calls that name it."""
        self._served.setdefault(model, set())
        self._loads.add((("model", model), ("outcome", "success" if ok else "failure")))

    def watch_queue(self, model: str, version: int, source: QueueSource) -> None:
        """Report ``source.queue_depth()`` as this version's queue depth until :meth:`forget`, or until
        ``source`` is collected: it is held by a weak reference only. Watching a version again (a
        reload replacing it) replaces the source. From now on, and after it leaves, calls that name
        this version are labelled with it (see :meth:`request_finished`).
        """
        self._served.setdefault(model, set()).add(str(version))  # its calls' label, now and after it leaves
        with self._lock:
            self._depths[(model, version)] = weakref.ref(source)

    def forget(self, model: str, version: int) -> None:
        """``version`` of ``model`` no longer serves: drop its queue-depth gauge and its queue, compute
        and batch-size histograms; they leave the next collection. The caller stops recording
        batches for it first (or they would start the histograms again)."""
        with self._lock:
            self._depths.pop((model, version), None)
        labels = (("model", model), ("model_version", str(version)))

        def labelled(series: Key) -> bool:
            return all(label in series for label in labels)

        for histogram in (self._queue_duration, self._compute_duration, self._batch_size):
            histogram.drop(labelled)

    def watch_drift(self, source: DriftSource) -> None:
        """Report ``source``'s drift scores and alerts from now on."""
        self._drift = source

    def watch_canaries(self, source: CanarySource) -> None:
        """Report the canaries ``source()`` lists (read on the reader's thread, so it must not block)."""
        self._canaries = source

    # --- for the auth and routing layers ---------------------------------------------------

    def record_auth_refusal(self, reason: str) -> None:
        """A call refused before it reached the servicer; ``reason`` is a short fixed word
        (``missing_token``, ``expired``, ``forbidden``…), never the token or a claim value."""
        self._auth_refusals.add((("reason", reason),))

    def record_admission_refusal(self, reason: str) -> None:
        """An inference call refused at admission; ``reason`` is ``overloaded`` or ``draining``."""
        self._admission_refusals.add((("reason", reason),))

    def record_shadow(
        self, model: str, *, agreement: bool | None, max_abs_diff: float | None, error: bool, dropped: bool
    ) -> None:
        """One shadow call: dropped before it ran, failed, or compared (``agreement`` None: not comparable)."""
        key = (("model", model),)
        if dropped:
            self._shadow_dropped.add(key)
            return
        if error:
            self._shadow_errors.add(key)
            return
        label = "unknown" if agreement is None else str(agreement).lower()
        self._shadow_comparisons.add((("model", model), ("agreement", label)))
        # Infinite (shapes differ, NaN on one side only): counted as a disagreement above, kept out of the
        # histogram, whose sum would otherwise stay infinite until the server restarts.
        if max_abs_diff is not None and math.isfinite(max_abs_diff):
            self._shadow_diff.record(key, max_abs_diff)

    def stream_paused(self, delta: int) -> None:
        """A stream stopped (+1) or resumed (-1) reading requests because its client is not reading answers."""
        self._streams_paused += delta

    def _observe_paused(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._streams_paused)]

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"rpc.method": m}) for m, n in dict(self._active).items()]

    def _observe_depths(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = [(key, ref()) for key, ref in self._depths.items()]
            for key, source in sources:
                if source is None:  # collected without forget(): the version is gone anyway
                    del self._depths[key]
        return [
            Observation(source.queue_depth(), {"model": m, "model_version": str(v)})
            for (m, v), source in sources
            if source is not None
        ]

    def _observe_drift_scores(self, options: CallbackOptions) -> Iterable[Observation]:
        source = self._drift
        return [Observation(value, dict(labels)) for value, labels in source.scores()] if source else []

    def _observe_drift_alerts(self, options: CallbackOptions) -> Iterable[Observation]:
        source = self._drift
        return [Observation(value, dict(labels)) for value, labels in source.alerts()] if source else []

    def _canary_states(self) -> list[tuple[str, int, float, str]]:
        return list(self._canaries()) if self._canaries is not None else []

    def _observe_canary_weights(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(w, {"model": m, "model_version": str(v)}) for m, v, w, _ in self._canary_states()]

    def _observe_canary_rollbacks(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(state == "rolled_back"), {"model": m, "model_version": str(v)})
            for m, v, _, state in self._canary_states()
        ]


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
