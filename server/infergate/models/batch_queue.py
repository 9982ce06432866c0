"""The batcher's waiting room: one FIFO per priority level, bounded in total, and how a batch is taken from it.

Level 0 is the highest priority. A batch is headed by the oldest live request
of the highest level that has one, and filled behind it with requests of the
same group, higher levels first, each level in arrival order. When the room is
full, a request may take the place of the newest waiting request of a lower
level (which is refused instead): under overload, the lowest priority is shed
first. Entries whose caller gave up (cancelled, or past its deadline) stay
until they are swept, so that giving up costs the caller nothing here.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["BatchQueue", "Entry"]

T = TypeVar("T")
R = TypeVar("R")


class Entry(Generic[T, R]):
    """One submitted request, waiting or in a batch."""

    __slots__ = ("deadline", "enqueued", "future", "group", "level", "payload", "rows", "tag")

    def __init__(
        self,
        payload: T,
        rows: int,
        group: Hashable,
        deadline: float | None,
        enqueued: float,
        future: asyncio.Future[R],
        tag: object,
        level: int = 0,
    ) -> None:
        self.payload = payload
        self.rows = rows
        self.group = group
        self.deadline = deadline
        self.enqueued = enqueued
        self.future = future
        self.tag = tag
        self.level = level


Expire = Callable[[Entry[T, R]], None]  # fails an entry whose deadline passed


class BatchQueue(Generic[T, R]):
    """Waiting entries by priority level; ``expire`` fails an entry found past its deadline."""

    def __init__(self, levels: int, max_size: int, expire: Expire[T, R]):
        self._levels: list[collections.deque[Entry[T, R]]] = [collections.deque() for _ in range(max(levels, 1))]
        self._max_size = max_size
        self._expire = expire
        self._size = 0
        self.rows = 0  # rows of every waiting entry, live or not yet swept

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Entry[T, R]]:
        for level in self._levels:
            yield from level

    def clear(self) -> None:
        for level in self._levels:
            level.clear()
        self._size = self.rows = 0

    def push(self, entry: Entry[T, R]) -> None:
        self._levels[entry.level].append(entry)
        self._size += 1
        self.rows += entry.rows

    def full(self) -> bool:
        return self._size >= self._max_size

    def make_room(self, level: int) -> Entry[T, R] | bool:
        """Room for one entry of ``level`` when full: True if entries that gave up were dropped;
        else the newest live entry of a lower level, removed (its caller must be refused);
        else False. Runs only when the queue looks full, so the common path stays O(1)."""
        for waiting in self._levels:
            live = [e for e in waiting if not e.future.done()]
            if len(live) != len(waiting):
                self.rows -= sum(e.rows for e in waiting if e.future.done())
                self._size -= len(waiting) - len(live)
                waiting.clear()
                waiting.extend(live)
        if self._size < self._max_size:
            return True
        for lower in reversed(self._levels[level + 1 :]):
            if lower:
                evicted = lower.pop()
                self._size -= 1
                self.rows -= evicted.rows
                return evicted
        return False

    def sweep(self, now: float) -> bool:
        """Drop dead entries from the front of every level; True if a live one waits."""
        found = False
        for waiting in self._levels:
            while waiting and not self._live(waiting[0], now):
                self._drop(waiting.popleft())
            found = found or bool(waiting)
        return found

    def oldest(self) -> Entry[T, R]:
        """The entry that heads the next batch (after :meth:`sweep` found one)."""
        return next(level[0] for level in self._levels if level)

    def take(self, now: float, limit: int) -> list[Entry[T, R]]:
        """Pop the head entry and the live entries of its group that fit behind it, up to ``limit`` rows.

        A request is never split; the head always goes, even past a preferred size.
        """
        head = self.oldest()
        taken: list[Entry[T, R]] = []
        rows = 0
        for waiting in self._levels:
            other_groups: list[Entry[T, R]] = []
            while waiting and rows < limit:
                entry = waiting[0]
                if not self._live(entry, now):
                    self._drop(waiting.popleft())
                elif entry.group != head.group:
                    other_groups.append(waiting.popleft())
                elif taken and rows + entry.rows > limit:
                    break
                else:
                    self._drop(waiting.popleft())
                    taken.append(entry)
                    rows += entry.rows
            waiting.extendleft(reversed(other_groups))
            if rows >= limit:
                break
        return taken

    def _live(self, entry: Entry[T, R], now: float) -> bool:
        if entry.future.done():
            return False
        if entry.deadline is not None and entry.deadline <= now:
            self._expire(entry)
            return False
        return True

    def _drop(self, entry: Entry[T, R]) -> None:
        self._size -= 1
        self.rows -= entry.rows
