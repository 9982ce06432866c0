"""A tiny model runs its batches on the event loop, and goes back to its thread only when it is slow.

``OnnxRunner.load`` times the model's largest batch; when it takes at most
``instance_group.inline_max_microseconds``, batches run on the caller's thread
(the event loop) instead of being handed to an instance thread and back, as long as
no input has more elements than in that timed batch. When
the median of ``INLINE_WINDOW`` batches in a row later takes more than four
times the bound, the model goes back to its thread for good. The fallback tests
replace the runtime's measured time (``_run_sync``), which the test cannot
otherwise choose.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from infergate import threadnames
from infergate.demo import build_matmul16, write_demo_repository
from infergate.models.config import ModelConfig
from infergate.models.cpus import usable_cpus
from infergate.models.runner import INLINE_WINDOW, BatchOutcome, OnnxRunner
from infergate.models.stats import BatchTimings
from load_tests.models import build_slow_model
from tests.conftest import wait_until

# Far above the default (100 µs), so that matmul16 counts as tiny however busy the machine is.
LIMIT_US = 10_000
FAST_NS = 10_000  # what a batch of matmul16 takes
SLOW_NS = 4 * LIMIT_US * 1000 + 1  # just past the fallback bound
STALL_NS = 1_000_000_000  # the loop preempted for a second


@pytest.fixture
def matmul16(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(build_matmul16(), str(path))
    return path


def load(path: Path, **instance_group: Any) -> OnnxRunner:
    return OnnxRunner.load(path, ModelConfig(max_batch_size=64, instance_group=instance_group), "matmul16", 1)


@pytest.fixture
def runner(matmul16: Path) -> Iterator[OnnxRunner]:
    runner = load(matmul16, inline_max_microseconds=LIMIT_US)
    yield runner
    runner.close()


def run_batches(runner: OnnxRunner, count: int = 1) -> list[tuple[Any, bool]]:
    """``count`` batches one after another on an event loop: for each, its outcome and whether it
    was answered before ``start`` returned (run right there, on the caller's thread)."""

    async def one() -> tuple[Any, bool]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        runner.start([{"x": np.ones((1, 16), np.float32)}], [1], future.set_result)
        at_once = future.done()
        return await asyncio.wait_for(future, 10.0), at_once

    async def main() -> list[tuple[Any, bool]]:
        return [await one() for _ in range(count)]

    return asyncio.run(main())


def with_runtime_times(runner: OnnxRunner, times_ns: list[int]) -> None:
    """Make each next batch report the next of ``times_ns`` as its time in the runtime."""
    real = runner._run_sync
    pending = list(times_ns)

    def timed(instance: Any, payloads: Any, rows: Any) -> BatchOutcome:
        results, timings = real(instance, payloads, rows)
        return results, BatchTimings(timings.input_ns, pending.pop(0), timings.output_ns)

    runner._run_sync = timed  # type: ignore[method-assign]


def test_a_tiny_model_runs_its_batches_on_the_callers_thread(runner: OnnxRunner) -> None:
    assert runner.inline
    [(outcome, at_once)] = run_batches(runner)
    assert at_once
    results, _ = outcome
    assert results[0]["y"].shape == (1, 16)


def test_inline_max_microseconds_zero_keeps_batches_on_the_instance_thread(matmul16: Path) -> None:
    runner = load(matmul16, inline_max_microseconds=0)
    try:
        assert not runner.inline
        [(outcome, at_once)] = run_batches(runner)
        assert not at_once
        assert outcome[0][0]["y"].shape == (1, 16)
    finally:
        runner.close()


def test_several_instances_never_run_on_the_callers_thread(matmul16: Path) -> None:
    runner = load(matmul16, count=2, inline_max_microseconds=LIMIT_US)
    try:
        assert not runner.inline
    finally:
        runner.close()


def test_rare_slow_batches_do_not_send_a_tiny_model_back_to_its_thread(runner: OnnxRunner) -> None:
    # One batch in four stalls (a running average would cross the bound at the first): the median stays fast.
    times = [STALL_NS if i % 4 == 0 else FAST_NS for i in range(4 * INLINE_WINDOW)]
    with_runtime_times(runner, times)
    assert all(at_once for _, at_once in run_batches(runner, len(times)))
    assert runner.inline


def test_a_window_of_slow_batches_sends_the_model_back_to_its_thread_for_good(runner: OnnxRunner) -> None:
    with_runtime_times(runner, [SLOW_NS] * INLINE_WINDOW + [FAST_NS] * INLINE_WINDOW)
    run_batches(runner, INLINE_WINDOW - 1)
    assert runner.inline, "judged before a whole window"
    run_batches(runner)
    assert not runner.inline
    assert not any(at_once for _, at_once in run_batches(runner, INLINE_WINDOW))
    assert not runner.inline


def test_the_threads_that_run_a_model_carry_its_name(matmul16: Path) -> None:
    """Linux's names (``top -H``, /proc): instance threads ``ort-<model>-<n>``, onnxruntime's pool ``ort-<model>``."""
    before, own_name = set(threads()), threadnames.current_name()
    config = ModelConfig(max_batch_size=64, instance_group={"count": 2}, session_options={"intra_op_num_threads": 2})
    runner = OnnxRunner.load(matmul16, config, "matmul16", 1)
    expected = Counter({"ort-matmul16": 2, "ort-matmul16-0": 1, "ort-matmul16-1": 1})  # a pool thread per session

    def new_model_threads() -> Counter[str]:
        """Threads started since ``before`` (by thread id: an earlier test's may still be exiting), of models."""
        return Counter(name for tid, name in threads().items() if tid not in before and name.startswith("ort-"))

    try:
        wait_until(lambda: new_model_threads() == expected, f"threads named {dict(expected)}")
        assert threadnames.current_name() == own_name, "the loading thread keeps its own name"
    finally:
        runner.close()


def threads() -> dict[str, str]:
    """This process's threads: Linux thread id to name."""
    named = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            named[task.name] = (task / "comm").read_text().strip()
        except OSError:  # exited meanwhile
            continue
    return named


@pytest.fixture(scope="module")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_repository(root)
    return root


def test_the_demo_matmul16_runs_on_the_event_loop_when_loaded_beside_the_other_models(demo_repository: Path) -> None:
    """As at a server's start: every demo model loads at once, each in its own thread. Judged on wall-clock
    medians, matmul16 stayed on its thread in about half of the demo server's starts."""
    models = ["mlp", "cnn", "matmul16", "multi_io"]
    for attempt in range(4):
        with ThreadPoolExecutor(len(models)) as pool:
            runners = dict(zip(models, pool.map(partial(load_demo, demo_repository), models), strict=True))
        for runner in runners.values():
            runner.close()
        assert runners["matmul16"].inline, f"matmul16 ran on its thread after load {attempt + 1}"


def load_demo(root: Path, name: str) -> OnnxRunner:
    config = ModelConfig.model_validate(yaml.safe_load((root / name / "config.yaml").read_text()))
    return OnnxRunner.load(root / name / "1" / "model.onnx", config, name, 1)


def test_a_model_far_over_the_bound_is_judged_on_one_or_two_runs_not_six(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing a large model's largest batch six times would add seconds to every load; one run far over
    the bound settles it. A tiny model still gets its six (one untimed, the fastest of five): on the one
    thread it runs with on the event loop, and first on its share of the CPUs where that is more."""
    runs: Counter[str] = Counter()
    run = ort.InferenceSession.run

    def counted(session: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        runs[session.get_modelmeta().graph_name] += 1
        return run(session, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    for name, model in (("slow", build_slow_model(150)), ("matmul16", build_matmul16())):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        config = ModelConfig(max_batch_size=64, warmup={"iterations": 0})
        runner = OnnxRunner.load(path, config, name, 1)
        try:
            assert runner.inline == (name == "matmul16")
        finally:
            runner.close()
    timings = 1 if max(1, usable_cpus() // 2) == 1 else 2
    assert 1 <= runs["slow"] <= 2 and runs["matmul16"] == 6 * timings, runs


def run_one(runner: OnnxRunner, rows: int) -> tuple[Any, bool]:
    """One batch of ``rows`` rows of matmul16 on an event loop: its outcome, and whether it ran right there."""

    async def main() -> tuple[Any, bool]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        runner.start([{"x": np.ones((rows, 16), np.float32)}], [rows], future.set_result)
        at_once = future.done()
        return await asyncio.wait_for(future, 10.0), at_once

    return asyncio.run(main())


def test_only_a_batch_within_the_one_timed_at_load_runs_on_the_callers_thread(matmul16: Path) -> None:
    """The load times 64 rows (max_batch_size 100 allows more): 65 rows were never timed, so they go to
    the thread; the model stays inline for the batches it was measured for."""
    runner = OnnxRunner.load(
        matmul16, ModelConfig(max_batch_size=100, instance_group={"inline_max_microseconds": LIMIT_US}), "m", 1
    )
    try:
        assert runner.inline
        for rows, inline in ((64, True), (65, False), (100, False), (1, True)):
            (results, _), at_once = run_one(runner, rows)
            assert at_once == inline, f"a batch of {rows} rows"
            assert results[0]["y"].shape == (rows, 16)
        assert runner.inline
    finally:
        runner.close()
