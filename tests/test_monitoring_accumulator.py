"""The accumulator: the bounded hand-off from the event loop to one worker thread (real threads)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from conftest import eventually

from infergate.monitoring.accumulator import Accumulator, tensor_bytes


def collecting(**options: int) -> tuple[Accumulator[int], list[int]]:
    seen: list[int] = []
    return Accumulator("test", seen.extend, **options), seen


async def test_items_reach_the_worker_in_order_and_close_drains_the_queue() -> None:
    accumulator, seen = collecting(capacity=100)
    for item in range(10):
        assert accumulator.offer(item)
    accumulator.start()
    await accumulator.aclose()
    assert seen == list(range(10))
    assert "test" not in {t.name for t in threading.enumerate()}
    assert not accumulator.offer(99) and accumulator.dropped == 1  # closed: dropped, never queued


def test_beyond_capacity_items_are_dropped_and_counted() -> None:
    accumulator, _ = collecting(capacity=3)
    assert [accumulator.offer(i) for i in range(5)] == [True, True, True, False, False]
    assert (accumulator.accepted, accumulator.dropped, accumulator.depth) == (3, 2, 3)


async def test_the_bytes_waiting_are_bounded_and_released_once_processed() -> None:
    accumulator, seen = collecting(capacity=100, max_bytes=100)
    assert accumulator.offer(1, size=60)
    assert not accumulator.offer(2, size=60)  # 120 bytes would wait
    assert accumulator.offer(3, size=40)
    accumulator.start()
    try:
        await eventually(lambda: accumulator.waiting_bytes == 0, "the bytes released after processing")
        assert seen == [1, 3] and accumulator.offer(4, size=100)
    finally:
        await accumulator.aclose()


async def test_a_failing_batch_is_counted_and_the_worker_keeps_going() -> None:
    seen: list[int] = []

    def process(items: list[int]) -> None:
        if 0 in items:
            raise RuntimeError("boom")
        seen.extend(items)

    accumulator: Accumulator[int] = Accumulator("failing", process, capacity=10)
    accumulator.start()
    try:
        accumulator.offer(0)
        await eventually(lambda: accumulator.errors == 1, "the failure counted")
        accumulator.offer(5)
        await eventually(lambda: seen == [5], "the next item processed")
    finally:
        await accumulator.aclose()


async def test_tick_runs_on_the_worker_when_nothing_arrives() -> None:
    ticked = threading.Event()
    accumulator: Accumulator[int] = Accumulator("ticking", lambda items: None, capacity=1, tick=ticked.set,
                                                tick_seconds=0.01)  # fmt: skip
    accumulator.start()
    try:
        await eventually(ticked.is_set, "a tick")
    finally:
        await accumulator.aclose()


def test_tensor_bytes_counts_arrays_and_ignores_anything_else() -> None:
    assert tensor_bytes({"x": np.zeros((2, 4), np.float32)}, {"y": np.zeros(3, np.int64), "z": "odd"}) == 56


async def test_the_worker_thread_carries_the_accumulators_name_in_linux() -> None:
    """``top -H`` and /proc show it (cut to 15 bytes, the kernel's limit)."""
    accumulator: Accumulator[int] = Accumulator("drift mlp:1 of a long name", lambda items: None, capacity=1)

    def linux_names() -> set[str]:
        return {(task / "comm").read_text().rstrip("\n") for task in Path("/proc/self/task").iterdir()}

    accumulator.start()
    try:
        await eventually(lambda: "drift mlp:1 of " in linux_names(), "a thread named 'drift mlp:1 of '")
    finally:
        await accumulator.aclose()


def test_tensor_bytes_counts_the_length_of_each_text_element() -> None:
    """A queued request keeps its text alive: the bound counts the text, not only the references to it."""
    text = np.array([b"a" * 1000, b"b" * 3000, "c" * 500], dtype=object)
    assert tensor_bytes({"t": text}) == text.nbytes + 4500
