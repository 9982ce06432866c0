"""A loaded model version: its spec, runner, batcher and statistics.

``ModelVersion.infer`` is the batcher → runner leg of the data path. The
batcher sees payloads of numpy inputs; the runner executes a batch on a free
instance; statistics are recorded on the event loop with the runner's timings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from pathlib import Path

from infergate.models.batcher import Batch, BatchPolicy, Done, DynamicBatcher
from infergate.models.config import Metadata, ModelConfig
from infergate.models.governance import verify_version
from infergate.models.runner import BatchOutcome, ModelLoadError, OnnxRunner
from infergate.models.spec import ModelSpec, Tensors
from infergate.models.stats import ModelObserver, ModelStats
from infergate.monitoring.monitor import ModelMonitor, load_monitor

__all__ = ["ModelVersion", "load_model_version"]

log = logging.getLogger(__name__)


class ModelVersion:
    """One version of one model, ready to serve."""

    def __init__(self, runner: OnnxRunner, config: ModelConfig, monitor: ModelMonitor | None = None):
        self.runner = runner
        self.config = config
        self.monitor = monitor  # drift and payload log (config.monitoring); the handler calls monitor.record
        self.spec: ModelSpec = runner.spec
        self.stats = ModelStats()
        self.metadata: Metadata = config.metadata  # load_model_version sets the verified one, with the digest
        self._observer: ModelObserver | None = None
        batching = config.dynamic_batching
        policy = BatchPolicy(
            max_batch_size=max(self.spec.max_batch_size, 1),
            max_queue_delay=batching.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(batching.preferred_batch_size) if self.spec.batches else (),
            max_queue_size=batching.max_queue_size,
            min_batch_interval=batching.min_batch_interval_microseconds / 1e6,
        )
        self.default_timeout_s = batching.default_timeout_microseconds / 1e6 or None
        self.batcher: DynamicBatcher[Tensors, Tensors] = DynamicBatcher(
            self._execute,
            policy,
            instances=config.instance_group.count,
            name=f"{self.spec.name}:{self.spec.version}",
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    def start(self, observer: ModelObserver | None = None) -> None:
        """Serve from the running loop; ``observer`` (telemetry) sees every request and batch."""
        self._observer = observer
        self.batcher.start()
        if self.monitor is not None:
            self.monitor.start()

    async def infer(
        self, inputs: Tensors, rows: int, group: Hashable, deadline: float | None, watch: bool = True
    ) -> Tensors:
        """Queue validated inputs and return this request's outputs (all of them); see ``DynamicBatcher.submit``."""
        tag = self._observer.capture() if self._observer is not None else None
        return await self.batcher.submit(inputs, rows=rows, group=group, deadline=deadline, watch=watch, tag=tag)

    def _execute(self, batch: Batch[Tensors], done: Done[Tensors]) -> None:
        """The batcher's ``execute``: run on an instance, record statistics, answer."""

        def finished(outcome: BatchOutcome | BaseException) -> None:
            if isinstance(outcome, BaseException):
                done(outcome)
                return
            results, timings = outcome
            queue_ns = int(sum(batch.started - t for t in batch.enqueued) * 1e9)
            self.stats.record_batch(batch.rows, len(batch.payloads), queue_ns, timings)
            if self._observer is not None:
                self._observer.batch(batch.tags, batch.rows, batch.enqueued, batch.started, timings)
            done(results)

        self.runner.start(batch.payloads, batch.payload_rows, finished)

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain the queue (up to ``timeout``), then release threads and sessions."""
        await self.batcher.aclose(timeout)
        if self.monitor is not None:
            await self.monitor.aclose()
        await asyncio.to_thread(self.runner.close)


def load_model_version(directory: Path, name: str, version: int, config: ModelConfig) -> ModelVersion:
    """Load ``directory/<default_model_filename>`` (blocking: call from a thread)."""
    path = directory / config.default_model_filename
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    metadata = verify_version(path, config)  # before onnxruntime reads a file that is not the one named
    runner = OnnxRunner.load(path, config, name, version)
    too_big = [p for p in config.dynamic_batching.preferred_batch_size if p > runner.spec.max_batch_size]
    if too_big and runner.spec.batches:
        runner.close()
        raise ModelLoadError(
            f"dynamic_batching.preferred_batch_size {too_big} exceed max_batch_size {runner.spec.max_batch_size}"
        )
    try:
        monitor = load_monitor(directory, config, runner.spec)  # refuses monitoring.drift without a profile
    except ModelLoadError:
        runner.close()
        raise
    log.info(
        "loaded model %s version %d (max_batch_size %d, %d instance(s) on %s)",
        name,
        version,
        runner.spec.max_batch_size,
        config.instance_group.count,
        runner.providers[0],
    )
    model = ModelVersion(runner, config, monitor)
    model.metadata = metadata
    return model
