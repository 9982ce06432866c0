"""The dynamic batcher: one bounded queue per model version, feeding its instances.

It is generic: it knows nothing of gRPC or onnxruntime. Callers ``submit`` a
payload with its row count and a *group* key (requests whose non-batch
dimensions differ must not share a batch); ``workers`` loops form batches and
hand them to an ``execute`` coroutine, then resolve each caller's future with
its own result.

Batching policy (Triton's ``dynamic_batching``):

* A free worker takes the oldest waiting request and, behind it, every waiting
  request of the same group while the batch stays within ``max_batch_size``
  rows (``target_rows`` when preferred sizes are set). Multi-row requests take
  that many rows and are never split.
* With ``max_queue_delay`` > 0, a worker waits up to that long after the oldest
  request arrived for the batch to fill; with 0 (the default) it runs what is
  there, so batches grow exactly as fast as the instances are busy.
* With ``min_batch_interval`` > 0, a worker starts batches no more often than
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
* An exception from ``execute`` reaches every caller of that batch and nobody
  else; ``execute`` may also return an exception in place of one result.
* ``aclose`` refuses new work, lets the workers drain what is queued, then stops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable

__all__ = ["Batch", "BatchPolicy", "DynamicBatcher"]

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When to form a batch and how much may wait."""

    max_batch_size: int  # rows per batch, >= 1
    max_queue_delay: float = 0.0  # seconds
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024  # waiting requests
    min_batch_interval: float = 0.0  # seconds between the starts of one worker's batches

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
    """What ``execute`` receives: payloads in queue order, and when each was queued."""

    payloads: list[T]
    rows: int
    enqueued: list[float]  # loop.time() of each submit
    started: float  # loop.time() when the batch was formed


class _Entry(Generic[T, R]):
    __slots__ = ("deadline", "enqueued", "future", "group", "payload", "rows")

    def __init__(
        self,
        payload: T,
        rows: int,
        group: Hashable,
        deadline: float | None,
        enqueued: float,
        future: asyncio.Future[R],
    ) -> None:
        self.payload = payload
        self.rows = rows
        self.group = group
        self.deadline = deadline
        self.enqueued = enqueued
        self.future = future


Execute = Callable[[Batch[T]], Awaitable[Sequence[R | BaseException]]]


class DynamicBatcher(Generic[T, R]):
    """Forms batches from submitted payloads and runs them on ``workers`` parallel loops."""

    def __init__(self, execute: Execute[T, R], policy: BatchPolicy, *, workers: int, name: str):
        if workers < 1:
            raise ValueError("a batcher needs at least one worker")
        self._execute = execute
        self._policy = policy
        self._name = name
        self._worker_count = workers
        self._queue: collections.deque[_Entry[T, R]] = collections.deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()  # set when the queue may hold work
        self._full = asyncio.Event()  # set when a batch is full before its delay ran out
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def depth(self) -> int:
        """Requests waiting (including ones whose callers gave up, until they are swept out)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the worker loops on the running event loop."""
        if self._workers:
            raise RuntimeError(f"batcher {self._name} already started")
        self._workers = [
            asyncio.create_task(self._work(), name=f"batcher-{self._name}-{i}") for i in range(self._worker_count)
        ]

    async def submit(self, payload: T, *, rows: int, group: Hashable = None, deadline: float | None = None) -> R:
        """Queue ``payload`` (``rows`` rows) and wait for its result.

        ``deadline`` is an absolute ``loop.time()``. Raises QueueFull,
        DeadlineExceeded, Unavailable (closing) or whatever ``execute`` raised.
        """
        if self._closing:
            raise Unavailable(f"model {self._name} is shutting down")
        if rows > self._policy.max_batch_size or rows < 1:
            raise InvalidArgument(f"model {self._name}: {rows} rows, batches hold 1 to {self._policy.max_batch_size}")
        if len(self._queue) >= self._policy.max_queue_size and not self._make_room():
            raise QueueFull(f"model {self._name}: queue full ({self._policy.max_queue_size} requests waiting)")
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"model {self._name}: deadline passed before queueing")
        future: asyncio.Future[R] = loop.create_future()
        entry = _Entry(payload, rows, group, deadline, now, future)
        self._queue.append(entry)
        self._queued_rows += rows
        self._wakeup.set()
        if self._queued_rows >= self._policy.target_rows:
            self._full.set()
        if deadline is None:
            return await future
        timer = loop.call_at(deadline, self._expire, future)
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
        """Refuse new work, run what is queued, stop the workers.

        After ``timeout`` seconds the workers are cancelled and callers still
        waiting get Unavailable.
        """
        self._closing = True
        self._wakeup.set()
        self._full.set()
        if not self._workers:
            self._fail_all(Unavailable(f"model {self._name} was closed"))
            return
        _, pending = await asyncio.wait(self._workers, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._fail_all(Unavailable(f"model {self._name} was closed before running the request"))

    def _fail_all(self, error: Exception) -> None:
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(error)
        self._queued_rows = 0

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        last_start = -math.inf
        while True:
            entries = await self._next_batch(last_start)
            if not entries:
                return
            last_start = loop.time()
            await self._run(entries)

    async def _next_batch(self, last_start: float) -> list[_Entry[T, R]]:
        """Wait for work and form one batch; [] once closing and drained.

        ``last_start`` is when this worker started its previous batch.
        """
        loop = asyncio.get_running_loop()
        while True:
            self._sweep_head(loop.time())
            if not self._queue:
                if self._closing:
                    return []
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            until = self._wait_until(loop.time(), last_start)
            if until is not None:
                self._full.clear()
                try:
                    async with asyncio.timeout_at(until):
                        await self._full.wait()
                except TimeoutError:
                    pass
                continue  # another worker may have taken the queue meanwhile
            entries = self._take(loop.time())
            if entries:
                return entries

    def _wait_until(self, now: float, last_start: float) -> float | None:
        """Until when to let the batch fill; None: run it now.

        A full batch runs at once. Otherwise it waits for ``max_queue_delay``
        after its oldest request arrived, and for ``min_batch_interval`` after
        this worker's previous batch started, whichever ends later.
        """
        if self._closing or self._queued_rows >= self._policy.target_rows:
            return None
        until = max(
            self._queue[0].enqueued + self._policy.max_queue_delay,
            last_start + self._policy.min_batch_interval,
        )
        return until if now < until else None

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

    async def _run(self, entries: list[_Entry[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        batch = Batch(
            payloads=[e.payload for e in entries],
            rows=sum(e.rows for e in entries),
            enqueued=[e.enqueued for e in entries],
            started=loop.time(),
        )
        try:
            results = await self._execute(batch)
            if len(results) != len(entries):
                raise RuntimeError(f"execute returned {len(results)} results for {len(entries)} requests")
        except asyncio.CancelledError:
            self._resolve_all(entries, Unavailable(f"model {self._name} stopped during the batch"))
            raise
        except Exception as exc:
            self._resolve_all(entries, exc)
            return
        for entry, result in zip(entries, results, strict=True):
            if entry.future.done():
                continue  # cancelled or expired while the batch ran
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)

    @staticmethod
    def _resolve_all(entries: list[_Entry[T, R]], error: BaseException) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)
