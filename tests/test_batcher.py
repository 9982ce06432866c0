"""The dynamic batcher's contract, one test per guarantee.

The model is a fake ``execute`` that records every batch it receives and waits
at a gate the test controls, so a batch can be held "running" while the test
queues more work, cancels a caller or closes the batcher. Time is a
:class:`ManualClock` that only moves when a test advances it, so queue
delays, batch intervals and deadlines are stepped through exactly: nothing
here waits on wall-clock time. Every test runs under ``asyncio.timeout`` so
a bug shows up as a failure, not a hung suite. The last section runs the
batcher on the production path: real instance threads of a real onnxruntime
model answering through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from infergate.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable
from infergate.models.batcher import Batch, BatchPolicy, DynamicBatcher, from_coroutine

LIMIT = 5.0  # seconds; generous bound so that a bug fails the test instead of hanging it
# Seconds of manual clock time (a binary fraction, so its halves add up exactly): a deadline that passes
# while the test holds the batch ahead of it.
SHORT = 0.125
NAME = "toy:1"


@dataclass(order=True)
class ManualTimer:
    at: float
    order: int
    callback: Callable[..., object] = field(compare=False)
    args: tuple[object, ...] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def when(self) -> float:
        return self.at

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """The batcher's clock, moved only by :meth:`advance`, which fires the timers that fall due."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[ManualTimer] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> ManualTimer:
        timer = ManualTimer(when, next(self._order), callback, args)
        heapq.heappush(self._timers, timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._timers and self._timers[0].at <= self.now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback(*timer.args)

    def pending(self) -> list[float]:
        """When the live timers are due, soonest first."""
        return sorted(t.at for t in self._timers if not t.cancelled)


Answer = Callable[[list[str]], Sequence[str | BaseException]]


def uppercase(payloads: list[str]) -> list[str | BaseException]:
    return [p.upper() for p in payloads]


class FakeModel:
    """Stands in for ``execute``: records each batch, then waits at ``gate`` before answering.

    The gate is open unless a test calls ``hold()``; ``started()`` returns the
    payloads of the next batch to reach ``execute``. ``answer`` maps a batch's
    payloads to its results (by default each payload upper-cased) and may raise.
    """

    def __init__(self) -> None:
        self.batches: list[Batch[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.answer: Answer = uppercase
        self._started: asyncio.Queue[list[str]] = asyncio.Queue()

    async def __call__(self, batch: Batch[str]) -> Sequence[str | BaseException]:
        self.batches.append(batch)
        self._started.put_nowait(list(batch.payloads))
        await self.gate.wait()
        return self.answer(list(batch.payloads))

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def started(self) -> list[str]:
        return await self._started.get()

    @property
    def payloads(self) -> list[list[str]]:
        """Each batch's payloads, in the order the batches reached ``execute``."""
        return [list(b.payloads) for b in self.batches]

    def executed(self) -> set[str]:
        return {p for b in self.batches for p in b.payloads}


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


MakeBatcher = Callable[..., DynamicBatcher[str, str]]


@pytest.fixture
async def make_batcher(model: FakeModel, clock: ManualClock) -> AsyncIterator[MakeBatcher]:
    """Build and start batchers over ``model`` on the test's clock; they are closed after the test."""
    made: list[DynamicBatcher[str, str]] = []

    def make(
        *, instances: int = 1, calls_in_progress: Callable[[], int] | None = None, **policy: Any
    ) -> DynamicBatcher[str, str]:
        policy.setdefault("max_batch_size", 8)
        batcher: DynamicBatcher[str, str] = DynamicBatcher(
            from_coroutine(model), BatchPolicy(**policy), instances=instances, name=NAME, clock=clock
        )
        batcher.start(calls_in_progress)
        made.append(batcher)
        return batcher

    yield make
    model.release()
    for batcher in made:
        await batcher.aclose(timeout=1.0)


def submit(batcher: DynamicBatcher[str, str], payload: str, **kwargs: Any) -> asyncio.Task[str]:
    kwargs.setdefault("rows", 1)
    return asyncio.create_task(batcher.submit(payload, **kwargs), name=f"caller-{payload}")


async def one_loop_pass() -> None:
    """Let every task that is ready run one step; no time passes.

    Tasks created before this call run their first step (a submit queues its
    payload) before the caller resumes: the event loop runs ready callbacks in
    the order they were scheduled.
    """
    await asyncio.sleep(0)


async def occupy(batcher: DynamicBatcher[str, str], model: FakeModel, rows: int = 1) -> asyncio.Task[str]:
    """Hold the model and start a batch of payload "busy", so later requests queue up."""
    model.hold()
    busy = submit(batcher, "busy", rows=rows)
    assert await model.started() == ["busy"]
    return busy


async def results(*tasks: asyncio.Task[str]) -> list[str | BaseException]:
    return await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- forming batches


async def test_a_lone_request_runs_at_once_without_a_queue_delay(make_batcher: MakeBatcher, model: FakeModel) -> None:
    batcher = make_batcher(max_queue_delay=0.0)
    async with asyncio.timeout(LIMIT):
        assert await batcher.submit("a", rows=1) == "A"
    assert model.payloads == [["a"]]


async def test_requests_queued_while_the_instance_is_busy_run_together_in_the_next_batch(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        callers = [submit(batcher, p) for p in "abc"]
        await one_loop_pass()
        assert batcher.depth == 3
        model.release()
        assert await results(busy, *callers) == ["BUSY", "A", "B", "C"]
    assert model.payloads == [["busy"], ["a", "b", "c"]]
    assert [b.rows for b in model.batches] == [1, 3]


async def test_batches_never_exceed_max_batch_size_and_a_multi_row_request_is_never_split(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(max_batch_size=4)
    rows = {"a": 2, "b": 3, "c": 1, "d": 1, "e": 4}
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        callers = [submit(batcher, p, rows=n) for p, n in rows.items()]
        await one_loop_pass()
        model.release()
        assert await results(busy, *callers) == ["BUSY", "A", "B", "C", "D", "E"]
    # "b" (3 rows) does not fit behind "a" (2 rows): it heads the next batch, whole.
    assert model.payloads == [["busy"], ["a"], ["b", "c"], ["d"], ["e"]]
    assert [b.rows for b in model.batches] == [1, 2, 4, 1, 4]
    assert all(b.rows == sum(rows.get(p, 1) for p in b.payloads) for b in model.batches)


async def test_different_groups_never_share_a_batch_and_each_group_keeps_its_order(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher()
    arrivals = [("a1", "g1"), ("b1", "g2"), ("a2", "g1"), ("b2", "g2"), ("a3", "g1")]
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        callers = [submit(batcher, p, group=g) for p, g in arrivals]
        await one_loop_pass()
        model.release()
        assert await results(busy, *callers) == ["BUSY", "A1", "B1", "A2", "B2", "A3"]
    assert model.payloads == [["busy"], ["a1", "a2", "a3"], ["b1", "b2"]]


async def test_a_batch_is_full_at_the_largest_preferred_size(make_batcher: MakeBatcher, model: FakeModel) -> None:
    batcher = make_batcher(max_batch_size=8, preferred_batch_sizes=(2, 4))
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        callers = [submit(batcher, p) for p in "abcdef"]
        await one_loop_pass()
        model.release()
        await results(busy, *callers)
    assert model.payloads == [["busy"], ["a", "b", "c", "d"], ["e", "f"]]


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(dict(max_batch_size=0), id="max_batch_size 0"),
        pytest.param(dict(max_batch_size=4, max_queue_size=0), id="max_queue_size 0"),
        pytest.param(dict(max_batch_size=4, max_queue_delay=-0.001), id="negative delay"),
        pytest.param(dict(max_batch_size=4, min_batch_interval=-0.001), id="negative batch interval"),
        pytest.param(
            dict(max_batch_size=4, preferred_batch_sizes=(8,)),
            id="preferred size above max_batch_size",
        ),
    ],
)
def test_a_policy_that_could_break_the_batch_limits_is_refused(policy: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**policy)


# --------------------------------------------------------------------------- gathering


async def test_requests_that_arrive_in_the_same_loop_turns_as_the_first_share_its_batch(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        callers = [submit(batcher, p) for p in "abc"]  # their submits run in the same loop turn
        assert await results(*callers) == ["A", "B", "C"]
    assert model.payloads == [["a", "b", "c"]]


async def test_without_gathering_a_request_that_finds_the_instance_idle_starts_alone(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(gather=False)
    async with asyncio.timeout(LIMIT):
        callers = [submit(batcher, p) for p in "abc"]
        assert await results(*callers) == ["A", "B", "C"]
    assert model.payloads == [["a"], ["b", "c"]]


async def test_gathering_goes_on_while_requests_keep_arriving_but_no_longer_than_its_turns(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(max_gather_turns=3, max_batch_size=64)
    async with asyncio.timeout(LIMIT):
        callers: list[asyncio.Task[str]] = []
        for i in range(8):  # one new request every loop turn
            callers.append(submit(batcher, str(i)))
            await one_loop_pass()
        await results(*callers)
    first = model.payloads[0]
    assert 2 <= len(first) <= 4, model.payloads  # gathered over the turns it was allowed, then started
    assert sum(len(b) for b in model.payloads) == 8


async def test_a_batch_does_not_gather_when_every_call_the_server_holds_is_already_queued(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    """One caller alone: the server's count of calls in progress says nothing else can arrive."""
    in_progress = 1
    batcher = make_batcher(calls_in_progress=lambda: in_progress)
    async with asyncio.timeout(LIMIT):
        alone = submit(batcher, "a")
        await one_loop_pass()  # its submit starts the batch (execute's task is scheduled) ...
        await one_loop_pass()  # ... which reaches the model: no loop turns spent gathering
        assert model.payloads == [["a"]]
        assert await alone == "A"


async def test_a_batch_gathers_while_the_server_holds_calls_not_yet_queued(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    in_progress = 3  # "b" and "c" are admitted, on their way to submit
    batcher = make_batcher(calls_in_progress=lambda: in_progress)
    async with asyncio.timeout(LIMIT):
        first = submit(batcher, "a")
        await one_loop_pass()
        assert model.payloads == []  # gathering
        callers = [first, submit(batcher, "b"), submit(batcher, "c")]
        assert await results(*callers) == ["A", "B", "C"]
    assert model.payloads == [["a", "b", "c"]]


async def test_a_batch_that_follows_a_finished_one_starts_at_once_with_what_waited(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        queued = [submit(batcher, p) for p in "ab"]
        await one_loop_pass()
        model.hold()
        model.gate.set()  # "busy" answers; the next batch must start in the same step, not turns later
        model.gate.clear()
        assert await model.started() == ["a", "b"]
        model.release()
        assert await results(busy, *queued) == ["BUSY", "A", "B"]


# --------------------------------------------------------------------------- priorities


async def test_higher_priority_requests_head_the_next_batch_and_each_level_keeps_its_order(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(priority_levels=2)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        callers = [submit(batcher, p, level=level) for p, level in (("a", 1), ("b", 0), ("c", 1), ("d", 0))]
        await one_loop_pass()
        model.release()
        await results(busy, *callers)
    assert model.payloads == [["busy"], ["b", "d", "a", "c"]]


async def test_a_full_queue_sheds_the_newest_request_of_a_lower_priority_for_a_higher_one(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(priority_levels=2, max_queue_size=2)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        low = [submit(batcher, p, level=1) for p in "ab"]
        await one_loop_pass()
        urgent = submit(batcher, "u", level=0)
        await one_loop_pass()
        with pytest.raises(QueueFull, match="higher priority"):
            await low[1]  # the newest of the lowest level gave way
        with pytest.raises(QueueFull, match="queue full"):
            await batcher.submit("late", rows=1, level=1)  # nothing lower to shed
        model.release()
        assert await results(busy, urgent, low[0]) == ["BUSY", "U", "A"]
    assert model.payloads == [["busy"], ["u", "a"]]


async def test_a_request_already_past_its_deadline_sheds_nobody_from_a_full_queue(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock
) -> None:
    batcher = make_batcher(priority_levels=2, max_queue_size=1, max_batch_size=1)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        low = submit(batcher, "low", level=1)
        await one_loop_pass()
        with pytest.raises(DeadlineExceeded, match="before queueing"):
            await batcher.submit("urgent", rows=1, level=0, deadline=clock.now - 1)  # it would never run
        assert batcher.depth == 1 and not low.done()  # so it took nobody's place
        model.release()
        assert await results(busy, low) == ["BUSY", "LOW"]


async def test_a_priority_level_outside_the_policy_is_an_invalid_argument(make_batcher: MakeBatcher) -> None:
    batcher = make_batcher(priority_levels=2)
    with pytest.raises(InvalidArgument, match="priority level 2"):
        await batcher.submit("a", rows=1, level=2)


# --------------------------------------------------------------------------- queue delay


async def test_with_a_queue_delay_a_free_instance_waits_for_more_requests_and_runs_a_full_batch_at_once(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    # The clock never moves: the batch can only run because it filled up.
    batcher = make_batcher(max_batch_size=4, max_queue_delay=60.0)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model, rows=4)  # a full batch: it does not wait
        first = submit(batcher, "a")
        await one_loop_pass()
        model.release()
        # When "busy" is answered, the instance has already seen "a" and chosen to wait.
        assert await busy == "BUSY"
        assert model.payloads == [["busy"]]
        later = [submit(batcher, p) for p in "bcd"]
        assert await results(first, *later) == ["A", "B", "C", "D"]
    assert model.payloads == [["busy"], ["a", "b", "c", "d"]]


async def test_when_the_queue_delay_runs_out_a_partial_batch_runs(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock
) -> None:
    batcher = make_batcher(max_batch_size=4, max_queue_delay=0.05)
    async with asyncio.timeout(LIMIT):
        callers = [submit(batcher, p) for p in "ab"]
        await one_loop_pass()
        clock.advance(0.049)
        await one_loop_pass()
        assert model.payloads == []  # still inside the delay
        clock.advance(0.001)
        assert await results(*callers) == ["A", "B"]
    assert model.payloads == [["a", "b"]]


# --------------------------------------------------------------------------- batch pacing


async def test_with_a_batch_interval_the_first_request_after_a_quiet_spell_runs_at_once(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    # The clock never moves: had the lone request waited for the interval, the test would time out.
    batcher = make_batcher(max_batch_size=4, min_batch_interval=60.0)
    async with asyncio.timeout(LIMIT):
        assert await batcher.submit("a", rows=1) == "A"
    assert model.payloads == [["a"]]


async def test_with_a_batch_interval_an_instance_waits_before_its_next_batch_and_runs_a_full_one_at_once(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(max_batch_size=4, min_batch_interval=60.0)
    async with asyncio.timeout(LIMIT):
        assert await batcher.submit("a", rows=1) == "A"
        # A batch just started: the next ones wait for the interval, unless they fill a batch.
        callers = [submit(batcher, p) for p in "bcd"]
        await one_loop_pass()
        assert model.payloads == [["a"]]
        callers.append(submit(batcher, "e"))
        assert await results(*callers) == ["B", "C", "D", "E"]
    assert model.payloads == [["a"], ["b", "c", "d", "e"]]


async def test_when_the_batch_interval_has_passed_a_partial_batch_runs(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock
) -> None:
    batcher = make_batcher(max_batch_size=4, min_batch_interval=0.05)
    async with asyncio.timeout(LIMIT):
        assert await batcher.submit("a", rows=1) == "A"
        callers = [submit(batcher, p) for p in "bc"]
        await one_loop_pass()
        assert clock.pending() == [clock.now + 0.05]  # woken when the interval since "a" is over
        clock.advance(0.05)
        assert await results(*callers) == ["B", "C"]
    assert model.payloads == [["a"], ["b", "c"]]


async def test_the_batch_interval_is_not_waited_when_every_call_the_server_holds_is_here(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock
) -> None:
    """One caller (or an ensemble's next step on the same model): no wait could fill the batch.
    The clock never moves: had "b" waited for the interval, the test would time out."""
    in_progress = 1
    batcher = make_batcher(max_batch_size=4, min_batch_interval=60.0, calls_in_progress=lambda: in_progress)
    async with asyncio.timeout(LIMIT):
        assert await batcher.submit("a", rows=1) == "A"
        assert await batcher.submit("b", rows=1) == "B"
        in_progress = 2  # another call is on its way: now the interval holds the next batch
        waiting = submit(batcher, "c")
        await one_loop_pass()
        assert clock.pending() == [clock.now + 60.0]
        clock.advance(60.0)
        assert await waiting == "C"
    assert model.payloads == [["a"], ["b"], ["c"]]


# --------------------------------------------------------------------------- bounded queue


async def test_a_full_queue_refuses_at_once_while_the_queued_requests_still_complete(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(max_queue_size=2)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        queued = [submit(batcher, p) for p in "ab"]
        await one_loop_pass()
        with pytest.raises(QueueFull, match=NAME):
            await batcher.submit("c", rows=1)
        model.release()
        assert await results(busy, *queued) == ["BUSY", "A", "B"]
    assert "c" not in model.executed()
    assert issubclass(QueueFull, Unavailable)


async def give_up(task: asyncio.Task[str], how: str) -> None:
    """Make a queued caller stop waiting: cancel it, or let its deadline pass."""
    if how == "cancelled":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(DeadlineExceeded):
            await task


@pytest.mark.parametrize("how", ["cancelled", "expired"])
async def test_callers_that_gave_up_no_longer_count_against_the_queue_bound(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock, how: str
) -> None:
    batcher = make_batcher(max_queue_size=2)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        deadline = clock.now + SHORT if how == "expired" else None
        gone = [submit(batcher, p, deadline=deadline) for p in "ab"]
        await one_loop_pass()
        assert batcher.depth == 2
        clock.advance(SHORT)
        for task in gone:
            await give_up(task, how)
        # Nobody waits any more ("a" and "b" gave up), so there is room for "c".
        late = submit(batcher, "c")
        await one_loop_pass()
        model.release()
        assert await results(busy, late) == ["BUSY", "C"]
    assert model.payloads == [["busy"], ["c"]]


# --------------------------------------------------------------------------- deadlines


async def test_a_deadline_that_passes_in_the_queue_fails_the_caller_and_is_never_executed(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        patient = submit(batcher, "b")
        hasty = submit(batcher, "a", deadline=clock.now + SHORT)
        await one_loop_pass()
        assert batcher.depth == 2
        clock.advance(SHORT / 2)
        await one_loop_pass()
        assert not hasty.done()
        clock.advance(SHORT / 2)
        with pytest.raises(DeadlineExceeded, match=NAME):
            await hasty
        model.release()
        assert await results(busy, patient) == ["BUSY", "B"]
    assert model.payloads == [["busy"], ["b"]]


async def test_an_unwatched_deadline_arms_no_timer_but_an_expired_entry_is_still_never_executed(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        patient = submit(batcher, "b")
        unwatched = submit(batcher, "a", deadline=clock.now + SHORT, watch=False)
        await one_loop_pass()
        assert clock.pending() == []  # no timer: gRPC cancels such a call itself
        clock.advance(SHORT * 2)
        await one_loop_pass()
        assert not unwatched.done()
        model.release()
        assert await results(busy, patient) == ["BUSY", "B"]
        with pytest.raises(DeadlineExceeded, match=NAME):  # swept when the instance came free, not run
            await unwatched
    assert model.payloads == [["busy"], ["b"]]


@pytest.mark.parametrize("seconds_ago", [0.0, 1.0], ids=["deadline is now", "deadline passed"])
async def test_a_deadline_already_past_is_refused_at_submit_without_queueing(
    make_batcher: MakeBatcher, model: FakeModel, clock: ManualClock, seconds_ago: float
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        with pytest.raises(DeadlineExceeded, match=NAME):
            await batcher.submit("a", rows=1, deadline=clock.now - seconds_ago)
        assert batcher.depth == 0
        model.release()
        assert await busy == "BUSY"
    assert model.payloads == [["busy"]]


# --------------------------------------------------------------------------- cancellation


async def test_a_caller_cancelled_while_queued_is_dropped_and_never_executed(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        a, b, c = (submit(batcher, p) for p in "abc")
        await one_loop_pass()
        b.cancel()
        model.release()
        outcome = await results(busy, a, b, c)
    assert outcome[:2] == ["BUSY", "A"] and outcome[3] == "C"
    assert isinstance(outcome[2], asyncio.CancelledError)
    assert model.payloads == [["busy"], ["a", "c"]]


async def test_a_caller_cancelled_while_its_batch_runs_leaves_the_others_answered(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        a, b, c = (submit(batcher, p) for p in "abc")
        await one_loop_pass()
        model.release()
        model.hold()  # "busy" is answered; the batch of a, b and c starts and is held running
        assert await model.started() == ["a", "b", "c"]
        b.cancel()
        await one_loop_pass()
        model.release()
        outcome = await results(busy, a, b, c)
    assert outcome[0] == "BUSY" and outcome[1] == "A" and outcome[3] == "C"
    assert isinstance(outcome[2], asyncio.CancelledError)


# --------------------------------------------------------------------------- failures


class Boom(Exception):
    pass


async def test_an_exception_from_execute_reaches_every_caller_of_that_batch_and_nobody_else(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    def fail_the_batch_with_a(payloads: list[str]) -> list[str | BaseException]:
        if "a" in payloads:
            raise Boom("the runtime failed")
        return uppercase(payloads)

    model.answer = fail_the_batch_with_a
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        a, b = (submit(batcher, p) for p in "ab")
        await one_loop_pass()
        model.release()
        outcome = await results(busy, a, b)
        after = await batcher.submit("c", rows=1)
    assert outcome[0] == "BUSY"
    assert all(isinstance(r, Boom) for r in outcome[1:])
    assert after == "C"
    assert model.payloads == [["busy"], ["a", "b"], ["c"]]


async def test_an_exception_returned_for_one_item_fails_only_that_caller(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    model.answer = lambda payloads: [Boom(p) if p == "b" else p.upper() for p in payloads]
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        a, b, c = (submit(batcher, p) for p in "abc")
        await one_loop_pass()
        model.release()
        outcome = await results(busy, a, b, c)
    assert outcome[:2] == ["BUSY", "A"] and outcome[3] == "C"
    assert isinstance(outcome[2], Boom)


@pytest.mark.parametrize(
    "miscount",
    [
        pytest.param(lambda answers: [], id="no results"),
        pytest.param(lambda answers: answers[:-1], id="one too few"),
        pytest.param(lambda answers: [*answers, "extra"], id="one too many"),
    ],
)
async def test_a_wrong_number_of_results_fails_the_batch_callers_instead_of_hanging(
    make_batcher: MakeBatcher,
    model: FakeModel,
    miscount: Callable[[list[str | BaseException]], list[str | BaseException]],
) -> None:
    model.answer = lambda payloads: miscount(uppercase(payloads)) if "a" in payloads else uppercase(payloads)
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        callers = [submit(batcher, p) for p in "ab"]
        await one_loop_pass()
        model.release()
        outcome = await results(busy, *callers)
        after = await batcher.submit("c", rows=1)
    assert outcome[0] == "BUSY"
    assert all(isinstance(r, Exception) for r in outcome[1:]), outcome
    assert after == "C"  # the instance survived


# --------------------------------------------------------------------------- instances


async def test_two_instances_run_two_batches_at_the_same_time(make_batcher: MakeBatcher, model: FakeModel) -> None:
    batcher = make_batcher(instances=2)
    async with asyncio.timeout(LIMIT):
        model.hold()
        a = submit(batcher, "a")
        assert await model.started() == ["a"]
        b = submit(batcher, "b")
        assert await model.started() == ["b"]  # while "a" is still held in execute
        model.release()
        assert await results(a, b) == ["A", "B"]


async def test_with_parallel_at_half_a_second_instance_starts_only_once_half_a_batch_waits(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(instances=2, max_batch_size=8, parallel_at_half=True, gather=False)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)  # nothing else ran: the first batch starts at once
        waiting = [submit(batcher, p) for p in "abc"]
        await one_loop_pass()
        assert model.payloads == [["busy"]]  # three rows of eight: the second instance stays free
        waiting.append(submit(batcher, "d"))
        assert await model.started() == ["a", "b", "c", "d"]  # half of eight: it starts
        model.release()
        assert await results(busy, *waiting) == ["BUSY", "A", "B", "C", "D"]


async def test_with_parallel_at_half_what_waits_goes_to_the_instance_that_comes_free(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    batcher = make_batcher(instances=2, max_batch_size=8, parallel_at_half=True, gather=False)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model)
        waiting = [submit(batcher, p) for p in "ab"]
        await one_loop_pass()
        assert model.payloads == [["busy"]]
        model.release()
        assert await results(busy, *waiting) == ["BUSY", "A", "B"]
    assert model.payloads == [["busy"], ["a", "b"]]  # one batch, once "busy" was done


# --------------------------------------------------------------------------- closing


async def test_aclose_drains_the_queue_and_then_refuses_new_work(make_batcher: MakeBatcher, model: FakeModel) -> None:
    batcher = make_batcher(max_queue_delay=60.0, max_batch_size=4)
    async with asyncio.timeout(LIMIT):
        busy = await occupy(batcher, model, rows=4)
        queued = [submit(batcher, p) for p in "ab"]
        await one_loop_pass()
        closing = asyncio.create_task(batcher.aclose())
        await one_loop_pass()
        with pytest.raises(Unavailable, match=NAME):
            await batcher.submit("during", rows=1)
        model.release()
        await closing
        # Drained at once: closing does not wait out the queue delay (the clock never moves).
        assert await results(busy, *queued) == ["BUSY", "A", "B"]
        with pytest.raises(Unavailable, match=NAME):
            await batcher.submit("after", rows=1)
    assert model.payloads == [["busy"], ["a", "b"]]


async def test_aclose_with_a_timeout_cancels_stuck_work_and_its_callers_get_unavailable(
    make_batcher: MakeBatcher, model: FakeModel
) -> None:
    """Each caller is told whether its request ran: the one whose batch was running was once told that the
    batcher "was closed before the request ran", which a client may read as "safe, it never ran"."""
    batcher = make_batcher()
    async with asyncio.timeout(LIMIT):
        stuck = await occupy(batcher, model)  # the gate never opens
        queued = submit(batcher, "a")
        await one_loop_pass()
        await batcher.aclose(timeout=0.05)
        running, waiting = await results(stuck, queued)
    assert isinstance(running, Unavailable) and isinstance(waiting, Unavailable), (running, waiting)
    assert running.message == (
        f"model {NAME} was closed while the request ran: the time allowed for the close ran out before it finished"
    )
    assert waiting.message == f"model {NAME} was closed before the request ran"
    assert model.payloads == [["busy"]]


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("rows", [0, -1, 9])
async def test_a_request_of_rows_outside_1_to_max_batch_size_is_an_invalid_argument(
    make_batcher: MakeBatcher, model: FakeModel, rows: int
) -> None:
    batcher = make_batcher(max_batch_size=8)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(InvalidArgument, match=NAME):
            await batcher.submit("a", rows=rows)
    assert batcher.depth == 0
    assert model.batches == []


async def test_aclose_of_a_batcher_that_never_started_returns_at_once(model: FakeModel) -> None:
    batcher: DynamicBatcher[str, str] = DynamicBatcher(
        from_coroutine(model), BatchPolicy(max_batch_size=4), instances=1, name=NAME
    )
    async with asyncio.timeout(LIMIT):
        await batcher.aclose()
        with pytest.raises(Unavailable):
            await batcher.submit("a", rows=1)
