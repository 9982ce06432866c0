"""A bidirectional stream's requests answered concurrently (so that they batch), in order, with backpressure.

:func:`answer_concurrently` reads requests in a task of its own and answers
several at once, but yields the answers in the order the requests arrived, as
Triton answers a non-decoupled model's requests on a stream (its
``stream_infer_handler.cc`` queues each for its response as it is read):
tritonclient users who send no request id pair answers with requests by
position. Each request read becomes a task, appended to a FIFO; the answers
side takes the FIFO's head and awaits it. So a slow request holds back the
answers behind it (they are ready and wait), as in Triton, while the requests
behind it still run, and batch, concurrently. A failure is an answer too
(``answer`` turns it into one), so it takes its place in the order.

Backpressure: at most ``window`` requests of one stream are in progress or
answered but not yet taken by gRPC. A slot is freed only when gRPC asks for
the next answer, which it does once it has handed the previous one to the
transport; a client that stops reading fills its flow-control window, gRPC
stops asking, and the reader stops reading requests until the client reads
again. So a stream holds at most ``window`` answers in memory, whatever its
client sends; answers waiting behind a slow one count too.

Why order and window cannot wait for each other forever: the head of the FIFO
is always a request already read and running (a slot is taken before its task
starts, and every task is in the FIFO), so the answers side waits only for the
model, never for the reader; the reader waits only for the answers side. A
request's model finishes it without any later request of its stream, or within
a bound the model's config sets when a later one would help (a batch waiting
to fill waits at most ``max_queue_delay_microseconds``; a sequence that waits
for a slot gets one when a sequence ends or idles out,
``max_sequence_idle_microseconds``), so the head is always answered.

Draining: when ``closing`` is set, the stream reads no more requests, answers
every request it has read, in order, and then ends with UNAVAILABLE, so the
client knows to send the rest elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from infergate.errors import Unavailable

__all__ = ["answer_concurrently"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

OnPause = Callable[[int], None]  # +1 when a stream stops reading (its window is full), -1 when it resumes


async def answer_concurrently(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Coroutine[Any, Any, Resp]],
    window: int,
    on_pause: OnPause | None = None,
    closing: asyncio.Event | None = None,
) -> AsyncIterator[Resp]:
    """Yield ``answer(request)`` for every request, in the requests' order; ``answer`` must turn
    failures into answers.

    Raises Unavailable after the last answer when ``closing`` stopped the reading, and an error
    ``requests`` raised (a request that does not parse) after the answers to the requests read before it:
    the caller, which writes the answers, ends the call with it (this module never touches the call).
    The reader task is cancelled and awaited on every way out (the stream ends,
    the client cancels, the server stops), and it cancels and awaits every answer
    it started, so nothing the call started outlives it.
    """
    answers: asyncio.Queue[asyncio.Task[Resp] | None] = asyncio.Queue()  # in arrival order; None: the end
    slots = asyncio.Semaphore(window)
    stop = closing or asyncio.Event()
    reading = _Reading()
    reader = asyncio.create_task(_read(requests, answer, answers, slots, on_pause, stop, reading))
    watcher = asyncio.create_task(stop.wait())
    watcher.add_done_callback(lambda _: reader.cancel() if reading.on else None)  # only a reader still reading
    try:
        while (next_answer := await answers.get()) is not None:
            yield await next_answer  # at once when it is done; else it waits, and so do the ones behind it
            slots.release()  # gRPC took the previous answer: room for one more request
        if await reader:
            raise Unavailable("the server is shutting down: the stream's later requests were not read; send them again")
    finally:
        watcher.cancel()
        reader.cancel()
        await asyncio.gather(reader, watcher, return_exceptions=True)


async def _read(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Coroutine[Any, Any, Resp]],
    answers: asyncio.Queue[asyncio.Task[Resp] | None],
    slots: asyncio.Semaphore,
    on_pause: OnPause | None,
    closing: asyncio.Event,
    reading: _Reading,
) -> bool:
    """Read and start answering until the requests end; True if ``closing`` cut the reading short.
    An error reading the requests is raised once every answer already started is done.

    Returns (and puts the end in ``answers``) once every answer it started is done: it owns them,
    and cancels them when it is cancelled."""
    tasks: set[asyncio.Task[Resp]] = set()

    def start(request: Req) -> None:
        task = asyncio.create_task(answer(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        answers.put_nowait(task)  # its place in the order: the order requests were read

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
        except Exception:  # the requests failed (one did not parse): answer those read, then fail after them
            reading.on = False
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        await asyncio.gather(*tasks, return_exceptions=True)  # a failure (a bug) is raised in its place in the order
        return closed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        answers.put_nowait(None)


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
