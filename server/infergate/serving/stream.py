"""A bidirectional stream's requests answered concurrently, so that they batch.

:func:`answer_concurrently` reads requests in a task of its own, answers up to
``concurrency`` of them at once and yields each answer as soon as it is ready
(so answers may come back out of order: each carries its request's id).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

__all__ = ["answer_concurrently"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def answer_concurrently(
    requests: AsyncIterator[Req], answer: Callable[[Req], Awaitable[Resp]], concurrency: int
) -> AsyncIterator[Resp]:
    """Yield ``answer(request)`` for every request; ``answer`` must turn failures into answers."""
    answers: asyncio.Queue[Resp | None] = asyncio.Queue()
    reader = asyncio.create_task(_read(requests, answer, answers, concurrency))
    try:
        while (response := await answers.get()) is not None:
            yield response
        await reader  # re-raises a failure of the reader
    finally:
        reader.cancel()


async def _read(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    answers: asyncio.Queue[Resp | None],
    concurrency: int,
) -> None:
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        try:
            await answers.put(await answer(request))
        finally:
            slots.release()

    try:
        async for request in requests:
            await slots.acquire()
            task = asyncio.create_task(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await answers.put(None)
