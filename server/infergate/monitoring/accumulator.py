"""A bounded queue and the one background thread that drains it: the request path's hand-off.

The event loop calls :meth:`Accumulator.offer`, which costs one ``qsize`` and
one ``SimpleQueue.put`` (both in C, no lock the worker can hold for long) and
never blocks: when ``capacity`` items already wait, or the items waiting hold
``max_bytes`` (as their producer sized them: a queued request keeps its
tensors alive), the item is dropped and counted. The worker thread takes items in batches and calls ``process`` with
them; numpy work and file writes happen there, never on the loop.

Why a thread and not an asyncio task: everything the worker does is CPU or
file work that would stall the loop, so a task would only forward each batch
to an executor thread anyway; owning that thread directly saves the hop.
It is started by :meth:`start` and stopped by :meth:`aclose`, which lets the
worker finish what was already queued (bounded by ``capacity``).

The bounds hold exactly for one producer thread (the event loop): only the
worker removes items, so the queue can only shrink between the check and the
put. The bytes waiting are two counters that each have a single writer (the
producer adds, the worker subtracts), so no lock is needed for them either.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from infergate import threadnames

__all__ = ["QUEUE_BYTES", "Accumulator", "Sampler", "kept_inputs", "tensor_bytes"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The most tensor bytes that sampled requests may keep alive while they wait, per accumulator.
QUEUE_BYTES = 64 * 1024 * 1024


def tensor_bytes(*groups: Mapping[str, Any]) -> int:
    """The bytes a request's arrays hold: O(number of tensors), plus O(elements) for text tensors, whose
    elements count their references and their length (a queued request keeps its text alive)."""
    return sum(_array_bytes(array) for tensors in groups for array in tensors.values())


def _array_bytes(array: Any) -> int:
    size = int(getattr(array, "nbytes", 0))
    if isinstance(array, np.ndarray) and array.dtype == object:
        size += sum(len(v) for v in array.flat if isinstance(v, bytes | bytearray | str))
    return size


class _Stop:
    """The sentinel that ends the worker (never dropped, whatever the bound)."""


_STOP = _Stop()


class Accumulator(Generic[T]):
    """Hands items from the event loop to ``process`` on a worker thread, ``max_batch`` at a time.

    ``tick`` (optional) runs on the worker whenever ``tick_seconds`` pass with
    nothing queued, for work that is due by time rather than by items.
    Exceptions from ``process`` and ``tick`` are logged and counted, never
    raised: the worker keeps going.
    """

    def __init__(
        self,
        name: str,
        process: Callable[[list[T]], None],
        *,
        capacity: int,
        max_bytes: int | None = None,
        tick: Callable[[], None] | None = None,
        tick_seconds: float = 1.0,
        max_batch: int = 64,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.accepted = 0
        self.dropped = 0
        self.errors = 0
        self._process = process
        self._tick = tick
        self._tick_seconds = tick_seconds
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[T, int] | _Stop] = queue.SimpleQueue()
        self._bytes_in = 0  # written by the producer only
        self._bytes_out = 0  # written by the worker only
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def waiting_bytes(self) -> int:
        return self._bytes_in - self._bytes_out

    def offer(self, item: T, size: int = 0) -> bool:
        """Queue ``item`` (holding ``size`` bytes) unless the queue is full, by count or by bytes, or the
        accumulator is closed; never blocks."""
        full = self._queue.qsize() >= self.capacity
        if full or self._closed or (self.max_bytes is not None and self.waiting_bytes + size > self.max_bytes):
            self.dropped += 1
            return False
        self._bytes_in += size
        self._queue.put((item, size))
        self.accepted += 1
        return True

    def start(self) -> None:
        """Start the worker thread (once; a closed accumulator stays closed)."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """Refuse new items, let the worker finish the queued ones, and wait for it (off the loop)."""
        thread = self._stop()
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def close(self) -> None:
        """:meth:`aclose` for callers without a loop (blocking)."""
        thread = self._stop()
        if thread is not None:
            thread.join()

    def _stop(self) -> threading.Thread | None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        thread, self._thread = self._thread, None
        return thread

    def _work(self) -> None:
        threadnames.name_after_python()
        while True:
            try:
                first = self._queue.get(timeout=self._tick_seconds)
            except queue.Empty:
                if self._tick is not None:
                    self._guard(self._tick)
                continue
            batch: list[T] = []
            size = 0
            entry: tuple[T, int] | _Stop = first
            while not isinstance(entry, _Stop):
                batch.append(entry[0])
                size += entry[1]
                if len(batch) >= self._max_batch:
                    break
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._guard(functools.partial(self._process, batch))
                self._bytes_out += size  # only now: until processed, the items hold their memory
            if isinstance(entry, _Stop):
                return

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:  # the cause once, then a reminder now and then
                log.exception("%s: background work failed (%d failure(s) so far)", self.name, self.errors)


class Sampler:
    """Counts the requests offered to a consumer and draws the ``fraction`` of them it samples.

    The drift monitor and the payload log each own one; ``requests`` and
    ``sampled`` are what their status and metrics report.
    """

    __slots__ = ("_fraction", "_rng", "requests", "sampled")

    def __init__(self, fraction: float, rng: random.Random | None = None) -> None:
        self._fraction = fraction
        self._rng = rng or random.Random()
        self.requests = 0
        self.sampled = 0

    def draw(self) -> bool:
        """Count one request; True when it is sampled."""
        self.requests += 1
        fraction = self._fraction
        if fraction <= 0.0 or (fraction < 1.0 and self._rng.random() >= fraction):
            return False
        self.sampled += 1
        return True


def kept_inputs(inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """Copies of a request's inputs to keep past its answer: an input may be a view of a client's
    shared memory, or of a larger buffer that the copy does not keep alive."""
    return {name: np.array(array) for name, array in inputs.items()}
