"""The audit trail: one JSON line per lifecycle event, who caused it, and how it ended.

Every line has the same keys::

    {"time": "2026-11-30T12:00:00.123+00:00", "event": "load_failed", "model": "fraud",
     "version": "3", "principal": "alice", "source": "api", "outcome": "failed",
     "reason": "…sha256 mismatch…", "detail": {}}

``principal`` is the verified caller's subject when auth is on (for ``api``
events, taken from the request's context unless given), else ``"anonymous"``;
events the server sets off itself are never a caller's, even when they happen
while serving one. ``source`` says what set
the event off: ``api`` (a gRPC call), ``poll`` (the repository poller),
``startup``, or ``runtime`` (the server deciding by itself while serving: canary
steps, shadow pauses, drift alerts, shutdown). ``outcome`` is ``ok``,
``failed``, ``rejected``, or a gRPC status name for admin calls. ``detail``
holds what only some events have (a canary's weight, a pause's length…).

Where lines go: with ``path`` (``--audit-log FILE``), appended to that file by
one background thread; otherwise to the ``infergate.audit`` logger, i.e. the
server log, one line each like every other log line.

Two promises, because call sites sit on the request path and in the repository:

* **Never raises.** A failure to build or write a line is logged (to the server
  log, not the audit stream) and forgotten; the caller's work goes on.
* **Never blocks the event loop.** File writes happen on the writer thread. The
  loop only puts the line on a bounded queue without waiting (``put_nowait``);
  when a stuck disk has filled it, lines are dropped and counted in
  :attr:`AuditLog.dropped` (and logged) rather than growing memory or stalling
  requests. A dedicated thread rather than ``logging.handlers.QueueListener``:
  its ``stop`` raises on a full queue, and we want one ``os.write`` per burst of
  lines on an ``O_APPEND`` descriptor, so the processes of ``--workers N`` can
  share one file without tearing each other's lines.

And the file holds whole lines only. A write the disk cuts short (full, over
quota) would leave half a line for the next one to be glued to: it is taken
back (``ftruncate`` to where the burst began), its events counted in
:attr:`AuditLog.dropped` and logged once for the burst. The processes sharing
the file write and take back under an exclusive ``flock``, so none cuts
another's lines; and before each burst the writer cuts a last line left without
its newline (one not taken back: the truncate failed, or a worker was killed
mid-write), or, when that cannot be cut, ends it so it stays a line of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from infergate import threadnames
from infergate.security.auth import current_principal

__all__ = ["ANONYMOUS", "AUDIT_LOGGER", "AuditLog", "Source"]

AUDIT_LOGGER = "infergate.audit"
ANONYMOUS = "anonymous"
Source = Literal["api", "poll", "startup", "runtime"]

log = logging.getLogger(__name__)

_STOP = None  # the writer thread's sentinel
_CLOSE_TIMEOUT_S = 5.0  # how long closing waits for a stuck disk before giving up on it
_TAIL_CHUNK = 65536  # read back this much at a time to find where the last whole line ends


class AuditLog:
    """Writes audit events (see the module docstring); call :meth:`start` once, :meth:`aclose` at the end."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        queue_size: int = 10_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self._queue_size = queue_size
        self._clock = clock
        self._logger = logging.getLogger(AUDIT_LOGGER)
        self._writer: _FileWriter | None = None

    @property
    def dropped(self) -> int:
        """Events not written: dropped because the writer fell behind (a stuck disk), or lost to a failed write."""
        return self._writer.dropped + self._writer.lost if self._writer is not None else 0

    def start(self) -> None:
        """Open the file (creating it, mode 0640) and start the writer. Raises OSError when it cannot be opened."""
        if self.path is not None and self._writer is None:
            self._writer = _FileWriter(self.path, self._queue_size)

    async def aclose(self) -> None:
        """Write what is queued (waiting at most a few seconds for the disk) and close the file."""
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.to_thread(writer.close)

    # --- the events ------------------------------------------------------------------------------

    def server_started(self, address: str, repository: str) -> None:
        self.record("server_started", source="startup", detail={"address": address, "repository": repository})

    def server_stopped(self, reason: str = "signal") -> None:
        self.record("server_stopped", source="runtime", reason=reason)

    def loaded(self, model: str, version: int | str, *, source: Source, principal: str | None = None) -> None:
        """A version loaded (and warmed up); :meth:`version_swapped_in` follows when it starts serving."""
        self.record("load", model=model, version=version, source=source, principal=principal)

    def load_failed(
        self, model: str, version: int | str | None, reason: str, *, source: Source, principal: str | None = None
    ) -> None:
        """A version (or, with ``version`` None, the model's config) failed to load; what served keeps serving."""
        self.record(
            "load_failed",
            model=model,
            version=version,
            source=source,
            outcome="failed",
            reason=reason,
            principal=principal,
        )

    def unloaded(self, model: str, *, source: Source, reason: str = "", principal: str | None = None) -> None:
        self.record("unload", model=model, source=source, reason=reason, principal=principal)

    def version_swapped_in(
        self, model: str, version: int | str, *, source: Source, principal: str | None = None
    ) -> None:
        self.record("version_swapped_in", model=model, version=version, source=source, principal=principal)

    def version_retired(
        self, model: str, version: int | str, *, source: Source, reason: str = "", principal: str | None = None
    ) -> None:
        self.record("version_retired", model=model, version=version, source=source, reason=reason, principal=principal)

    def routing_applied(
        self, model: str, routing: Mapping[str, Any], *, source: Source, principal: str | None = None
    ) -> None:
        """``routing``: the block now in force (``Routing.model_dump()``), so the trail shows what changed."""
        self.record("routing_applied", model=model, source=source, principal=principal, detail={"routing": routing})

    def routing_rejected(self, model: str, reason: str, *, source: Source, principal: str | None = None) -> None:
        """A routing block that does not fit the loaded versions; the previous routing stays."""
        self.record(
            "routing_rejected", model=model, source=source, outcome="rejected", reason=reason, principal=principal
        )

    def canary_step(self, model: str, version: int, step: int, weight: float) -> None:
        self.record(
            "canary_step", model=model, version=version, source="runtime", detail={"step": step, "weight": weight}
        )

    def canary_completed(self, model: str, version: int, weight: float) -> None:
        self.record("canary_completed", model=model, version=version, source="runtime", detail={"weight": weight})

    def canary_rolled_back(self, model: str, version: int, reason: str) -> None:
        self.record("canary_rollback", model=model, version=version, source="runtime", outcome="failed", reason=reason)

    def shadow_paused(self, model: str, version: int, seconds: float, reason: str) -> None:
        self.record(
            "shadow_paused",
            model=model,
            version=version,
            source="runtime",
            reason=reason,
            detail={"seconds": seconds},
        )

    def drift_alert_entered(
        self, model: str, version: int | str | None, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        self.record("drift_alert_entered", model=model, version=version, source="runtime", reason=reason, detail=detail)

    def drift_alert_left(
        self, model: str, version: int | str | None, reason: str = "", detail: Mapping[str, Any] | None = None
    ) -> None:
        self.record("drift_alert_left", model=model, version=version, source="runtime", reason=reason, detail=detail)

    def admin_call(
        self,
        method: str,
        outcome: str,
        *,
        model: str = "",
        version: str = "",
        principal: str | None = None,
        client_id: str | None = None,
    ) -> None:
        """An admin write (load, unload, routing change…), allowed or refused: ``outcome`` is the gRPC status name."""
        self.record(
            "admin",
            model=model,
            version=version,
            source="api",
            outcome=outcome,
            principal=principal,
            detail={"method": method, "client_id": client_id},
        )

    # --- the one writer ----------------------------------------------------------------------------

    def record(
        self,
        event: str,
        *,
        source: Source,
        model: str = "",
        version: int | str | None = None,
        outcome: str = "ok",
        reason: str = "",
        principal: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one event; never raises, never waits (see the module docstring)."""
        try:
            line = json.dumps(
                {
                    "time": self._clock().isoformat(timespec="milliseconds"),
                    "event": event,
                    "model": model,
                    "version": "" if version is None else str(version),
                    # Only a call's own events are the caller's: a canary step judged inside some
                    # request is the server's decision, whoever sent that request.
                    "principal": principal or (_current_subject() if source == "api" else ANONYMOUS),
                    "source": source,
                    "outcome": outcome,
                    "reason": reason,
                    "detail": dict(detail or {}),
                },
                # ASCII only: a name a caller sends (written even when refused) may hold U+2028 or U+0085,
                # which end a line for some readers; escaped, every event stays one line.
                ensure_ascii=True,
                default=str,  # a stray non-JSON value must not cost the event
            )
            if self._writer is not None:
                self._writer.offer(line + "\n")
            else:
                self._logger.info(line)
        except Exception:
            log.exception("could not write the audit event %r", event)


def _current_subject() -> str:
    principal = current_principal()
    return principal.subject if principal is not None else ANONYMOUS


class _FileWriter:
    """Appends lines to one file from one thread; :meth:`offer` never blocks."""

    def __init__(self, path: Path, queue_size: int) -> None:
        self.path = path
        self.dropped = 0  # by offer(), on the caller's thread
        self.lost = 0  # by a failed write, on the writer thread (one counter per thread: no lost updates)
        self._failed_bursts = 0  # since the last burst written
        self._queue: queue.Queue[str | None] = queue.Queue(queue_size)
        # O_APPEND: every write lands at the end, even with other processes (--workers) appending too.
        # Read as well: to find where the last whole line ends (see _end_on_a_whole_line).
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)  # not a pipe or /dev/null
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def offer(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit log %s is not keeping up: %d event(s) dropped so far", self.path, self.dropped)

    def _run(self) -> None:
        threadnames.name_after_python()
        while True:
            lines = [self._queue.get()]
            while lines[-1] is not _STOP and len(lines) < 1000:  # one write for a burst
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            burst = [line for line in lines if line is not _STOP]
            if burst:
                # A name from the disk that is not UTF-8 reaches here as a lone surrogate: written as its JSON
                # escape (which reads back as the same string), where a plain encode() would end this thread.
                self._write("".join(burst).encode("utf-8", "backslashreplace"), len(burst))
            if lines[-1] is _STOP:
                return

    def _write(self, data: bytes, events: int) -> None:
        try:
            if self._regular:
                with _locked(self._fd):
                    self._append_whole(data)
            else:
                _write_all(self._fd, data)
        except OSError as exc:
            self.lost += events
            self._failed_bursts += 1
            if self._failed_bursts == 1 or self._failed_bursts % 1000 == 0:
                log.error("cannot write the audit log %s: %s (%d event(s) lost so far)", self.path, exc, self.lost)
            return
        if self._failed_bursts:
            log.warning("audit log %s written again (%d event(s) lost so far)", self.path, self.lost)
            self._failed_bursts = 0

    def _append_whole(self, data: bytes) -> None:
        """Append ``data`` (whole lines) whole or not at all; the caller holds the file's lock.

        A write the disk cuts short (full, over quota, past the file-size limit) is taken back, so the file
        ends on a whole line; where it cannot be, the next burst cuts the tail (:meth:`_end_on_a_whole_line`).
        """
        self._end_on_a_whole_line()
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError:
            if written:
                with contextlib.suppress(OSError):  # not taken back: the next burst cuts it
                    self._take_back(written)
            raise

    def _take_back(self, written: int) -> None:
        """Remove the last ``written`` bytes this descriptor wrote, while they still end the file (after a
        copytruncate, shrinking to a stale offset would grow the file)."""
        end = os.lseek(self._fd, 0, os.SEEK_CUR)  # O_APPEND: just past what was written
        if os.fstat(self._fd).st_size == end:
            os.ftruncate(self._fd, end - written)

    def _end_on_a_whole_line(self) -> None:
        """Cut a last line left without its newline (a write cut short and not taken back, by this process or
        another: a worker killed mid-write); one that cannot be cut is ended, a line of its own."""
        end = os.fstat(self._fd).st_size
        if end == 0 or os.pread(self._fd, 1, end - 1) == b"\n":
            return
        try:
            os.ftruncate(self._fd, _after_last_newline(self._fd, end))
        except OSError:
            _write_all(self._fd, b"\n")

    def close(self) -> None:
        """Flush the queue and close (blocking: call from a thread); gives up on a disk stuck for seconds."""
        try:
            self._queue.put(_STOP, timeout=_CLOSE_TIMEOUT_S)
        except queue.Full:
            log.error("audit log %s: writer stuck; %d queued event(s) not written", self.path, self._queue.qsize())
            return  # the daemon thread still owns the descriptor
        self._thread.join(_CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            os.close(self._fd)


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    """Hold the file's exclusive lock: the writers of ``--workers N`` write and take back one at a time."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _after_last_newline(fd: int, end: int) -> int:
    """The offset just past the last ``\\n`` before ``end``; 0 when there is none."""
    while end > 0:
        start = max(end - _TAIL_CHUNK, 0)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0
