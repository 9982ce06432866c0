"""The dynamic batcher: one bounded queue per model version, feeding its instances.

It is generic: it knows nothing of gRPC or onnxruntime. Callers ``submit`` a
payload with its row count and a *group* key (requests whose non-batch
dimensions differ must not share a batch). Whenever one of the ``instances``
is free, a batch is formed and handed to ``execute(batch, done)``,
which runs it elsewhere (a thread) and calls ``done`` on the event loop with
the results; each caller's future then gets its own result.

Dispatch is driven by events, not by worker tasks: a batch starts inside the
``submit`` that makes it ready, inside the ``done`` of the batch before it, or
from a timer when it waits to fill. This keeps the hand-off to the instance
and the answer to the caller one event-loop step each, which is most of a
small model's latency (see BENCHMARKS.md).

Batching policy (Triton's ``dynamic_batching``):

* A free instance takes the oldest waiting request and, behind it, every waiting
  request of the same group while the batch stays within ``max_batch_size``
  rows (``target_rows`` when preferred sizes are set). Multi-row requests take
  that many rows and are never split.
* With ``max_queue_delay`` > 0, a free instance waits up to that long after the oldest
  request arrived for the batch to fill; with 0 (the default) it runs what is
  there, so batches grow exactly as fast as the instances are busy.
* With ``min_batch_interval`` > 0, an instance starts batches no more often than
  that (a full batch always starts at once). Requests spaced further apart
  than the interval wait for nothing; under load, batches grow, so the fixed
  cost of running a batch is paid less often.

Guarantees:

* The queue is bounded: ``submit`` raises :class:`QueueFull` at once when
  ``max_queue_size`` requests wait.
* A deadline covers queue time: the caller gets :class:`DeadlineExceeded` when
  it passes, and a request whose deadline has passed is never executed.
* A caller that is cancelled is dropped from the queue; if its batch already
  runs, the others in the batch still get their answers.
* An exception from ``execute`` (raised, or passed to ``done``) reaches every
  caller of that batch and nobody else; ``done`` may also carry an exception in
  place of one result.
* ``aclose`` refuses new work and returns once every queued and running batch
  has finished.

Time comes from a :class:`Clock`: the running event loop's (``loop.time()``
and ``loop.call_at``) unless one is injected, as the tests do to step time
by hand.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from infergate.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable

__all__ = ["Batch", "BatchPolicy", "Clock", "Done", "DynamicBatcher", "Execute", "Timer", "from_coroutine"]

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


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When to form a batch and how much may wait."""

    max_batch_size: int  # rows per batch, >= 1
    max_queue_delay: float = 0.0  # seconds
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024  # waiting requests
    min_batch_interval: float = 0.0  # seconds between the starts of one instance's batches

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.max_queue_size < 1
            or self.max_queue_delay < 0
            or self.min_batch_interval < 0
        ):
            raise ValueError(f"invalid batch policy {self}")
        if any(not 1 <= p <= self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes {self.preferred_batch_sizes} must lie in 1..{self.max_batch_size}")

    @property
    def target_rows(self) -> int:
        """Rows at which a batch is full: the largest preferred size, else the maximum."""
        return max(self.preferred_batch_sizes, default=self.max_batch_size)


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


class _Entry(Generic[T, R]):
    __slots__ = ("deadline", "enqueued", "future", "group", "payload", "rows", "tag")

    def __init__(
        self,
        payload: T,
        rows: int,
        group: Hashable,
        deadline: float | None,
        enqueued: float,
        future: asyncio.Future[R],
        tag: object,
    ) -> None:
        self.payload = payload
        self.rows = rows
        self.group = group
        self.deadline = deadline
        self.enqueued = enqueued
        self.future = future
        self.tag = tag


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
        self._queue: collections.deque[_Entry[T, R]] = collections.deque()
        self._queued_rows = 0
        self._free = list(range(instances))  # instances with no batch running
        self._last_start = [-math.inf] * instances  # clock time each instance last started a batch
        self._running: dict[int, list[_Entry[T, R]]] = {}  # instance -> its batch's entries
        self._clock = clock  # the loop's, from start(), unless injected
        self._timer: Timer | None = None  # wakes a batch that waits to fill
        self._dispatching = False
        self._closing = False
        self._idle = asyncio.Event()  # set when closing and nothing is queued or running
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def depth(self) -> int:
        """Requests waiting (including ones whose callers gave up, until they are swept out)."""
        return len(self._queue)

    def start(self) -> None:
        """Bind to the running event loop; batches can be dispatched from now on."""
        if self._loop is not None:
            raise RuntimeError(f"batcher {self._name} already started")
        self._loop = asyncio.get_running_loop()
        if self._clock is None:
            self._clock = self._loop

    async def submit(
        self,
        payload: T,
        *,
        rows: int,
        group: Hashable = None,
        deadline: float | None = None,
        watch: bool = True,
        tag: object = None,
    ) -> R:
        """Queue ``payload`` (``rows`` rows) and wait for its result.

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
        if len(self._queue) >= self._policy.max_queue_size and not self._make_room():
            raise QueueFull(f"model {self._name}: queue full ({self._policy.max_queue_size} requests waiting)")
        clock = self._clock
        now = clock.time()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"model {self._name}: deadline passed before queueing")
        future: asyncio.Future[R] = self._loop.create_future()
        self._queue.append(_Entry(payload, rows, group, deadline, now, future, tag))
        self._queued_rows += rows
        self._dispatch()
        if deadline is None or not watch:
            return await future
        timer = clock.call_at(deadline, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _make_room(self) -> bool:
        """Drop every entry whose caller gave up; True if that freed a place.

        Runs only when the queue looks full, so the common path stays O(1).
        """
        live = [e for e in self._queue if not e.future.done()]
        if len(live) == len(self._queue):
            return False
        self._queue = collections.deque(live)
        self._queued_rows = sum(e.rows for e in live)
        return len(live) < self._policy.max_queue_size

    def _expire(self, future: asyncio.Future[R]) -> None:
        if not future.done():
            future.set_exception(DeadlineExceeded(f"model {self._name}: deadline passed in queue"))

    async def aclose(self, timeout: float | None = None) -> None:
        """Refuse new work and wait until every queued and running batch finished.

        After ``timeout`` seconds, callers still waiting get Unavailable (a batch
        already running on an instance finishes there, unobserved).
        """
        self._closing = True
        if self._loop is None:  # never started: nothing can be queued or running
            return
        self._dispatch()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            error = Unavailable(f"model {self._name} was closed before the request ran")
            for entries in self._running.values():
                self._resolve_all(entries, error)
            self._resolve_all(list(self._queue), error)
            self._queue.clear()
            self._queued_rows = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _dispatch(self) -> None:
        """Start batches on free instances while some are ready."""
        if self._dispatching or self._clock is None:
            return  # a done() called from inside execute(): the loop below goes on
        self._dispatching = True
        try:
            self._dispatch_ready(self._clock)
        finally:
            self._dispatching = False
        if self._closing and not self._queue and not self._running:
            self._idle.set()

    def _dispatch_ready(self, clock: Clock) -> None:
        while self._free:
            now = clock.time()
            self._sweep_head(now)
            if not self._queue:
                return
            instance = min(self._free, key=self._last_start.__getitem__)  # the longest idle
            until = self._wait_until(now, self._last_start[instance])
            if until is not None:
                self._wake_at(clock, until)
                return
            entries = self._take(now)
            if entries:
                self._launch(instance, entries, now)

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
        this instance's previous batch started, whichever ends later.
        """
        if self._closing or self._queued_rows >= self._policy.target_rows:
            return None
        until = max(
            self._queue[0].enqueued + self._policy.max_queue_delay,
            last_start + self._policy.min_batch_interval,
        )
        return until if now < until else None

    def _launch(self, instance: int, entries: list[_Entry[T, R]], now: float) -> None:
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

    def _finish(self, instance: int, entries: list[_Entry[T, R]], outcome: Outcome[R]) -> None:
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
        self._dispatch()

    def _sweep_head(self, now: float) -> None:
        """Drop cancelled and expired entries from the front of the queue."""
        queue = self._queue
        while queue and not self._live(queue[0], now):
            self._queued_rows -= queue.popleft().rows

    def _live(self, entry: _Entry[T, R], now: float) -> bool:
        if entry.future.done():
            return False
        if entry.deadline is not None and entry.deadline <= now:
            self._expire(entry.future)
            return False
        return True

    def _take(self, now: float) -> list[_Entry[T, R]]:
        """Pop the head entry and the live entries of its group that fit behind it."""
        queue = self._queue
        group = queue[0].group
        limit = self._policy.target_rows
        taken: list[_Entry[T, R]] = []
        other_groups: list[_Entry[T, R]] = []
        rows = 0
        while queue:
            entry = queue[0]
            if not self._live(entry, now):
                self._queued_rows -= queue.popleft().rows
            elif entry.group != group:
                other_groups.append(queue.popleft())
            elif taken and rows + entry.rows > limit:
                break  # never split a request; the head always goes, even past a preferred size
            else:
                queue.popleft()
                self._queued_rows -= entry.rows
                taken.append(entry)
                rows += entry.rows
                if rows >= limit:
                    break
        queue.extendleft(reversed(other_groups))
        return taken

    @staticmethod
    def _resolve_all(entries: list[_Entry[T, R]], error: BaseException) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)
