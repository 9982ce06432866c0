"""A loaded model version: its spec, runner, batcher, statistics, and (stateful models) its sequences.

``ModelVersion.infer`` is the batcher → runner leg of the data path. The
batcher sees payloads of numpy inputs; the runner executes a batch on a free
instance; statistics are recorded on the event loop with the runner's timings.

A model with ``sequence_batching`` is served through ``ModelVersion.sequences``
(a :class:`~infergate.models.sequence.SequenceScheduler` the version owns and
closes): it fills the control and state inputs and calls ``infer`` itself.
``ModelVersion.spec`` is what clients send and get; for such a model it leaves
out those server-filled tensors (``runner.spec`` is the whole graph).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt

from infergate.heap import in_thread
from infergate.models.batcher import Batch, BatchPolicy, Done, DynamicBatcher
from infergate.models.config import Metadata, ModelConfig
from infergate.models.governance import open_verified
from infergate.models.labels import output_labels
from infergate.models.paths import named_file
from infergate.models.runner import BatchOutcome, ModelLoadError, OnnxRunner
from infergate.models.sequence import (
    SequenceScheduler,
    batching_for_sequences,
    check_sequence_config,
    load_initial_states,
    request_spec,
)
from infergate.models.spec import ModelSpec, Tensors, check_tensor_config
from infergate.models.stats import Accrued, BatchTimings, ModelObserver, ModelStats, StepTimes
from infergate.monitoring.monitor import ModelMonitor, load_monitor

__all__ = ["ModelVersion", "load_model_version"]

log = logging.getLogger(__name__)


class ModelVersion:
    """One version of one model, ready to serve."""

    def __init__(
        self,
        runner: OnnxRunner,
        config: ModelConfig,
        *,
        labels: Mapping[str, tuple[str, ...]] | None = None,
        initial_states: Mapping[str, npt.NDArray[Any]] | None = None,
        monitor: ModelMonitor | None = None,
    ):
        """``labels``: each output's classification labels; ``initial_states``: see ``load_initial_states``;
        ``monitor``: drift and payload log (config.monitoring), which the handler feeds."""
        self.runner = runner
        self.config = config
        self.monitor = monitor
        self.metadata: Metadata = config.metadata  # load_model_version sets the verified one, with the digest
        sequences = config.sequence_batching
        self.spec: ModelSpec = runner.spec if sequences is None else request_spec(runner.spec, sequences)
        self.labels: Mapping[str, tuple[str, ...]] = labels or {}
        self.stats = ModelStats()
        # This load's part of every response-cache key: a reload of the same version never answers
        # from the one it replaced. A plain object, so the cache keeps no version alive.
        self.cache_token: object | None = object() if config.response_cache.enable else None
        self._observer: ModelObserver | None = None
        self._accruing = 0  # ensemble steps waiting on this version (their tags carry where their times go)
        batching = (
            config.dynamic_batching
            if sequences is None
            else batching_for_sequences(sequences, runner.spec.max_batch_size)
        )
        policy = BatchPolicy(
            max_batch_size=max(self.spec.max_batch_size, 1),
            max_queue_delay=batching.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(batching.preferred_batch_size) if self.spec.batches else (),
            max_queue_size=batching.max_queue_size,
            min_batch_interval=batching.min_batch_interval_microseconds / 1e6,
            priority_levels=max(batching.priority_levels, 1),
            gather=batching.gather,
            # auto's second instance runs only when the first has more than it can take (batcher.py).
            parallel_at_half=config.instance_group.count == "auto" and runner.instance_count > 1,
        )
        self._priorities = (batching.priority_levels, batching.default_priority_level)
        self.default_timeout_s = batching.default_timeout_microseconds / 1e6 or None
        self.batcher: DynamicBatcher[Tensors, Tensors] = DynamicBatcher(
            self._execute,
            policy,
            instances=runner.instance_count,
            name=f"{self.spec.name}:{self.spec.version}",
        )
        self.sequences: SequenceScheduler | None = None
        if sequences is not None:
            self.sequences = SequenceScheduler(
                runner.spec,
                sequences,
                self.infer,
                instances=runner.instance_count,
                initial_states=initial_states,
            )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def queue_depth(self) -> int:
        """Requests waiting in the batcher's queue (read from any thread)."""
        return self.batcher.depth

    def set_background(self, background: bool) -> None:
        """Run this version's batches at background priority (a shadow's): see ``OnnxRunner.set_background``."""
        self.runner.set_background(background)

    def start(self, observer: ModelObserver | None = None, calls_in_progress: Callable[[], int] | None = None) -> None:
        """Serve from the running loop; ``observer`` (telemetry) sees every request and batch;
        ``calls_in_progress``: the server's count, for the batcher (see ``DynamicBatcher.start``)."""
        self._observer = observer
        self.batcher.start(calls_in_progress)
        if self.monitor is not None:
            self.monitor.start()

    async def infer(
        self,
        inputs: Tensors,
        rows: int,
        group: Hashable,
        deadline: float | None,
        watch: bool = True,
        level: int = 0,
        accrue: StepTimes | None = None,
    ) -> Tensors:
        """Queue validated inputs and return this request's outputs (all of them); see ``DynamicBatcher.submit``.

        ``level`` is the batcher's priority level (:meth:`priority_level` turns a request's priority into one).
        ``accrue``: an ensemble step's request adds its queue and compute times there.
        """
        tag = self._observer.capture() if self._observer is not None else None
        if accrue is None:
            return await self.batcher.submit(
                inputs, rows=rows, group=group, deadline=deadline, watch=watch, tag=tag, level=level
            )
        self._accruing += 1
        try:
            return await self.batcher.submit(
                inputs, rows=rows, group=group, deadline=deadline, watch=watch, tag=Accrued(tag, accrue), level=level
            )
        finally:
            self._accruing -= 1

    def cache_looked_up(self, hit: bool) -> None:
        """Tell telemetry that the current request was answered from the response cache, or not."""
        if self._observer is not None:
            self._observer.cache_lookup(hit)

    def priority_level(self, priority: int) -> int:
        """The batcher level of a request's ``priority`` (Triton's: 1 is the highest).

        As in Triton, 0 and a priority past the model's levels (a model without levels included) take the
        model's default level: a client that sends priorities to every model works against each of them.
        """
        levels, default = self._priorities
        if not levels:
            return 0
        chosen = priority if 1 <= priority <= levels else default
        return chosen - 1

    def _execute(self, batch: Batch[Tensors], done: Done[Tensors]) -> None:
        """The batcher's ``execute``: run on an instance, record statistics, answer."""

        def finished(outcome: BatchOutcome | BaseException) -> None:
            if isinstance(outcome, BaseException):
                done(outcome)
                return
            results, timings = outcome
            self._record_answered(batch, results, timings)
            tags = batch.tags if not self._accruing else _accrue(batch.tags, batch.enqueued, batch.started, timings)
            if self._observer is not None:
                self._observer.batch(tags, batch.rows, batch.enqueued, batch.started, timings)
            done(results)

        self.runner.start(batch.payloads, batch.payload_rows, finished)

    def _record_answered(
        self, batch: Batch[Tensors], results: list[Tensors | Exception], timings: BatchTimings
    ) -> None:
        """Count the batch's answered requests in the statistics: as in Triton, inferences and compute times
        are the successful ones' (a request that failed when its batch was run again one by one, runner.py,
        counts as a failure where its call ends)."""
        for result in results:  # a loop, not any() over a generator: this runs for every batch
            if isinstance(result, BaseException):
                break
        else:
            queue_ns = int(sum(batch.started - t for t in batch.enqueued) * 1e9)
            self.stats.record_batch(batch.rows, len(batch.payloads), queue_ns, timings)
            return
        answered = [i for i, result in enumerate(results) if not isinstance(result, BaseException)]
        if answered:
            rows = sum(batch.payload_rows[i] for i in answered)
            queue_ns = int(sum(batch.started - batch.enqueued[i] for i in answered) * 1e9)
            self.stats.record_batch(rows, len(answered), queue_ns, timings)

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain the queue (up to ``timeout``), drop the sequences, then release threads and sessions.

        Sequences do not survive their version: after a reload, a sequence that
        was open on the old version must start again (its state was the old one's).
        """
        await self.batcher.aclose(timeout)
        if self.sequences is not None:
            self.sequences.close()
        if self.monitor is not None:
            await self.monitor.aclose()
        await in_thread(self.runner.close)  # not asyncio.to_thread: heap.py


def _accrue(tags: list[object], enqueued: list[float], started: float, timings: BatchTimings) -> list[object]:
    """Add each ensemble step's queue and compute times to its request's; the tags as the observer knows them."""
    unwrapped = []
    for tag, queued in zip(tags, enqueued, strict=True):
        if isinstance(tag, Accrued):
            tag.times.add(int((started - queued) * 1e9), timings)
            tag = tag.tag
        unwrapped.append(tag)
    return unwrapped


def load_model_version(
    directory: Path, name: str, version: int, config: ModelConfig, cpus: int | None = None, workers: int = 1
) -> ModelVersion:
    """Load ``directory/<default_model_filename>`` (blocking: call from a thread).

    The model directory (``directory``'s parent) holds the files the config
    names: labels files and initial state. ``cpus``: the CPUs its sessions
    share (``OnnxRunner.load``). ``workers``: the server's processes (``--workers``);
    a stateful model is refused when there are several, since the kernel may hand a
    sequence's connections to workers that do not hold its state. Raises ModelLoadError
    saying what does not fit.
    """
    if config.sequence_batching is not None and workers > 1:
        raise ModelLoadError(
            f"model '{name}' uses sequence_batching and this server runs {workers} worker processes: "
            "sequence state lives in one process; serve stateful models with --workers 1 (a separate deployment)"
        )
    try:
        path = named_file(directory, config.default_model_filename, "default_model_filename")
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    # Hashed and checked before onnxruntime reads them, and what every session reads (governance.py).
    with open_verified(path, config) as verified:
        runner = OnnxRunner.load(verified.model, config, name, version, cpus)
        try:
            verified.confirm_unchanged()
        except ModelLoadError:
            runner.close()
            raise
    metadata = verified.metadata
    try:
        monitor = load_monitor(directory, config, runner.spec)  # refuses monitoring.drift without a profile
        model = _assemble(runner, config, directory.parent, monitor)
    except ValueError as exc:
        runner.close()
        raise ModelLoadError(str(exc)) from None
    except ModelLoadError:
        runner.close()
        raise
    model.metadata = metadata
    log.info(
        "loaded model %s version %d (max_batch_size %d, %d instance(s) on %s)",
        name,
        version,
        runner.spec.max_batch_size,
        runner.instance_count,
        runner.providers[0],
    )
    return model


def _assemble(runner: OnnxRunner, config: ModelConfig, model_dir: Path, monitor: ModelMonitor | None) -> ModelVersion:
    """Check the config against the loaded graph and build the version; ValueError says what does not fit."""
    spec = runner.spec
    too_big = [p for p in config.dynamic_batching.preferred_batch_size if p > spec.max_batch_size]
    if too_big and spec.batches:
        raise ValueError(f"dynamic_batching.preferred_batch_size {too_big} exceed max_batch_size {spec.max_batch_size}")
    check_tensor_config(spec, config.input, config.output)
    states = None
    if config.sequence_batching is not None:
        check_sequence_config(spec, config.sequence_batching)
        states = load_initial_states(config.sequence_batching, model_dir)
    labels = output_labels(config, model_dir)
    return ModelVersion(runner, config, labels=labels, initial_states=states, monitor=monitor)
