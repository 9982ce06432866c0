"""The names Linux shows for infergate's threads (``top -H``, ``ps -L``, ``/proc/PID/task``).

Python's thread names are its own business; the kernel knows each thread by a
name of at most 15 bytes, which a new thread copies from the thread that
creates it. infergate names each instance thread ``ort-<model>-<n>`` and
creates a model's onnxruntime sessions under the name ``ort-<model>``, so the
pool threads onnxruntime starts for a session carry it too. An operator (and
``python -m load_tests suite``) can then tell the CPU that went to models
from what went to the event loop and to gRPC. Its other threads carry their
Python names: the drift monitors' and payload logs' workers, ``audit-writer``,
``log-writer`` (the log lines: telemetry/logs.py), ``jwks_0`` (key fetches)
and ``infergate-scrape_<n>`` (the supervisor's scrapes of its workers).

Anywhere but Linux these do nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["current_name", "name_after_python", "named", "set_name"]

_PR_SET_NAME = 15
_PR_GET_NAME = 16
_LIMIT = 15  # bytes, without the terminating NUL
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def set_name(name: str) -> None:
    """Name the calling thread (cut to 15 bytes)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_NAME, name.encode()[:_LIMIT], 0, 0, 0)


def name_after_python() -> None:
    """Give the calling thread its Python name (a thread pool's ``initializer``)."""
    set_name(threading.current_thread().name)


def current_name() -> str:
    """The calling thread's name as the kernel has it ("" where there is none)."""
    if _LIBC is None:
        return ""
    buffer = ctypes.create_string_buffer(_LIMIT + 1)
    _LIBC.prctl(_PR_GET_NAME, buffer, 0, 0, 0)
    return buffer.value.decode(errors="replace")


@contextmanager
def named(name: str) -> Iterator[None]:
    """The calling thread is called ``name`` inside the block, and what it was called before after it."""
    before = current_name()
    set_name(name)
    try:
        yield
    finally:
        set_name(before)
