"""A stream's requests answered concurrently (serving/stream.py), on plain async iterators: draining."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from conftest import eventually

from infergate.errors import Unavailable
from infergate.serving.stream import answer_concurrently


async def test_draining_answers_every_request_read_even_one_still_waiting_for_room() -> None:
    """One slot, and a client that sends without end: the stream reads one request ahead of its window."""
    read: list[str] = []

    async def requests() -> AsyncIterator[str]:
        for number in itertools.count(1):
            read.append(f"r{number}")
            yield f"r{number}"

    async def answer(request: str) -> str:
        return request.upper()

    closing = asyncio.Event()
    stream = answer_concurrently(requests(), answer, window=1, closing=closing)
    assert await anext(stream) == "R1"
    await eventually(lambda: len(read) == 2, "the second request read, waiting for room")
    closing.set()  # the server drains
    answered = []
    with pytest.raises(Unavailable, match="shutting down"):
        async for response in stream:
            answered.append(response)
    assert answered == [name.upper() for name in read[1:]]  # whatever was read is answered, nothing more
