"""One run per staging folder: an exclusive ``flock`` on ``OUTPUT.partial/run.lock``, held while the run lasts.

Two runs on the same output, with ``--resume`` or without, would write the same
files and record the same state: the second is refused at once, naming the
process that holds the folder. The kernel releases the lock when its holder
ends, however it ends, so a crashed run never blocks its own resume.

The lock file lives in the folder it guards, which a run removes (while it holds
the lock) when it completes. A process that opened the file just before may then
lock a file no longer there: :func:`claim_staging` checks, once it holds the lock,
that the path still names the file it locked, and starts again when it does not.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infergate.offline.state import ResumeError

__all__ = ["LOCK_FILE", "StagingInUse", "check_free", "claim_staging"]

LOCK_FILE = "run.lock"
_ATTEMPTS = 5  # each lost only to a run that completed in between: a few are plenty


class StagingInUse(ResumeError):
    """Another process holds the staging folder; the message names it."""


@contextmanager
def claim_staging(staging: Path) -> Iterator[bool]:
    """Hold ``staging`` (made when missing, with its parents) for the block; yields True when this call made it.

    Raises :class:`StagingInUse` at once when another process holds it.
    """
    for _ in range(_ATTEMPTS):
        created = _make(staging)
        fd = _lock(staging)
        if fd is None:
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield created
        finally:
            os.close(fd)  # releases the lock
        return
    raise ResumeError(f"{staging} keeps being removed by another run: try again once it has ended")


def check_free(staging: Path) -> None:
    """Raise :class:`StagingInUse` when another process holds ``staging`` now; creates nothing, holds nothing.

    A forecast for the command line, which checks before loading the model: :func:`claim_staging` decides.
    """
    try:
        fd = os.open(staging / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no folder, no lock file: nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(staging, fd) from None
    finally:
        os.close(fd)


def _in_use(staging: Path, fd: int) -> StagingInUse:
    return StagingInUse(f"{staging} is in use by {_holder(fd)}, a run on the same output: wait for it to end")


def _make(staging: Path) -> bool:
    try:
        staging.mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def _lock(staging: Path) -> int | None:
    """The locked file's descriptor; None when the folder went away meanwhile (try again)."""
    path = staging / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # removed between making it and opening the file
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _in_use(staging, fd)
        os.close(fd)
        raise error from None
    except BaseException:
        os.close(fd)
        raise
    if _names(path, fd):
        return fd
    os.close(fd)
    return None


def _names(path: Path, fd: int) -> bool:
    """True when ``path`` is still the file open as ``fd``."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it: "pid N", or "another process" before it has."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"
