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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

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
) -> AsyncIterator[Resp]:
    """Yield ``answer(request)`` for every request; ``answer`` must turn failures into answers.

    The reader task is cancelled and awaited on every way out (the stream ends,
    the client cancels, the server stops), so nothing it started outlives the call.
    """
    answers: asyncio.Queue[object] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    reader = asyncio.create_task(_read(requests, answer, answers, slots, on_pause))
    try:
        while (response := await answers.get()) is not _END:
            yield response  # type: ignore[misc]  # everything but _END is an answer
            slots.release()  # gRPC took the previous answer: room for one more request
        await reader  # re-raises a failure of the reader
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _read(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    answers: asyncio.Queue[object],
    slots: asyncio.Semaphore,
    on_pause: OnPause | None,
) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        answers.put_nowait(await answer(request))

    try:
        async for request in requests:
            await _acquire(slots, on_pause)
            task = asyncio.create_task(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        answers.put_nowait(_END)


async def _acquire(slots: asyncio.Semaphore, on_pause: OnPause | None) -> None:
    if not slots.locked() or on_pause is None:
        await slots.acquire()
        return
    on_pause(1)
    try:
        await slots.acquire()
    finally:
        on_pause(-1)
