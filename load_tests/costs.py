"""CPU µs per call of in-process steps, timed warm (in a loop) or with cold caches (each call alone).

In a loop, a step runs with its code and data in the CPU's caches. A server
answering one request at a time does not: between two requests the kernel,
gRPC's threads and the client run, and the next request finds the caches cold.
With ``cold`` every call follows an eviction (writing a buffer larger than the
last-level cache) and is timed alone on the thread's CPU clock, the timer's own
cost taken off: closer to what a served request pays (BENCHMARKS.md, "cold
caches"). The two bound the served cost from below and above.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

__all__ = ["EVICTION_BYTES", "Step", "step_costs"]

Step = Callable[[], object]  # a plain function, or a coroutine function (awaited inside one event loop)
EVICTION_BYTES = 64 * 1024 * 1024  # more than any last-level cache of the machines this runs on
_COLD_CALLS = 2_000  # each one writes EVICTION_BYTES first


def step_costs(steps: dict[str, Step], calls: int, cold: bool = False) -> dict[str, float]:
    """Each step's CPU µs per call: ``calls`` in a loop, or (``cold``) up to 2,000 each after an eviction."""
    if not cold:
        return {name: _cost(step, calls) for name, step in steps.items()}
    evict = _evictor()
    calls = min(calls, _COLD_CALLS)
    timer = _cost(lambda: None, calls, evict)
    return {name: max(_cost(step, calls, evict) - timer, 0.0) for name, step in steps.items()}


def _evictor() -> Callable[[], object]:
    import numpy as np

    buffer = np.zeros(EVICTION_BYTES // 8)
    return lambda: np.add(buffer, 1.0, out=buffer)


def _cost(step: Step, calls: int, evict: Callable[[], object] | None = None) -> float:
    """CPU µs per call: the whole loop timed (warm), or with ``evict``, each call timed alone after it."""

    async def run_async() -> float:
        if evict is None:
            started = time.process_time()
            for _ in range(calls):
                await step()  # type: ignore[misc]
            return (time.process_time() - started) / calls * 1e6
        total = 0
        for _ in range(calls):
            evict()
            begun = time.thread_time_ns()
            await step()  # type: ignore[misc]
            total += time.thread_time_ns() - begun
        return total / calls / 1e3

    if inspect.iscoroutinefunction(step):
        return asyncio.run(run_async())
    if evict is None:
        started = time.process_time()
        for _ in range(calls):
            step()
        return (time.process_time() - started) / calls * 1e6
    total = 0
    for _ in range(calls):
        evict()
        begun = time.thread_time_ns()
        step()
        total += time.thread_time_ns() - begun
    return total / calls / 1e3
