"""Structured logging: readable text by default, one JSON object per line when configured.

Every line written while a traced request is being served carries its
``trace_id`` and ``span_id`` (32 and 16 hex digits, as in ``traceparent``), so a
log search and a trace view find each other. Log calls in infergate pass
names, numbers and statuses only: never metadata (tokens live there) and never
tensor contents.

:func:`configure_logging` returns the :class:`LogControl` of what it set up,
which Triton's LogSettings call (``serving/log_settings.py``) reads and
changes while the server runs: which levels are written and in which format.

Lines are written off the calling thread (mostly the event loop): a record is
filtered and its message merged on the thread that logs it (the trace ids are
that thread's context), then handed to the ``log-writer`` thread through a
queue of :data:`QUEUED_LINES`, which formats and writes it. When the output
does not keep up (stderr is a pipe whose reader stalled) a record that does not
fit is dropped and counted, never waited for, and once the writer catches up it
writes one line saying how many were dropped. ``logging.shutdown()`` (at exit)
writes every line still queued first.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from opentelemetry import trace

from infergate import threadnames

__all__ = [
    "HEALTH",
    "LISTENING",
    "LOG_FORMATS",
    "METRICS",
    "QUEUED_LINES",
    "WRITER_STOP_SECONDS",
    "JsonFormatter",
    "LogControl",
    "LogLevels",
    "TextFormatter",
    "TraceContextFilter",
    "announced",
    "announcement",
    "configure_logging",
    "listening_address",
]

# The lines infergate prints to stdout once its ports are bound (tests, --workers and scripts read them).
LISTENING = "infergate listening on "
METRICS = "infergate metrics on "
HEALTH = "infergate health on "
TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# Lines waiting for the writer thread (~150 KB of access lines, on top of the pipe's 64 KiB): a burst
# fits, a reader stalled for longer costs lines instead of freezing the server.
QUEUED_LINES = 1024
# How long a stop waits for an output that does not move before giving up on the lines still queued.
# It comes after the telemetry flush (FLUSH_BUDGET_SECONDS, 5 s: telemetry/flush.py), and the two must fit,
# with the exit, in the 10 s the --workers supervisor gives a worker after the grace, and for the
# supervisor's own stop in the chart's 15 s: 5 + 2 leaves 3 s to spare.
WRITER_STOP_SECONDS = 2.0
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class TraceContextFilter(logging.Filter):
    """Stamps each record with the current span's ids (empty strings outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = record.span_id = ""
        return True


class TextFormatter(logging.Formatter):
    """The familiar one-line format, with ``trace_id=… span_id=…`` appended inside a request;
    ``iso8601``: times as ``2026-11-30T18:10:53.368Z`` (UTC), as Triton's ISO8601 log format."""

    def __init__(self, iso8601: bool = False) -> None:
        super().__init__(TEXT_FORMAT)
        self._iso8601 = iso8601

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if not self._iso8601:
            return super().formatTime(record, datefmt)
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """One line per message: a line break in it (a model name is the caller's text) is written as
        ``\\n``, so no caller can start a line that reads as the server's. Tracebacks keep their lines."""
        message = record.message
        if "\n" in message or "\r" in message:
            record.message = message.replace("\r", "\\r").replace("\n", "\\n")
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        if not trace_id:
            return line
        head, newline, rest = line.partition("\n")  # keep ids on the first line, before a traceback
        return f"{head} trace_id={trace_id} span_id={getattr(record, 'span_id', '')}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, trace and span ids, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value if isinstance(value, str | int | float | bool) or value is None else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # formatted where the record was logged (_HandOff.prepare)
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


# The log formats, by the names LogSettings uses: Triton's two, and infergate's JSON lines.
LOG_FORMATS = ("default", "ISO8601", "json")
_CONFIG_FORMATS = {"text": "default", "json": "json"}  # logging.format in the server config


@dataclass(frozen=True)
class LogLevels:
    """Which records are written, as Triton's log settings say it: INFO, WARNING and ERROR (with
    CRITICAL) each on or off, and DEBUG from ``verbose`` 1 up (infergate has one verbose level;
    the number is kept as set)."""

    info: bool = True
    warning: bool = True
    error: bool = True
    verbose: int = 0

    @classmethod
    def at(cls, level: str) -> LogLevels:
        """The settings of a ``log_level`` (debug, info, warning, error): it and every level above."""
        order = ("debug", "info", "warning", "error")
        rank = order.index(level.lower())
        return cls(info=rank <= 1, warning=rank <= 2, error=True, verbose=1 if rank == 0 else 0)

    def writes(self, levelno: int) -> bool:
        if levelno >= logging.ERROR:
            return self.error
        if levelno >= logging.WARNING:
            return self.warning
        if levelno >= logging.INFO:
            return self.info
        return self.verbose > 0

    def lowest(self) -> int:
        """The lowest level written: the root logger's level, so that nothing below is even formatted."""
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            if self.writes(level):
                return level
        return logging.CRITICAL + 1


class _LevelSwitch(logging.Filter):
    """Drops the records of levels switched off between the lowest written and the highest."""

    def __init__(self, levels: LogLevels):
        super().__init__()
        self.levels = levels

    def filter(self, record: logging.LogRecord) -> bool:
        return self.levels.writes(record.levelno)


_TRACEBACKS = logging.Formatter()  # both formats write a traceback the default way
_NOTICE_LOGGER = "infergate.logs"  # the logger the dropped-lines notice is written as


class _HandOff(logging.handlers.QueueHandler):
    """The root logger's handler: filters run on the thread that logs (the trace ids are in its
    context), then the record goes to the ``log-writer`` thread, or is dropped and counted when
    :data:`QUEUED_LINES` wait already. Never blocks on the output."""

    def __init__(self, writer: logging.Handler) -> None:
        self.records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUED_LINES)  # None: the stop
        super().__init__(self.records)
        self.dropped = 0  # records that did not fit, since the start
        self._counting = threading.Lock()  # several threads log
        self.listener = _Writer(self, writer)
        self.listener.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Merge the message with its arguments and format a traceback here, while they are as logged;
        the writer thread does the rest (time, text or JSON), which is most of the cost.

        Unlike the stdlib's, this does not copy the record (a cost per access line): a handler after
        this one reads the same message and traceback."""
        record.message = record.msg = record.getMessage()
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.records.put_nowait(record)
        except queue.Full:  # the stdlib reports an error, on the very output that is behind
            with self._counting:
                self.dropped += 1

    def close(self) -> None:
        """Write the lines still queued, then stop the writer thread (``logging.shutdown()`` calls this)."""
        self.listener.stop()
        super().close()


class _LineWriter(logging.StreamHandler[TextIO]):
    """Writes the lines, on the writer thread alone: so it takes no lock, and ``logging.shutdown()``,
    which takes every handler's lock and flushes it, never waits on a write the output holds up.
    Its stream is line-buffered: each line is flushed as it is written."""

    def handle(self, record: logging.LogRecord) -> bool:
        self.emit(record)  # no filters: those ran on the thread that logged (_HandOff)
        return True

    def flush(self) -> None:
        pass


def _own_stderr() -> TextIO:
    """Standard error for the writer thread alone: its own buffer, and lock, on file descriptor 2, so a
    write the output holds up never holds ``sys.stderr`` (which the exit flushes) too."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: a test's capture
        return sys.stderr
    return open(fd, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors, closefd=False)


class _Writer(logging.handlers.QueueListener):
    """The ``log-writer`` thread: formats and writes what :class:`_HandOff` queued. After lines were
    dropped it says how many once it catches up (nothing queued), and while it does not, once
    every :data:`QUEUED_LINES` lines written."""

    def __init__(self, handoff: _HandOff, writer: logging.Handler) -> None:
        super().__init__(handoff.records, writer)
        self._records = handoff.records
        self._handoff = handoff
        self._reported = 0  # of handoff.dropped
        self._written = 0

    def start(self) -> None:
        with threadnames.named("log-writer"):  # the name Linux shows, which a new thread takes from its creator
            super().start()
        assert self._thread is not None
        self._thread.name = "log-writer"

    def handle(self, record: logging.LogRecord) -> None:
        super().handle(record)
        self._written += 1
        if self._handoff.dropped > self._reported and (self._records.empty() or self._written % QUEUED_LINES == 0):
            self._report_drops()

    def _report_drops(self) -> None:
        dropped = self._handoff.dropped
        message = f"{dropped - self._reported} log line(s) dropped: the log output did not keep up"
        self._reported = dropped
        notice = logging.LogRecord(_NOTICE_LOGGER, logging.WARNING, __file__, 0, message, None, None)
        notice.trace_id = notice.span_id = ""
        super().handle(notice)  # past the level switch: whatever is switched off, a loss is said

    def stop(self) -> None:
        """Write what is queued, then end the thread. An output that does not move for
        ``WRITER_STOP_SECONDS`` is given up on, once: the thread is a daemon, it ends with the process."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + WRITER_STOP_SECONDS
        try:
            # The stdlib's sentinel, put with a wait: its own put_nowait fails when the queue is full.
            self._records.put(None, timeout=WRITER_STOP_SECONDS)
        except queue.Full:
            return
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            return
        if self._handoff.dropped > self._reported:  # dropped since the last notice (the queue was not empty)
            self._report_drops()


class LogControl:
    """What :func:`configure_logging` installed: which records are written and how they look,
    changeable at run time, and the writer thread's stop."""

    def __init__(self, handoff: logging.Handler, writer: logging.Handler, levels: LogLevels, fmt: str):
        """``handoff`` filters records on the thread that logs; ``writer`` formats them on the writer thread."""
        self._handoff = handoff
        self._writer = writer
        self._switch = _LevelSwitch(levels)
        handoff.addFilter(self._switch)
        self._format = ""
        self.apply(levels, fmt)

    @property
    def levels(self) -> LogLevels:
        return self._switch.levels

    @property
    def format(self) -> str:
        """One of :data:`LOG_FORMATS`."""
        return self._format

    def apply(self, levels: LogLevels, fmt: str) -> None:
        """Levels apply to the records logged from now on; the format to the lines written from now on
        (lines still queued too)."""
        if fmt not in LOG_FORMATS:
            raise ValueError(f"unknown log format {fmt!r}; known: {', '.join(LOG_FORMATS)}")
        if fmt != self._format:
            # One attribute, read once per line by the writer thread; its lock is not taken, since the
            # writer holds it while blocked on an output that does not move.
            self._writer.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(iso8601=fmt == "ISO8601"))
            self._format = fmt
        self._switch.levels = levels
        logging.getLogger().setLevel(levels.lowest())

    def close(self) -> None:
        """Write every line still queued and stop the writer thread, as ``logging.shutdown()`` does at exit;
        records logged after this are not written."""
        self._handoff.close()


def configure_logging(level: str, fmt: Literal["text", "json"], stream: TextIO | None = None) -> LogControl:
    """Send every logger's records to ``stream`` (stderr; line-buffered) in ``fmt``, with trace ids, from a
    writer thread; call once at start. ``logging.shutdown()`` (or :meth:`LogControl.close`) writes what is still queued.

    Returns the control of what it set up, for changes while the process runs (LogSettings)."""
    writer = _LineWriter(stream or _own_stderr())  # made first: logging.shutdown() closes it last
    handoff = _HandOff(writer)
    handoff.addFilter(TraceContextFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        if isinstance(old, _HandOff):
            old.close()  # an earlier call's: its writer thread writes what it holds and ends
    root.addHandler(handoff)
    return LogControl(handoff, writer, LogLevels.at(level), _CONFIG_FORMATS[fmt])


def announcement(message: str, fmt: Literal["text", "json"], level: int = logging.INFO, **fields: object) -> str:
    """One line for stdout or stderr outside the logging tree: ``message`` as is, or as a JSON log object.

    With ``fmt == "json"`` the line has the keys of :class:`JsonFormatter` (logger ``infergate``) plus
    ``fields``, so a log shipper that expects one JSON object per line can read every line.
    """
    if fmt == "text":
        return message
    record = logging.LogRecord("infergate", level, __file__, 0, message, None, None)
    record.__dict__.update(fields, trace_id="", span_id="")
    return JsonFormatter().format(record)


def announced(line: str, prefix: str) -> str | None:
    """What a ``prefix`` line (``LISTENING``, ``METRICS``, ``HEALTH``) announces, in either format:
    the address or URL after the prefix; None for any other line."""
    text = line.strip()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            return None
        text = str(entry.get("message", "")) if isinstance(entry, dict) else ""
    if not text.startswith(prefix):
        return None
    rest = text[len(prefix) :].split()
    return rest[0] if rest else None


def listening_address(line: str) -> str | None:
    """``host:port`` from a "listening on" line in either format; None for any other line."""
    return announced(line, LISTENING)
