"""Which asyncio event loop serves: uvloop when it is installed, else the standard library's.

Why uvloop: every call runs a dozen loop callbacks (gRPC's completion
callbacks, the handler's task steps, the batcher's turns), and uvloop runs
each in Cython. Alternating fresh servers on the demo repository, one caller
alone was answered 0.17-0.27 ms sooner on average and 64 in flight were
served 3-7% faster (BENCHMARKS.md, "The event loop"). grpc.aio runs on any
asyncio loop.

uvloop's ``loop.time()`` counts whole milliseconds, too coarse for queue times
of tens of microseconds, so nothing in infergate times requests with it:
deadlines and queue times are ``time.monotonic()`` (which is the standard
loop's clock), and the batcher sets its timers through
:class:`infergate.models.batcher.LoopClock`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from infergate.configfile import ConfigError

__all__ = ["EVENT_LOOPS", "EventLoopChoice", "describe", "describe_choice", "loop_factory", "run"]

EventLoopChoice = Literal["auto", "asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoopChoice, ...] = get_args(EventLoopChoice)  # for command-line choices
T = TypeVar("T")


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop ``choice`` names; ``auto`` is uvloop when it imports, else asyncio's.

    Raises ConfigError when ``uvloop`` is asked for and not installed (it has no Windows build).
    """
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop: uvloop is not installed (pip install uvloop; not on Windows)") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """``asyncio.run`` on the loop ``choice`` names (``asyncio.Runner`` takes a factory from 3.11)."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.23.0`` or ``asyncio``: for the start-up log."""
    return _uvloop() if type(loop).__module__.startswith("uvloop") else "asyncio"


def describe_choice(choice: EventLoopChoice) -> str:
    """What :func:`describe` would say of the loop ``choice`` gives here, without making one."""
    return "asyncio" if loop_factory(choice) is asyncio.new_event_loop else _uvloop()


def _uvloop() -> str:
    return f"uvloop {importlib.metadata.version('uvloop')}"
