"""The dynamic batcher: one bounded queue per model version, feeding its instances.

It is generic: it knows nothing of gRPC or onnxruntime. Callers ``submit`` a
payload with its row count, a *group* key (requests whose non-batch dimensions
differ must not share a batch) and a priority level. Whenever one of the
``instances`` is free, a batch is formed and handed to ``execute(batch, done)``,
which runs it elsewhere (a thread) and calls ``done`` on the event loop with
the results; each caller's future then gets its own result.

Dispatch is driven by events, not by worker tasks: a batch starts inside the
``submit`` that makes it ready (or a few event-loop turns later, see
*gathering*), inside the ``done`` of the batch before it, or from a timer when
it waits to fill. This keeps the hand-off to the instance and the answer to
the caller one event-loop step each, which is most of a small model's latency
(see BENCHMARKS.md).

Batching policy (Triton's ``dynamic_batching``, plus gathering):

* A free instance takes the oldest waiting request of the highest priority
  and, behind it, waiting requests of the same group (higher priorities first)
  while the batch stays within ``max_batch_size`` rows (``target_rows`` when
  preferred sizes are set). Multi-row requests are never split.
* **Gathering** (``gather``, on by default): when a request finds an instance
  idle, the batcher does not start the batch at once but lets the event loop
  turn — every request that has already reached the server gets to join —
  and keeps turning while new requests keep arriving (it stops after two
  turns in a row bring none), up to ``max_gather_turns`` turns and
  ``max_gather`` seconds (``max_queue_delay`` when that is set). Under load,
  batches grow to what arrives together, without a fixed delay. It needs no
  timer: sub-ms timers on an idle loop sleep a whole millisecond. A batch that
  starts because the one before it finished runs at once with what waited
  meanwhile. And no batch gathers when nothing can be on its way: given the
  server's count of calls in progress (``start(calls_in_progress=...)``, the
  admission count), a batch starts at once while every one of those calls is
  already queued or running here — so one caller alone pays no loop turns,
  and a closed loop's batch starts once all its callers are queued.
* With ``max_queue_delay`` > 0, a free instance waits up to that long after the oldest
  request arrived for the batch to fill (Triton's meaning: an upper bound on
  the wait).
* With ``min_batch_interval`` > 0, an instance starts batches no more often than
  that (a full batch always starts at once), while another call may still
  submit (see gathering: with every call the server holds already here, no
  wait could fill the batch).
* With ``parallel_at_half``, while one instance runs a batch another starts
  one only once half a full batch (``target_rows // 2``) waits; otherwise
  what waits goes to the first instance to come free. Light traffic is then
  served in the larger batches of one instance, and heavy traffic by all of
  them. A request waits no longer than the running batch takes (BENCHMARKS.md,
  "Two instances or one").

Guarantees:

* The queue is bounded: ``submit`` raises :class:`QueueFull` at once when
  ``max_queue_size`` requests wait — unless a waiting request of a lower
  priority can be refused in its place (the lowest priority is shed first).
* A deadline covers queue time: the caller gets :class:`DeadlineExceeded` when
  it passes, and a request whose deadline has passed is never executed.
* A caller that is cancelled is dropped from the queue; if its batch already
  runs, the others in the batch still get their answers.
* An exception from ``execute`` (raised, or passed to ``done``) reaches every
  caller of that batch and nobody else; ``done`` may also carry an exception in
  place of one result.
* ``aclose`` refuses new work and returns once every queued and running batch
  has finished (or its ``timeout`` ran out: then each caller still waiting is
  told whether its request ran).

Time comes from a :class:`Clock`: :class:`LoopClock` (``time.monotonic()``
and the running loop's timers) unless one is injected, as the tests do to step
time by hand. Loop turns always come from the running loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from infergate.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable
from infergate.models.batch_queue import BatchQueue, Entry

__all__ = ["Batch", "BatchPolicy", "Clock", "Done", "DynamicBatcher", "Execute", "LoopClock", "Timer", "from_coroutine"]

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class Timer(Protocol):
    def when(self) -> float: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time in seconds and timers on it; an asyncio event loop is one."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> Timer: ...


class LoopClock:
    """``time.monotonic()`` and the running loop's timers: the batcher's clock unless one is injected.

    Not ``loop.time()``: uvloop's counts whole milliseconds, too coarse for
    queue times of tens of microseconds (the standard loop's *is*
    ``time.monotonic()``, so there nothing changes). uvloop's timers are
    whole milliseconds too: it rounds a delay to the nearest one (and runs one
    under half a millisecond at once), and its clock is the monotonic clock
    cut down to the millisecond. A batch woken before it is due would re-arm
    and spin until the clock catches up. So on a loop other than the standard
    one a timer is set for the first whole millisecond at or after ``when``,
    on the loop's own clock: it fires once that clock reaches it, which the
    monotonic clock has then passed too. The batch runs at most a
    millisecond late, never early.
    """

    __slots__ = ("_coarse", "_loop")

    time = staticmethod(time.monotonic)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._coarse = not isinstance(loop, asyncio.BaseEventLoop)

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> Timer:
        at = math.ceil(when * 1000) / 1000 if self._coarse else when
        return _LoopTimer(self._loop.call_at(at, callback, *args), when)


class _LoopTimer:
    __slots__ = ("_handle", "_when")

    def __init__(self, handle: asyncio.Handle, when: float) -> None:
        self._handle, self._when = handle, when

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When to form a batch and how much may wait."""

    max_batch_size: int  # rows per batch, >= 1
    max_queue_delay: float = 0.0  # seconds
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024  # waiting requests
    min_batch_interval: float = 0.0  # seconds between the starts of one instance's batches
    priority_levels: int = 1  # level 0 is the highest; submit(level=...) picks one
    gather: bool = True  # let the loop turn while requests keep arriving (see the module docstring)
    max_gather: float = 0.0005  # seconds of gathering at most, when max_queue_delay is 0
    max_gather_turns: int = 8
    parallel_at_half: bool = False  # a second instance starts a batch only once half a full batch waits

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.max_queue_size < 1
            or self.max_queue_delay < 0
            or self.min_batch_interval < 0
            or self.priority_levels < 1
            or self.max_gather < 0
            or self.max_gather_turns < 1
        ):
            raise ValueError(f"invalid batch policy {self}")
        if any(not 1 <= p <= self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes {self.preferred_batch_sizes} must lie in 1..{self.max_batch_size}")

    @property
    def target_rows(self) -> int:
        """Rows at which a batch is full: the largest preferred size, else the maximum."""
        return max(self.preferred_batch_sizes, default=self.max_batch_size)

    @property
    def gather_limit(self) -> float:
        """Seconds a batch may be held while it gathers: ``max_queue_delay`` when set, else ``max_gather``."""
        return self.max_queue_delay or self.max_gather


@dataclass(slots=True)
class Batch(Generic[T]):
    """What ``execute`` receives: payloads in queue order, their rows, and when each was queued."""

    payloads: list[T]
    payload_rows: list[int]  # rows of each payload, as submitted
    enqueued: list[float]  # clock time of each submit
    started: float  # clock time when the batch was formed
    tags: list[object] = field(default_factory=list)  # each submit's opaque tag (e.g. its trace span)

    @property
    def rows(self) -> int:
        return sum(self.payload_rows)


Outcome = Sequence[R | BaseException] | BaseException
# execute(batch, done): start running ``batch``; call ``done`` once, on the event loop.
Done = Callable[[Outcome[R]], None]
Execute = Callable[[Batch[T], Done[R]], None]


def from_coroutine(run: Callable[[Batch[T]], Awaitable[Sequence[R | BaseException]]]) -> Execute[T, R]:
    """An ``execute`` for a coroutine function (one task per batch)."""

    def execute(batch: Batch[T], done: Done[R]) -> None:
        task = asyncio.ensure_future(run(batch))

        def finished(task: asyncio.Future[Sequence[R | BaseException]]) -> None:
            if task.cancelled():
                done(Unavailable("the batch was cancelled"))
            elif (error := task.exception()) is not None:
                done(error)
            else:
                done(task.result())

        task.add_done_callback(finished)

    return execute


# Gathering stops after this many loop turns in a row with no new request: a request takes a
# few loop steps from the socket to submit(), so consecutive arrivals can land a turn apart.
_QUIET_TURNS = 2


@dataclass(slots=True)
class _Gathering:
    """A batch being gathered: since when, how many requests waited at the last loop turn,
    how many turns it has run, and how many turns in a row brought nothing."""

    since: float
    seen: int
    turns: int = 0
    quiet: int = 0


class DynamicBatcher(Generic[T, R]):
    """Forms batches from submitted payloads and runs them on ``instances`` parallel instances."""

    def __init__(
        self, execute: Execute[T, R], policy: BatchPolicy, *, instances: int, name: str, clock: Clock | None = None
    ):
        if instances < 1:
            raise ValueError("a batcher needs at least one instance")
        self._execute = execute
        self._policy = policy
        self._name = name
        self._queue: BatchQueue[T, R] = BatchQueue(policy.priority_levels, policy.max_queue_size, self._expire_entry)
        self._free = list(range(instances))  # instances with no batch running
        self._last_start = [-math.inf] * instances  # clock time each instance last started a batch
        self._running: dict[int, list[Entry[T, R]]] = {}  # instance -> its batch's entries
        self._clock = clock  # a LoopClock, from start(), unless injected
        self._timer: Timer | None = None  # wakes a batch that waits to fill
        self._gathering: _Gathering | None = None
        self._dispatching = False
        self._closing = False
        self._idle = asyncio.Event()  # set when closing and nothing is queued or running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls_in_progress: Callable[[], int] | None = None

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def depth(self) -> int:
        """Requests waiting (including ones whose callers gave up, until they are swept out)."""
        return len(self._queue)

    def start(self, calls_in_progress: Callable[[], int] | None = None) -> None:
        """Bind to the running event loop; batches can be dispatched from now on.

        ``calls_in_progress``: how many calls the server holds that may still submit (the admission
        count). While each of them is already queued or running here, no request can be on its way,
        so a batch does not gather: it starts at once.
        """
        if self._loop is not None:
            raise RuntimeError(f"batcher {self._name} already started")
        self._loop = asyncio.get_running_loop()
        self._calls_in_progress = calls_in_progress
        if self._clock is None:
            self._clock = LoopClock(self._loop)

    async def submit(
        self,
        payload: T,
        *,
        rows: int,
        group: Hashable = None,
        deadline: float | None = None,
        watch: bool = True,
        tag: object = None,
        level: int = 0,
    ) -> R:
        """Queue ``payload`` (``rows`` rows, priority ``level``, 0 the highest) and wait for its result.

        ``deadline`` is an absolute clock time: an entry past it is never executed.
        With ``watch`` a timer also fails the caller the moment it passes; pass False when
        something else already does (gRPC cancels a call at its own deadline), because
        a timer per request is a measurable share of a small model's cost. ``tag``
        travels unread to ``Batch.tags``. Raises QueueFull, DeadlineExceeded,
        Unavailable (closing) or whatever ``execute`` raised.
        """
        if self._closing or self._loop is None or self._clock is None:
            raise Unavailable(f"model {self._name} is shutting down")
        if rows > self._policy.max_batch_size or rows < 1:
            raise InvalidArgument(f"model {self._name}: {rows} rows, batches hold 1 to {self._policy.max_batch_size}")
        if not 0 <= level < self._policy.priority_levels:
            raise InvalidArgument(
                f"model {self._name}: priority level {level} outside 0..{self._policy.priority_levels}"
            )
        clock = self._clock
        now = clock.time()
        if deadline is not None and deadline <= now:  # before making room: it would take a place it never uses
            raise DeadlineExceeded(f"model {self._name}: deadline passed before queueing")
        if self._queue.full():
            self._make_room(level)
        future: asyncio.Future[R] = self._loop.create_future()
        self._queue.push(Entry(payload, rows, group, deadline, now, future, tag, level))
        self._dispatch(gather=self._policy.gather)
        if deadline is None or not watch:
            return await future
        timer = clock.call_at(deadline, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _make_room(self, level: int) -> None:
        """Make room for a request of ``level`` in a full queue, or refuse it (QueueFull)."""
        room = self._queue.make_room(level)
        if room is False:
            raise QueueFull(f"model {self._name}: queue full ({self._policy.max_queue_size} requests waiting)")
        if isinstance(room, Entry) and not room.future.done():
            room.future.set_exception(
                QueueFull(f"model {self._name}: queue full; refused for a request of higher priority")
            )

    def _expire(self, future: asyncio.Future[R]) -> None:
        if not future.done():
            future.set_exception(DeadlineExceeded(f"model {self._name}: deadline passed in queue"))

    def _expire_entry(self, entry: Entry[T, R]) -> None:
        self._expire(entry.future)

    async def aclose(self, timeout: float | None = None) -> None:
        """Refuse new work and wait until every queued and running batch finished.

        After ``timeout`` seconds, callers still waiting get Unavailable, each told whether its
        request ran: "closed before the request ran" (queued: never executed) or "closed while
        the request ran" (its batch was running; it finishes there, unobserved).
        """
        self._closing = True
        if self._loop is None:  # never started: nothing can be queued or running
            return
        self._dispatch()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            # A running batch's callers are answered now, not when it finishes: ``timeout`` is the caller's
            # bound (a server's shutdown grace), and this batcher cannot know that an ``execute`` will
            # ever call ``done``. But they are not told their request never ran: it did, or still does.
            running = Unavailable(
                f"model {self._name} was closed while the request ran: "
                "the time allowed for the close ran out before it finished"
            )
            for entries in self._running.values():
                self._resolve_all(entries, running)
            self._resolve_all(list(self._queue), Unavailable(f"model {self._name} was closed before the request ran"))
            self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _dispatch(self, gather: bool = False) -> None:
        """Start batches on free instances while some are ready; with ``gather``, a batch that
        an idle instance could start now is first gathered (see the module docstring)."""
        if self._dispatching or self._clock is None:
            return  # a done() called from inside execute(): the loop below goes on
        self._dispatching = True
        try:
            self._dispatch_ready(self._clock, gather)
        finally:
            self._dispatching = False
        if self._closing and not self._queue and not self._running:
            self._idle.set()

    def _dispatch_ready(self, clock: Clock, gather: bool) -> None:
        while self._free:
            now = clock.time()
            if not self._queue.sweep(now):
                return
            instance = min(self._free, key=self._last_start.__getitem__)  # the longest idle
            until = self._wait_until(now, self._last_start[instance])
            if until is not None:
                self._wake_at(clock, until)
                return
            if self._gathering is not None:
                return  # the next loop turn decides
            if gather and self._should_gather() and self._more_may_arrive():
                self._gathering = _Gathering(now, len(self._queue))
                self._turn()
                return
            if self._running and self._holds_for_running():
                return  # the instance that comes free first takes it (see parallel_at_half)
            entries = self._queue.take(now, self._policy.target_rows)
            if entries:
                self._launch(instance, entries, now)

    def _holds_for_running(self) -> bool:
        policy = self._policy
        return policy.parallel_at_half and not self._closing and self._queue.rows < policy.target_rows // 2

    def _should_gather(self) -> bool:
        return not self._closing and self._queue.rows < self._policy.target_rows

    def _more_may_arrive(self) -> bool:
        """False when every call the server holds is already queued or running here."""
        calls = self._calls_in_progress
        return calls is None or calls() > len(self._queue) + sum(map(len, self._running.values()))

    def _turn(self) -> None:
        assert self._loop is not None
        self._loop.call_soon(self._on_turn)

    def _on_turn(self) -> None:
        """One loop turn of gathering: go on while requests keep arriving, within the limits."""
        gathering = self._gathering
        if gathering is None or self._clock is None:
            return
        gathering.turns += 1
        gathering.quiet = 0 if len(self._queue) > gathering.seen else gathering.quiet + 1
        gathering.seen = len(self._queue)
        within = (
            gathering.turns < self._policy.max_gather_turns
            and self._clock.time() - gathering.since < self._policy.gather_limit
        )
        if gathering.quiet < _QUIET_TURNS and within and self._should_gather() and self._more_may_arrive():
            self._turn()
            return
        self._gathering = None
        self._dispatch()

    def _wake_at(self, clock: Clock, when: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = clock.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _wait_until(self, now: float, last_start: float) -> float | None:
        """Until when to let the batch fill; None: run it now.

        A full batch runs at once. Otherwise it waits for ``max_queue_delay``
        after its oldest request arrived, and for ``min_batch_interval`` after
        this instance's previous batch started, whichever ends later. The
        interval is waited only while another call may still submit: it exists
        to share a batch's fixed cost, and with every call already here (one
        caller, or an ensemble's next step) nothing could join.
        """
        if self._closing or self._queue.rows >= self._policy.target_rows:
            return None
        until = self._queue.oldest().enqueued + self._policy.max_queue_delay
        interval_ends = last_start + self._policy.min_batch_interval
        if interval_ends > until and interval_ends > now and self._more_may_arrive():
            until = interval_ends
        return until if now < until else None

    def _launch(self, instance: int, entries: list[Entry[T, R]], now: float) -> None:
        self._free.remove(instance)
        self._last_start[instance] = now
        self._running[instance] = entries
        batch = Batch(
            payloads=[e.payload for e in entries],
            payload_rows=[e.rows for e in entries],
            enqueued=[e.enqueued for e in entries],
            started=now,
            tags=[e.tag for e in entries],
        )
        done = functools.partial(self._finish, instance, entries)
        try:
            self._execute(batch, done)
        except Exception as exc:  # a failure to even start: every caller of the batch gets it
            done(exc)

    def _finish(self, instance: int, entries: list[Entry[T, R]], outcome: Outcome[R]) -> None:
        """``done`` of one batch: free its instance, answer its callers, start what is ready."""
        if self._running.get(instance) is not entries:
            return  # called twice, or after aclose gave up on it
        del self._running[instance]
        self._free.append(instance)
        if not isinstance(outcome, BaseException) and len(outcome) != len(entries):
            outcome = RuntimeError(f"execute returned {len(outcome)} results for {len(entries)} requests")
        if isinstance(outcome, BaseException):
            self._resolve_all(entries, outcome)
        else:
            for entry, result in zip(entries, outcome, strict=True):
                if entry.future.done():
                    continue  # cancelled or expired while the batch ran
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)
        self._dispatch()  # what waited during this batch starts at once

    @staticmethod
    def _resolve_all(entries: list[Entry[T, R]], error: BaseException) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)
