"""Which event loop serves, and how time is kept on it.

``event_loop: auto`` (the default) serves on uvloop when it is installed, and
``asyncio`` keeps the standard library's loop one flag away. uvloop's own
clock counts whole milliseconds and it rounds timer delays to the nearest
one, so the batcher keeps time on ``time.monotonic()`` and sets its timers
through :class:`LoopClock`: queue times keep their microseconds and a batch
that waits for its queue delay is woken once, never early. The batcher tests
run on the standard loop (pytest-asyncio's); here the same paths run on both.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import uvloop
from conftest import running_server

from infergate.config import ConfigError, load_server_config
from infergate.errors import DeadlineExceeded
from infergate.eventloop import EventLoopChoice, describe, describe_choice, loop_factory, run
from infergate.models.batcher import Batch, BatchPolicy, DynamicBatcher, LoopClock, Timer

LOOPS: list[EventLoopChoice] = ["asyncio", "uvloop"]
LIMIT = 10.0  # seconds: a hang guard, not a performance bound


def _on(choice: EventLoopChoice, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(LIMIT):
            return await make()

    return run(guarded(), choice)


# --------------------------------------------------------------------------- the choice


def test_auto_serves_on_uvloop_when_it_is_installed() -> None:
    loop = loop_factory("auto")()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert describe(loop) == f"uvloop {uvloop.__version__}"
        assert describe_choice("auto") == describe(loop)  # the same words, without making a loop
    finally:
        loop.close()


def test_asyncio_is_the_standard_loop() -> None:
    loop = loop_factory("asyncio")()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
        assert not isinstance(loop, uvloop.Loop)
        assert describe(loop) == "asyncio" == describe_choice("asyncio")
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what a machine without it sees: ImportError
    assert loop_factory("auto") is asyncio.new_event_loop
    assert describe_choice("auto") == "asyncio"
    with pytest.raises(ConfigError, match="event_loop: uvloop is not installed"):
        loop_factory("uvloop")


def test_an_unknown_event_loop_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("event_loop: fastest\n")
    with pytest.raises(ConfigError, match=r"server\.yaml.*event_loop") as refused:
        load_server_config(path, {})
    assert "'auto', 'asyncio' or 'uvloop'" in str(refused.value)


# --------------------------------------------------------------------------- time on either loop


@pytest.mark.parametrize("choice", LOOPS)
def test_the_batcher_clock_keeps_microseconds(choice: EventLoopChoice) -> None:
    async def steps() -> list[float]:
        clock = LoopClock(asyncio.get_running_loop())
        readings = [clock.time() for _ in range(20_000)]
        return [b - a for a, b in itertools.pairwise(readings) if b != a]

    steps = _on(choice, steps)
    assert steps, "the clock never moved"
    assert min(steps) < 0.0005  # uvloop's loop.time() moves in whole milliseconds only


@pytest.mark.parametrize("choice", LOOPS)
def test_a_timer_never_fires_before_its_time(choice: EventLoopChoice) -> None:
    delays = [0.0, 0.0002, 0.0004, 0.0006, 0.0011, 0.0025]

    async def fire_all() -> list[tuple[float, float]]:
        clock = LoopClock(asyncio.get_running_loop())
        fired: list[tuple[float, float]] = []
        done = asyncio.Event()

        def fire(when: float) -> None:
            fired.append((when, time.monotonic()))
            if len(fired) == len(delays):
                done.set()

        timers: list[Timer] = []
        for delay in delays:
            when = clock.time() + delay
            timers.append(clock.call_at(when, fire, when))
            assert timers[-1].when() == when
        await done.wait()
        return fired

    for when, at in _on(choice, fire_all):
        assert at >= when


class CountingClock(LoopClock):
    """A LoopClock that counts the timers set on it."""

    __slots__ = ("timers",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.timers = 0

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> Timer:
        self.timers += 1
        return super().call_at(when, callback, *args)


@pytest.mark.parametrize("choice", LOOPS)
def test_a_batch_waits_out_its_queue_delay_with_one_timer(choice: EventLoopChoice) -> None:
    """One request, a queue delay under a millisecond: the batch runs once the delay is over, and
    is not woken early to find it still has to wait (on uvloop that re-arming would spin)."""
    delay = 0.0004

    async def one_request() -> tuple[Batch[int], CountingClock]:
        clock = CountingClock(asyncio.get_running_loop())
        seen: list[Batch[int]] = []

        def execute(batch: Batch[int], done: Callable[[Sequence[int] | BaseException], None]) -> None:
            seen.append(batch)
            done(batch.payloads)

        policy = BatchPolicy(max_batch_size=8, max_queue_delay=delay, gather=False)
        batcher: DynamicBatcher[int, int] = DynamicBatcher(execute, policy, instances=1, name="toy:1", clock=clock)
        batcher.start()
        assert await batcher.submit(7, rows=1) == 7
        await batcher.aclose()
        return seen[0], clock

    batch, clock = _on(choice, one_request)
    assert batch.started - batch.enqueued[0] >= delay
    # One timer, or none when this process lost the CPU for the whole delay between queueing and dispatch.
    assert clock.timers <= 1


@pytest.mark.parametrize("choice", LOOPS)
def test_a_queued_request_fails_at_its_deadline(choice: EventLoopChoice) -> None:
    async def stuck_request() -> BaseException | None:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        running = asyncio.Event()

        def execute(batch: Batch[int], done: Callable[[Sequence[int] | BaseException], None]) -> None:
            never.add_done_callback(lambda _: done(batch.payloads))  # holds the only instance
            running.set()

        policy = BatchPolicy(max_batch_size=1)
        batcher: DynamicBatcher[int, int] = DynamicBatcher(execute, policy, instances=1, name="toy:1")
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1, rows=1))
        await running.wait()  # the first request holds the instance
        try:
            await batcher.submit(2, rows=1, deadline=time.monotonic() + 0.002)
        except DeadlineExceeded as exc:
            return exc
        finally:
            never.set_result(None)
            await first
            await batcher.aclose()
        return None

    assert isinstance(_on(choice, stuck_request), DeadlineExceeded)


# --------------------------------------------------------------------------- a real server on each


@pytest.mark.parametrize(
    ("flag", "says"), [((), "event loop: uvloop"), (("--event-loop", "asyncio"), "event loop: asyncio")]
)
def test_the_server_says_which_loop_it_runs_and_serves_on_it(
    demo_repository: Path, log_dir: Path, flag: tuple[str, ...], says: str
) -> None:
    with running_server(demo_repository, log_dir, *flag) as server:
        client = grpcclient.InferenceServerClient(server.url)
        x = grpcclient.InferInput("x", [2, 16], "FP32")
        x.set_data_from_numpy(np.ones((2, 16), np.float32))
        answer = client.infer("matmul16", [x]).as_numpy("y")
        client.close()
        assert answer is not None and answer.shape == (2, 16)
        server.logged(says)
