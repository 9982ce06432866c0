"""A bidirectional stream's requests answered concurrently (so that they batch), with backpressure.

:func:`answer_concurrently` reads requests in a task of its own and answers
several at once; answers are yielded as soon as they are ready (so they may
come back out of order: each carries its request's id).

Backpressure: at most ``window`` requests of one stream are in progress or
answered but not yet taken by gRPC. A slot is freed only when gRPC asks for
the next answer, which it does once it has handed the previous one to the
transport; a client that stops reading fills its flow-control window, gRPC
stops asking, and the reader stops reading requests until the client reads
again. So a stream holds at most ``window`` answers in memory, whatever its
client sends.

Draining: when ``closing`` is set, the stream reads no more requests, answers
every request it has read, and then ends with UNAVAILABLE, so the client
knows to send the rest elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from infergate.errors import Unavailable

__all__ = ["answer_concurrently"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

OnPause = Callable[[int], None]  # +1 when a stream stops reading for its client, -1 when it resumes

_END = object()  # the reader's last word: no more answers will come


async def answer_concurrently(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    window: int,
    on_pause: OnPause | None = None,
    closing: asyncio.Event | None = None,
) -> AsyncIterator[Resp]:
    """Yield ``answer(request)`` for every request; ``answer`` must turn failures into answers.

    Raises Unavailable after the last answer when ``closing`` stopped the reading.
    The reader task is cancelled and awaited on every way out (the stream ends,
    the client cancels, the server stops), so nothing it started outlives the call.
    """
    answers: asyncio.Queue[object] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    stop = closing or asyncio.Event()
    reading = _Reading()
    reader = asyncio.create_task(_read(requests, answer, answers, slots, on_pause, stop, reading))
    watcher = asyncio.create_task(stop.wait())
    watcher.add_done_callback(lambda _: reader.cancel() if reading.on else None)  # only a reader still reading
    try:
        while (response := await answers.get()) is not _END:
            yield response  # type: ignore[misc]  # everything but _END is an answer
            slots.release()  # gRPC took the previous answer: room for one more request
        if await reader:
            raise Unavailable("the server is shutting down: the stream's later requests were not read; send them again")
    finally:
        watcher.cancel()
        reader.cancel()
        await asyncio.gather(reader, watcher, return_exceptions=True)


async def _read(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    answers: asyncio.Queue[object],
    slots: asyncio.Semaphore,
    on_pause: OnPause | None,
    closing: asyncio.Event,
    reading: _Reading,
) -> bool:
    """Read and answer until the requests end; True if ``closing`` cut the reading short."""
    tasks: set[asyncio.Task[None]] = set()

    def start(request: Req) -> None:
        task = asyncio.create_task(one(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def one(request: Req) -> None:
        answers.put_nowait(await answer(request))

    closed = False
    waiting: list[Req] = []  # a request read that waits for a slot
    try:
        try:
            async for request in requests:
                waiting.append(request)
                await _acquire(slots, on_pause)
                start(waiting.pop())
            reading.on = False
        except asyncio.CancelledError:
            if not closing.is_set():
                raise
            current = asyncio.current_task()
            assert current is not None
            current.uncancel()  # the server is closing: read no more, but answer what was read
            reading.on, closed = False, True
            for request in waiting:  # read, so answered too: one over the window, once
                start(request)
        await asyncio.gather(*tasks)
        return closed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        answers.put_nowait(_END)


class _Reading:
    """Whether the reader is still reading requests (closing interrupts only that, never the answering)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


async def _acquire(slots: asyncio.Semaphore, on_pause: OnPause | None) -> None:
    if not slots.locked() or on_pause is None:
        await slots.acquire()
        return
    on_pause(1)
    try:
        await slots.acquire()
    finally:
        on_pause(-1)
