"""Per model-version statistics, in the shape of Triton's ModelStatistics.

Updated only from the event loop thread (the runner hands its timings back to
the loop), so plain integers suffice: no locks on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["BatchTimings", "Duration", "ModelObserver", "ModelStats", "RepositoryObserver"]


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(frozen=True, slots=True)
class BatchTimings:
    """Nanoseconds one batch spent gathering inputs, in the runtime, and splitting outputs."""

    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(slots=True)
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class StepTimes:
    """What the steps of one ensemble request spent queued and computing, summed over the steps."""

    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0

    def add(self, queue_ns: int, timings: BatchTimings) -> None:
        self.queue_ns += queue_ns
        self.input_ns += timings.input_ns
        self.infer_ns += timings.infer_ns
        self.output_ns += timings.output_ns

    def absorb(self, other: StepTimes) -> None:
        """Add the times of an ensemble that ran as one of this ensemble's steps."""
        self.queue_ns += other.queue_ns
        self.input_ns += other.input_ns
        self.infer_ns += other.infer_ns
        self.output_ns += other.output_ns


@dataclass(frozen=True, slots=True)
class Accrued:
    """A request's batcher tag when it is an ensemble's step: the observer's own tag, and where the
    step's times go (:class:`~infergate.models.version.ModelVersion` unwraps it when its batch ran)."""

    tag: object
    times: StepTimes


@dataclass(slots=True)
class ModelStats:
    """Counters for one model version; field names follow Triton's statistics extension."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    # Response cache: answers found (time to look up) and not found (time to look up and keep).
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    by_batch_size: dict[int, BatchSizeStats] = field(default_factory=dict)

    def record_batch(self, rows: int, requests: int, queue_ns: int, timings: BatchTimings) -> None:
        """One executed batch of ``requests`` requests holding ``rows`` rows.

        Each request is charged the whole batch's compute time, as Triton does.
        """
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.queue.add(queue_ns, requests)
        self.compute_input.add(timings.input_ns * requests, requests)
        self.compute_infer.add(timings.infer_ns * requests, requests)
        self.compute_output.add(timings.output_ns * requests, requests)
        per_size = self.by_batch_size.get(rows)
        if per_size is None:
            per_size = self.by_batch_size[rows] = BatchSizeStats()
        per_size.compute_input.add(timings.input_ns)
        per_size.compute_infer.add(timings.infer_ns)
        per_size.compute_output.add(timings.output_ns)

    def record_ensemble(self, rows: int, steps: StepTimes) -> None:
        """One answered ensemble request: its steps' queue and compute times, summed, as Triton reports them."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.queue.add(steps.queue_ns)
        self.compute_input.add(steps.input_ns)
        self.compute_infer.add(steps.infer_ns)
        self.compute_output.add(steps.output_ns)

    def record_cache_hit(self, lookup_ns: int) -> None:
        """A request answered from the response cache in ``lookup_ns``.

        Triton counts a hit in ``queue`` too, with the time it waited before its lookup (none here: a
        request is looked up as it reaches its model). perf_analyzer relies on it: it takes the version
        whose queue count grew as the one it measured, and reports nothing for a window of hits only.
        """
        self.cache_hit.add(lookup_ns)
        self.queue.add(0)

    def record_request(self, ok: bool, ns: int) -> None:
        """One finished request and its end-to-end time inside the server."""
        (self.success if ok else self.fail).add(ns)


class ModelObserver(Protocol):
    """Sees one model version's requests and batches (telemetry implements it; see telemetry/).

    Called on the event loop, from the same events that feed :class:`ModelStats`,
    so the statistics and whatever the observer exports agree.
    """

    def capture(self) -> object:
        """A token for the request being submitted (e.g. its span); it comes back in ``batch``."""

    def batch(
        self, tags: Sequence[object], rows: int, enqueued: Sequence[float], started: float, timings: BatchTimings
    ) -> None:
        """One executed batch: the tags of its requests, when each was queued and when the batch
        started (``time.monotonic()``; now is when it finished), and the runner's timings."""

    def cache_lookup(self, hit: bool) -> None:
        """The current request was looked up in the response cache (and found, with ``hit``)."""


class RepositoryObserver(Protocol):
    """Sees model loads and hands each loaded version its :class:`ModelObserver`."""

    def model_loaded(self, name: str, ok: bool) -> None: ...

    def for_model(self, name: str, version: int, queue_depth: Callable[[], int], owner: object) -> ModelObserver:
        """The observer of ``owner``, version ``version`` of ``name``, just loaded; ``queue_depth()``
        reads its queue (from any thread).

        ``owner`` holds the observer it is given, and that reference is what keeps the observer
        (and ``queue_depth``) alive: an implementation holds ``owner`` only weakly, if at all.
        """

    def forget(self, name: str, version: int, owner: object) -> None:
        """``owner`` left service (retired or unloaded); any object may be passed.

        When another owner of the same name and version still serves (a reload that replaced
        it), its series stay; otherwise every series labelled with that version goes. An owner
        that was never handed an observer (loaded, then never started) changes nothing.
        """
