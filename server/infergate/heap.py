"""The serving process's start-up heap, kept out of the garbage collector's full walks.

A serving process holds some 70,000 objects from its start (modules, protobuf
descriptors, grpc, onnxruntime bindings, the loaded models) that live as long
as it does. Every full collection walked all of them: about 70 ms on the
2-core development VM, every 10 to 15 s under load, with every request in flight
waiting (BENCHMARKS.md, "Garbage-collection pauses"). :meth:`FrozenHeap.freeze`
collects once and moves everything alive to the permanent generation
(``gc.freeze``), which the collector never walks.

What frozen objects free by reference counting is still freed, but a
reference cycle among them is never collected. A model version is such a
cycle (its batcher calls back into it), so a version loaded before the freeze
and later retired would keep its onnxruntime sessions for good. So once a
retired version has closed, :meth:`FrozenHeap.retired` thaws the heap,
collects and freezes again: one full collection per reload or unload, which
are rare, instead of one every few seconds.

A thread of asyncio's pool keeps its work item (function, arguments and
result) a moment after the result is set, and the event loop may resume first.
A version loaded or closed there, and retired while that thread still refers to
it, would be frozen again with it and kept. :func:`in_thread` runs a call in
the pool without leaving the thread any reference to its arguments or result.

The freeze is process-wide, so only a process that is nothing but the server
(``infergate serve``) asks for it; a server embedded in another program
leaves that program's heap alone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import TypeVar

__all__ = ["FrozenHeap", "in_thread"]

T = TypeVar("T")

log = logging.getLogger(__name__)


class FrozenHeap:
    """Freezes the heap once the start-up load is done, and again after each retired version closed."""

    def __init__(self) -> None:
        self.frozen = False
        self._refreezing = False

    def freeze(self) -> int:
        """Collect, then freeze everything alive; returns how many objects are frozen."""
        gc.collect()
        gc.freeze()
        self.frozen = True
        return gc.get_freeze_count()

    def retired(self) -> None:
        """A retired model version has closed (on the event loop): thaw, collect and freeze again, once
        for all the versions that close in the same turn of the loop."""
        if not self.frozen or self._refreezing:
            return
        self._refreezing = True
        asyncio.get_running_loop().call_soon(self._refreeze)

    def _refreeze(self) -> None:
        self._refreezing = False
        gc.unfreeze()
        count = self.freeze()
        log.info("heap frozen again after a model version closed: %d objects", count)


async def in_thread(function: Callable[..., T], *args: object) -> T:
    """``asyncio.to_thread(function, *args)``, except that the pool thread holds none of ``function``,
    ``args`` or the result once this returns: they pass through lists emptied on either side."""
    call: list[tuple[Callable[..., T], tuple[object, ...]]] = [(function, args)]
    result: list[T] = []

    def run() -> None:  # its frame, and with it the last of the call, is gone before the result is set
        taken, given = call.pop()
        result.append(taken(*given))

    await asyncio.to_thread(run)
    return result.pop()
