"""Shadow traffic: comparing a shadow's outputs with the primary's, and the queue that runs shadow calls.

``compare_outputs`` and ``ShadowStats`` are pure and tested with tables. The
queue's shadow calls are fakes that wait at an ``asyncio.Event`` the test
controls, so a call can be held "running" while the test fills the queue or
closes it. A one-worker queue runs its jobs in order, so ``drain`` (a last job
that only signals) tells the test that every earlier job has been settled.
Every async test runs under ``asyncio.timeout`` so a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest

from infergate.routing.shadow import (
    PAUSE_AFTER_ERRORS,
    PAUSE_MAX_S,
    OutputAgreement,
    ShadowJob,
    ShadowQueue,
    ShadowStats,
    compare_outputs,
)

LIMIT = 5.0  # seconds; generous bound so that a bug fails the test instead of hanging it
SHORT = 0.05  # seconds; a shadow timeout that passes while the test holds the call
LONG = 60.0  # seconds; a shadow timeout no test reaches
CLOSE_LIMIT = 1.0  # seconds; aclose of a one-worker queue takes a few loop passes, never this long

Tensors = dict[str, np.ndarray]
INF = float("inf")


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def objects(*values: bytes) -> np.ndarray:
    return np.array(values, dtype=object)


# --------------------------------------------------------------------------- compare_outputs


@pytest.mark.parametrize(
    ("primary", "shadow", "max_abs_diff", "mismatched"),
    [
        pytest.param(f32(1, 2, 3), f32(1, 2, 3), 0.0, 0, id="identical floats"),
        pytest.param(f32(1, 2, 3), f32(1, 2.5, 2), 1.0, 0, id="floats: the largest difference"),
        pytest.param(f32(-1, 0), f32(1, 0), 2.0, 0, id="floats: absolute, not signed"),
        pytest.param(np.array([1.0], np.float64), np.array([1.0], np.float32), 0.0, 0, id="float widths differ"),
        pytest.param(np.array([1, 5], np.int64), np.array([1, 2], np.int64), 3.0, 0, id="integers"),
        pytest.param(np.array([0], np.uint8), np.array([255], np.uint8), 255.0, 0, id="unsigned: no wrap-around"),
        pytest.param(np.array([2**62], np.int64), np.array([-(2**62)], np.int64), 2.0**63, 0, id="int64: no overflow"),
        pytest.param(np.array([True, False]), np.array([True, True]), 1.0, 0, id="booleans"),
        pytest.param(f32(), f32(), 0.0, 0, id="empty"),
        pytest.param(f32(1, 2, 3), f32(1, 2), INF, 1, id="shape mismatch"),
        pytest.param(f32(1, 2), f32(1, 2).reshape(1, 2), INF, 1, id="rank mismatch"),
        pytest.param(f32(1, 2), np.array([1, 2], np.int32), INF, 1, id="float against integer"),
        pytest.param(objects(b"a", b"b"), objects(b"a", b"b"), 0.0, 0, id="BYTES equal"),
        pytest.param(objects(b"a", b"b"), objects(b"a", b"c"), 0.0, 1, id="BYTES unequal"),
        pytest.param(np.array([b"ab"], "S2"), np.array([b"ab"], "S2"), 0.0, 0, id="fixed bytes equal"),
        pytest.param(np.array([b"ab"], "S2"), np.array([b"ax"], "S2"), 0.0, 1, id="fixed bytes unequal"),
    ],
)
def test_compare_outputs_gives_the_largest_difference_or_a_mismatch(
    primary: np.ndarray, shadow: np.ndarray, max_abs_diff: float, mismatched: int
) -> None:
    result = compare_outputs({"y": primary}, {"y": shadow})
    assert set(result) == {"y"}
    assert (result["y"].compared, result["y"].max_abs_diff, result["y"].mismatched) == (1, max_abs_diff, mismatched)


def test_an_output_missing_from_the_shadow_is_a_mismatch() -> None:
    result = compare_outputs({"y": f32(1), "z": f32(2)}, {"y": f32(1)})
    assert (result["y"].mismatched, result["y"].max_abs_diff) == (0, 0.0)
    assert (result["z"].mismatched, result["z"].max_abs_diff) == (1, INF)


def test_only_the_primarys_outputs_are_compared() -> None:
    assert set(compare_outputs({"y": f32(1)}, {"y": f32(1), "extra": f32(2)})) == {"y"}
    assert compare_outputs({}, {"y": f32(1)}) == {}


SCORES = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)


@pytest.mark.parametrize(
    ("primary", "shadow", "rows", "agreed"),
    [
        pytest.param(SCORES, SCORES, 3, 3, id="identical scores"),
        pytest.param(SCORES, SCORES[:, ::-1].copy(), 3, 0, id="every top-1 flipped"),
        pytest.param(
            SCORES, np.array([[0.4, 0.6], [0.6, 0.4], [0.6, 0.4]], np.float32), 3, 2, id="one of three flipped"
        ),
        pytest.param(SCORES.astype(np.float64), SCORES.astype(np.float64), 3, 3, id="float64 scores"),
        pytest.param(SCORES[:, :1].copy(), SCORES[:, :1].copy(), 0, 0, id="one class: no top-1"),
        pytest.param(f32(0.1, 0.9), f32(0.9, 0.1), 0, 0, id="one dimension: no top-1"),
        pytest.param(SCORES.reshape(1, 3, 2), SCORES.reshape(1, 3, 2), 0, 0, id="three dimensions: no top-1"),
        pytest.param(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 4]]), 0, 0, id="integers: no top-1"),
        pytest.param(SCORES, SCORES[:2], 0, 0, id="shape mismatch: no top-1"),
    ],
)
def test_top1_agreement_is_counted_only_for_float_scores_of_several_classes(
    primary: np.ndarray, shadow: np.ndarray, rows: int, agreed: int
) -> None:
    result = compare_outputs({"scores": primary}, {"scores": shadow})["scores"]
    assert (result.top1_rows, result.top1_agreed) == (rows, agreed)


# --------------------------------------------------------------------------- ShadowStats


def test_shadow_stats_accumulate_the_largest_difference_the_mean_of_the_maxima_and_top1() -> None:
    stats = ShadowStats(version=2)
    stats.record({"scores": SCORES}, {"scores": SCORES})  # max diff 0, 3 of 3 agree
    stats.record({"scores": SCORES}, {"scores": SCORES + np.float32(0.5)})  # max diff 0.5, 3 of 3 agree
    stats.record({"scores": SCORES}, {"scores": SCORES[:, ::-1] + np.float32(0.0)})  # 0.8, 0 of 3 agree
    total = stats.outputs["scores"]
    assert stats.compared == 3
    assert total.compared == 3
    assert total.max_abs_diff == pytest.approx(0.8)
    assert total.mean_max_abs_diff == pytest.approx((0.0 + 0.5 + 0.8) / 3)
    assert (total.top1_rows, total.top1_agreed, total.mismatched) == (9, 6, 0)


def test_shadow_stats_count_mismatches_per_output() -> None:
    stats = ShadowStats(version=2)
    stats.record({"y": f32(1), "label": objects(b"cat")}, {"y": f32(1), "label": objects(b"dog")})
    stats.record({"y": f32(1), "label": objects(b"cat")}, {"label": objects(b"cat")})
    assert stats.outputs["label"].mismatched == 1
    assert stats.outputs["y"].mismatched == 1
    assert stats.outputs["y"].max_abs_diff == INF
    assert (stats.sent, stats.dropped, stats.errors) == (0, 0, 0)  # the queue's counters, not record's


def test_a_new_agreement_has_a_zero_mean() -> None:
    assert OutputAgreement().mean_max_abs_diff == 0.0


def test_a_nan_from_the_shadow_is_never_reported_as_agreement() -> None:
    stats = ShadowStats(version=2)
    stats.record({"y": f32(1, 2)}, {"y": f32(1, np.nan)})
    total = stats.outputs["y"]
    assert total.max_abs_diff != 0.0 or total.mismatched, total


@pytest.mark.parametrize(
    ("failures", "pause_s"),
    [
        pytest.param(1, 0.0, id="one failure: no pause"),
        pytest.param(PAUSE_AFTER_ERRORS - 1, 0.0, id="just under the threshold: no pause"),
        pytest.param(PAUSE_AFTER_ERRORS, 0.5, id="threshold: the shortest pause"),
        pytest.param(2 * PAUSE_AFTER_ERRORS, 1.0, id="twice: doubled"),
        pytest.param(3 * PAUSE_AFTER_ERRORS, 2.0, id="three times: doubled again"),
        pytest.param(8 * PAUSE_AFTER_ERRORS, PAUSE_MAX_S, id="capped"),
    ],
)
def test_a_shadow_that_keeps_failing_is_paused_for_a_doubling_back_off(failures: int, pause_s: float) -> None:
    stats, now = ShadowStats(version=2), 1000.0
    pauses = [stats.failed(now) for _ in range(failures)]
    assert stats.errors == failures
    assert stats.paused_until == (now + pause_s if pause_s else 0.0)
    assert pauses[-1] == (pause_s or None)  # the failure that starts a pause says how long (the audit log's)


def test_a_success_restarts_the_count_of_failures_in_a_row() -> None:
    stats = ShadowStats(version=2)
    for _ in range(PAUSE_AFTER_ERRORS - 1):
        stats.failed(0.0)
    stats.record({"y": f32(1)}, {"y": f32(1)})
    for _ in range(PAUSE_AFTER_ERRORS - 1):
        stats.failed(0.0)
    assert (stats.errors, stats.paused_until) == (2 * (PAUSE_AFTER_ERRORS - 1), 0.0)


def test_a_shadow_that_fails_for_hours_stays_paused_at_most_the_longest_back_off() -> None:
    # At most PAUSE_AFTER_ERRORS failures per pause of PAUSE_MAX_S: 20,000 failures take about 17 hours.
    stats, now = ShadowStats(version=2), 0.0
    for _ in range(20_000):
        stats.failed(now)
        assert stats.paused_until - now <= PAUSE_MAX_S
        now += 1.0
    assert stats.errors == 20_000


# --------------------------------------------------------------------------- ShadowQueue


class FakeShadow:
    """A shadow version's inference: records its calls, then waits at ``gate`` before answering.

    The gate is open unless a test calls ``hold()``; ``started()`` waits for
    the next call to begin. ``fail`` makes calls raise instead of answering.
    """

    def __init__(self, answer: Tensors | None = None) -> None:
        self.answer = answer if answer is not None else {"y": f32(1, 2)}
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.calls = 0
        self.cancelled = 0
        self.answered = asyncio.Event()  # set as a call returns its answer
        self._started: asyncio.Queue[int] = asyncio.Queue()

    async def __call__(self) -> Tensors:
        self.calls += 1
        self._started.put_nowait(self.calls)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        self.answered.set()
        return self.answer

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def started(self) -> int:
        return await self._started.get()


def job(
    call: Callable[[], Awaitable[Tensors]], stats: ShadowStats, primary: Tensors | None = None, timeout_s: float = LONG
) -> ShadowJob:
    return ShadowJob(call, primary if primary is not None else {"y": f32(1, 2)}, stats, timeout_s)


class Watched(ShadowStats):
    """Stats whose test can wait until a number of comparisons has been recorded."""

    def __init__(self, version: int = 2) -> None:
        super().__init__(version=version)
        self._recorded = asyncio.Event()

    def record(self, primary: Tensors, shadow: Tensors) -> tuple[bool, float]:
        outcome = super().record(primary, shadow)
        self._recorded.set()
        return outcome

    async def compared_at_least(self, count: int) -> None:
        """Return once ``count`` comparisons are recorded and the worker has moved on to its next job."""
        while self.compared < count:
            self._recorded.clear()
            await self._recorded.wait()


async def answer_at_once() -> Tensors:
    return {}


async def drain(queue: ShadowQueue) -> None:
    """Wait until every job offered before has been settled and the worker waits for the next.

    The queue has one worker, so it runs its jobs in order: when a sentinel
    offered last has been recorded, every earlier job has been too.
    """
    sentinel = Watched(version=0)
    assert queue.offer(job(answer_at_once, sentinel, primary={}), limit=1_000), "no room for the sentinel"
    await sentinel.compared_at_least(1)


@pytest.fixture
async def queue() -> AsyncIterator[ShadowQueue]:
    """A started one-worker queue with room for three jobs; closed after the test."""
    shadows = ShadowQueue(max_size=3, concurrency=1)
    shadows.start()
    yield shadows
    async with asyncio.timeout(LIMIT):
        await shadows.aclose()


async def test_an_offered_job_runs_and_its_comparison_is_recorded(queue: ShadowQueue) -> None:
    shadow, stats = FakeShadow({"y": f32(1, 2.5)}), ShadowStats(version=2)
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats, primary={"y": f32(1, 2)}), limit=3) is True
        await drain(queue)
    assert shadow.calls == 1
    assert (stats.sent, stats.compared, stats.errors, stats.dropped) == (1, 1, 0, 0)
    assert stats.outputs["y"].max_abs_diff == 0.5


async def test_a_failing_shadow_call_is_counted_and_the_queue_keeps_working(queue: ShadowQueue) -> None:
    shadow, stats = FakeShadow(), ShadowStats(version=2)
    shadow.fail = RuntimeError("the shadow version broke")
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats), limit=3)
        await drain(queue)
        assert (stats.sent, stats.errors, stats.compared) == (1, 1, 0)
        shadow.fail = None
        assert queue.offer(job(shadow, stats), limit=3)
        await drain(queue)
    assert (stats.sent, stats.errors, stats.compared) == (2, 1, 1)


async def test_a_shadow_call_over_its_timeout_counts_as_an_error(queue: ShadowQueue) -> None:
    shadow, stats = FakeShadow(), ShadowStats(version=2)
    shadow.hold()  # never answers
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats, timeout_s=SHORT), limit=3)
        await drain(queue)
    assert (stats.sent, stats.errors, stats.compared) == (1, 1, 0)
    assert shadow.cancelled == 1  # the late call does not keep running


async def test_offer_never_blocks_and_drops_when_the_queue_is_at_capacity(queue: ShadowQueue) -> None:
    shadow, stats = FakeShadow(), Watched()
    shadow.hold()  # the first call does not finish until the test releases it
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats), limit=100)
        await shadow.started()  # the worker is busy with it; the queue is empty
        accepted = [queue.offer(job(shadow, stats), limit=100) for _ in range(5)]  # returns without awaiting
        assert accepted == [True, True, True, False, False]  # capacity 3
        assert (stats.sent, stats.dropped) == (4, 2)
        shadow.release()
        await stats.compared_at_least(4)
    assert (stats.sent, stats.dropped, stats.compared, stats.errors) == (4, 2, 4, 0)


async def test_offer_drops_when_limit_jobs_already_wait(queue: ShadowQueue) -> None:
    shadow, stats = FakeShadow(), ShadowStats(version=2)
    shadow.hold()
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats), limit=1)
        await shadow.started()
        assert queue.offer(job(shadow, stats), limit=1) is True  # the running job does not count
        assert queue.offer(job(shadow, stats), limit=1) is False
        assert queue.offer(job(shadow, stats), limit=2) is True  # the limit is the offerer's, per call
        shadow.release()
        await drain(queue)
    assert (stats.sent, stats.dropped, stats.compared) == (3, 1, 3)


async def test_a_queue_that_was_never_started_drops_every_offer() -> None:
    stats = ShadowStats(version=2)
    assert ShadowQueue(max_size=3).offer(job(FakeShadow(), stats), limit=3) is False
    assert (stats.sent, stats.dropped) == (0, 1)


async def test_offers_for_a_paused_shadow_are_dropped(queue: ShadowQueue) -> None:
    stats = ShadowStats(version=2, paused_until=time.monotonic() + LONG)
    assert queue.offer(job(FakeShadow(), stats), limit=3) is False
    assert (stats.sent, stats.dropped) == (0, 1)


async def test_jobs_queued_before_their_shadow_was_paused_are_dropped_not_run(queue: ShadowQueue) -> None:
    """A pause drops the copies already waiting too: they would fail as well, and start another pause."""
    shadow, stats = FakeShadow(), ShadowStats(version=2)
    shadow.hold()
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats), limit=3)
        await shadow.started()
        assert queue.offer(job(shadow, stats), limit=3) and queue.offer(job(shadow, stats), limit=3)
        stats.paused_until = time.monotonic() + LONG  # as the running call's failure would set it
        shadow.release()
        await drain(queue)
    assert shadow.calls == 1
    assert (stats.sent, stats.dropped, stats.compared) == (1, 2, 1)


async def test_jobs_of_several_shadow_versions_are_counted_apart(queue: ShadowQueue) -> None:
    shadow, two, three = FakeShadow(), Watched(version=2), Watched(version=3)
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, two), limit=3)
        assert queue.offer(job(shadow, three), limit=3)
        assert queue.offer(job(shadow, three), limit=3)
        await three.compared_at_least(2)
    assert (two.sent, two.compared, three.sent, three.compared) == (1, 1, 2, 2)


async def test_aclose_cancels_the_tasks_and_counts_queued_jobs_as_dropped() -> None:
    queue = ShadowQueue(max_size=3, concurrency=1)
    queue.start()
    shadow, stats = FakeShadow(), ShadowStats(version=2)
    shadow.hold()  # never answers
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats), limit=3)
        await shadow.started()
        assert queue.offer(job(shadow, stats), limit=3)
        assert queue.offer(job(shadow, stats), limit=3)
        await queue.aclose()
    assert shadow.cancelled == 1  # the running call
    assert shadow.calls == 1  # the queued ones never started
    assert (stats.sent, stats.dropped, stats.compared) == (3, 3, 0)  # the cut-off call counts as dropped too
    assert queue.offer(job(shadow, stats), limit=3) is False  # a closed queue takes no more
    assert stats.dropped == 4


async def test_aclose_of_an_idle_or_unstarted_queue_stops_its_tasks_and_takes_no_more_work() -> None:
    idle, never_started = ShadowQueue(concurrency=2), ShadowQueue()
    idle.start()
    assert _shadow_tasks()
    async with asyncio.timeout(LIMIT):
        await idle.aclose()
        await never_started.aclose()
    assert not _shadow_tasks()
    for queue in (idle, never_started):
        stats = ShadowStats(version=2)
        assert queue.offer(job(FakeShadow(), stats), limit=3) is False
        assert (stats.sent, stats.dropped) == (0, 1)


def _shadow_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("shadow-") and not t.done()]


async def test_aclose_stops_a_task_whose_shadow_call_has_just_returned() -> None:
    # The call has returned its answer but the task awaiting it has not resumed yet when it is cancelled: the
    # cancellation must still stop the task (asyncio.wait_for on Python 3.11 returns the result and swallows it).
    queue = ShadowQueue(max_size=3, concurrency=1)
    queue.start()
    shadow, stats = FakeShadow(), ShadowStats(version=2)
    shadow.hold()
    async with asyncio.timeout(LIMIT):
        assert queue.offer(job(shadow, stats), limit=3)
        await shadow.started()
    shadow.release()
    await shadow.answered.wait()  # the call is returning; the task awaiting it is woken after this one
    async with asyncio.timeout(CLOSE_LIMIT):
        await queue.aclose()


def test_busy_credit_accrues_at_the_share_and_runs_out() -> None:
    stats = ShadowStats(version=2)
    assert stats.has_credit(100.0, share=0.1)  # starts with a full allowance
    stats.busy_credit_s -= 0.6  # a shadow call that kept the version busy for 0.6 s
    assert not stats.has_credit(100.0, share=0.1)
    assert not stats.has_credit(100.5, share=0.1)  # 0.05 s accrued: still in debt
    assert stats.has_credit(102.0, share=0.1)  # 0.2 s accrued over 2 s
    assert stats.has_credit(1000.0, share=0.1) and stats.busy_credit_s == pytest.approx(0.5)  # capped


async def test_offer_drops_when_the_shadow_has_used_up_its_share_of_time(queue: ShadowQueue) -> None:
    stats = ShadowStats(version=2)
    stats.has_credit(time.monotonic(), share=0.1)
    stats.busy_credit_s = -LONG  # far in debt
    assert queue.offer(job(FakeShadow(), stats), limit=3) is False
    assert (stats.sent, stats.dropped) == (0, 1)
