"""The two ways of sending load inside one generator process: closed loop and open loop.

Closed loop: N slots, each sends a request, waits for the reply and sends the
next. A request counts when it *completes* inside the measurement window, and
its latency runs from its send to its reply.

Open loop: requests are sent at a fixed mean rate with Poisson arrivals (the
gaps are exponential), whether or not earlier ones have been answered. A
request counts when its *intended* send time falls inside the window, and its
latency runs from that intended time, so a generator or server that falls
behind shows up in the latency instead of silently lowering the rate (no
coordinated omission). How late each request actually left is recorded as its
send lag: a large lag means the generator, not the server, could not keep up.
At most ``max_in_flight`` requests are outstanding; an arrival beyond that is
not sent and is counted as the error ``GENERATOR_FULL``.

Both stop at the window's end, which is fixed for a time-limited run and set
when the ``limit``-th request is counted in a count-limited run.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .clients import CallFailed

__all__ = ["GENERATOR_FULL", "Tally", "Window", "closed_loop", "cpu_in_window", "open_loop", "show_progress"]

GENERATOR_FULL = "GENERATOR_FULL"
Send = Callable[[], Awaitable[None]]
_PROGRESS_EVERY_S = 0.5


@dataclass
class Window:
    """The measurement window (``time.perf_counter`` values); ``limit`` requests end it early."""

    start: float
    end: float = math.inf
    limit: int | None = None
    counted: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # set when ``limit`` requests are counted

    def count(self, at: float) -> None:
        """One more measured request (success or failure) at time ``at``."""
        self.counted += 1
        if self.limit is not None and self.counted >= self.limit:
            self.end = min(self.end, at)
            self.reached.set()

    def holds(self, at: float) -> bool:
        return self.start <= at <= self.end


@dataclass
class Tally:
    """What one process measured: latencies of successes (s), failures by status code name, send lags (s)."""

    latencies: list[float]
    errors: Counter[str]
    lags: list[float] = field(default_factory=list)


async def closed_loop(send: Send, window: Window, tally: Tally) -> None:
    """One slot of a closed loop: send, wait, repeat until the window's end."""
    clock = time.perf_counter
    while (started := clock()) < window.end:
        try:
            await send()
        except CallFailed as exc:
            if window.holds(done := clock()):
                tally.errors[exc.code] += 1
                window.count(done)
            continue
        if window.holds(done := clock()):
            tally.latencies.append(done - started)
            window.count(done)


async def _one(send: Send, intended: float, counted: bool, tally: Tally) -> None:
    if counted:
        tally.lags.append(time.perf_counter() - intended)
    try:
        await send()
    except CallFailed as exc:
        if counted:
            tally.errors[exc.code] += 1
        return
    if counted:
        tally.latencies.append(time.perf_counter() - intended)


async def open_loop(send: Send, window: Window, rate: float, tally: Tally, seed: int, max_in_flight: int) -> None:
    """Send at ``rate`` requests/s (Poisson) until the window's end, then wait for the answers."""
    rng = random.Random(seed)
    in_flight: set[asyncio.Task[None]] = set()
    intended = time.perf_counter()
    while intended < window.end:
        await asyncio.sleep(max(0.0, intended - time.perf_counter()))
        counted = window.holds(intended)
        if counted:
            window.count(intended)
        if len(in_flight) >= max_in_flight:
            if counted:
                tally.errors[GENERATOR_FULL] += 1
        else:
            task = asyncio.create_task(_one(send, intended, counted, tally))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        intended += rng.expovariate(rate)
    if in_flight:
        await asyncio.wait(in_flight)


async def cpu_in_window(window: Window) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) between the window's edges."""
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if window.limit is None:
        await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    else:
        await window.reached.wait()
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def show_progress(window: Window, tally: Tally, label: str, duration: float | None) -> None:
    """Rewrite one status line on stderr until cancelled: phase, elapsed, successes, errors, p50 so far."""
    while True:
        now = time.perf_counter()
        if now < window.start:
            phase = f"warm-up {window.start - now:4.1f}s left"
        else:
            total = f"/{duration:.0f}s" if duration is not None else f" ({window.counted}/{window.limit})"
            phase = f"measuring {now - window.start:5.1f}s{total}"
        recent = sorted(tally.latencies[-2000:])
        p50 = f"{recent[len(recent) // 2] * 1000:.2f} ms" if recent else "-"
        errors = sum(tally.errors.values())
        sys.stderr.write(f"\r{label}: {phase}  ok {len(tally.latencies):,}  errors {errors:,}  p50 {p50}   ")
        sys.stderr.flush()
        await asyncio.sleep(_PROGRESS_EVERY_S)
