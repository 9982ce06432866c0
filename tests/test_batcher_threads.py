"""The batcher on the production path: batches run on instance threads and come back through
``call_soon_threadsafe``, as ``OnnxRunner`` runs them.

test_batcher.py specifies the batching rules with a coroutine ``execute``;
these tests show that the same guarantees hold when the batch runs on a real
thread (``runner._InstanceThreads``, the class the runner uses) and when a
real onnxruntime session computes it (``ModelVersion``). A thread's batch is
held at a ``threading.Event`` the test opens, so nothing waits on the clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import eventually

from infergate.demo import build_matmul16
from infergate.models.batcher import Batch, BatchPolicy, Done, DynamicBatcher
from infergate.models.config import ModelConfig
from infergate.models.runner import _InstanceThreads
from infergate.models.stats import BatchTimings
from infergate.models.version import ModelVersion, load_model_version

LIMIT = 10.0  # seconds; a bound so that a bug fails the test instead of hanging it
NO_TIME = BatchTimings(0, 0, 0)


class Boom(Exception):
    pass


class ThreadModel:
    """Runs batches on real instance threads; each batch waits at ``gate`` (open unless held)."""

    def __init__(self, instances: int = 1) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.threads_seen: list[str] = []
        self.batches: list[list[str]] = []
        self._threads = _InstanceThreads([object()] * instances, self._run, name="test")

    def _run(self, session: object, payloads: list[Any], rows: list[int]) -> tuple[list[Any], BatchTimings]:
        self.threads_seen.append(threading.current_thread().name)
        self.batches.append(list(payloads))
        self.gate.wait(LIMIT)
        if "boom" in payloads:
            raise Boom("the runtime failed")
        return [p.upper() for p in payloads], NO_TIME

    def execute(self, batch: Batch[str], done: Done[str]) -> None:
        def finished(outcome: Any) -> None:
            done(outcome if isinstance(outcome, BaseException) else outcome[0])

        self._threads.submit(batch.payloads, batch.payload_rows, finished)

    def close(self) -> None:
        self.gate.set()
        self._threads.close()


@pytest.fixture
def threads() -> Iterator[ThreadModel]:
    model = ThreadModel()
    yield model
    model.close()


@pytest.fixture
async def batcher(threads: ThreadModel) -> AsyncIterator[DynamicBatcher[str, str]]:
    made: DynamicBatcher[str, str] = DynamicBatcher(
        threads.execute, BatchPolicy(max_batch_size=8), instances=1, name="threads:1"
    )
    made.start()
    yield made
    threads.gate.set()
    await made.aclose(timeout=LIMIT)


async def test_a_batch_runs_on_an_instance_thread_and_each_caller_gets_its_own_answer(
    batcher: DynamicBatcher[str, str], threads: ThreadModel
) -> None:
    async with asyncio.timeout(LIMIT):
        threads.gate.clear()
        first = asyncio.create_task(batcher.submit("busy", rows=1))
        await eventually(lambda: threads.batches == [["busy"]], "threads.batches == [['busy']]")
        queued = [asyncio.create_task(batcher.submit(p, rows=1)) for p in "abc"]
        await eventually(lambda: batcher.depth == 3, "batcher.depth == 3")
        threads.gate.set()
        assert await asyncio.gather(first, *queued) == ["BUSY", "A", "B", "C"]
    assert threads.batches == [["busy"], ["a", "b", "c"]]
    assert all(name.startswith("test-") for name in threads.threads_seen)


async def test_a_caller_cancelled_while_its_batch_runs_on_a_thread_leaves_the_others_answered(
    batcher: DynamicBatcher[str, str], threads: ThreadModel
) -> None:
    async with asyncio.timeout(LIMIT):
        threads.gate.clear()
        busy = asyncio.create_task(batcher.submit("busy", rows=1))
        await eventually(lambda: threads.batches == [["busy"]], "threads.batches == [['busy']]")
        a, b, c = (asyncio.create_task(batcher.submit(p, rows=1)) for p in "abc")
        await eventually(lambda: batcher.depth == 3, "batcher.depth == 3")
        threads.gate.set()
        assert await busy == "BUSY"
        b.cancel()
        outcome = await asyncio.gather(a, b, c, return_exceptions=True)
    assert outcome[0] == "A" and outcome[2] == "C"
    assert isinstance(outcome[1], asyncio.CancelledError)
    assert await batcher.submit("after", rows=1) == "AFTER"  # the instance came back


async def test_an_exception_on_the_thread_reaches_that_batchs_callers_and_nobody_else(
    batcher: DynamicBatcher[str, str], threads: ThreadModel
) -> None:
    async with asyncio.timeout(LIMIT):
        threads.gate.clear()
        busy = asyncio.create_task(batcher.submit("busy", rows=1))
        await eventually(lambda: threads.batches == [["busy"]], "threads.batches == [['busy']]")
        doomed = [asyncio.create_task(batcher.submit(p, rows=1)) for p in ("a", "boom")]
        await eventually(lambda: batcher.depth == 2, "batcher.depth == 2")
        threads.gate.set()
        assert await busy == "BUSY"
        outcome = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(r, Boom) for r in outcome)
        assert await batcher.submit("c", rows=1) == "C"


async def test_aclose_waits_for_the_batch_running_on_a_thread(
    batcher: DynamicBatcher[str, str], threads: ThreadModel
) -> None:
    async with asyncio.timeout(LIMIT):
        threads.gate.clear()
        running = asyncio.create_task(batcher.submit("busy", rows=1))
        await eventually(lambda: threads.batches == [["busy"]], "threads.batches == [['busy']]")
        closing = asyncio.create_task(batcher.aclose())
        await asyncio.sleep(0)
        assert not closing.done()
        threads.gate.set()
        await closing
        assert await running == "BUSY"


@pytest.fixture
def matmul(tmp_path: Path) -> Path:
    onnx.save(build_matmul16(), tmp_path / "model.onnx")
    return tmp_path


async def test_a_real_onnxruntime_version_answers_every_caller_with_its_own_rows(matmul: Path) -> None:
    config = ModelConfig(max_batch_size=8)
    version: ModelVersion = await asyncio.to_thread(load_model_version, matmul, "matmul16", 1, config)
    version.start()
    try:
        rng = np.random.default_rng(7)
        inputs = [rng.standard_normal((rows, 16)).astype(np.float32) for rows in (1, 3, 2, 1)]
        name = version.spec.inputs[0].name
        async with asyncio.timeout(LIMIT):
            answers = await asyncio.gather(*(version.infer({name: x}, len(x), None, None) for x in inputs))
        alone = [await version.infer({name: x}, len(x), None, None) for x in inputs]
    finally:
        await version.aclose(LIMIT)
    for together, single in zip(answers, alone, strict=True):
        for output in together:
            np.testing.assert_allclose(together[output], single[output], rtol=1e-5)
    assert version.stats.execution_count >= 5  # the four together (one batch at least), then each alone
    assert version.stats.inference_count == 2 * sum(len(x) for x in inputs)
