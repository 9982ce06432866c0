"""Structured logging: readable text by default, one JSON object per line when configured.

Every line written while a traced request is being served carries its
``trace_id`` and ``span_id`` (32 and 16 hex digits, as in ``traceparent``), so a
log search and a trace view find each other. Log calls in infergate pass
names, numbers and statuses only: never metadata (tokens live there) and never
tensor contents.

:func:`configure_logging` returns the :class:`LogControl` of what it set up,
which Triton's LogSettings call (``serving/log_settings.py``) reads and
changes while the server runs: which levels are written and in which format.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from opentelemetry import trace

__all__ = [
    "HEALTH",
    "LISTENING",
    "LOG_FORMATS",
    "METRICS",
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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
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


class LogControl:
    """The handler :func:`configure_logging` installed: its levels and format, changeable at run time."""

    def __init__(self, handler: logging.Handler, levels: LogLevels, fmt: str):
        self._handler = handler
        self._switch = _LevelSwitch(levels)
        handler.addFilter(self._switch)
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
        if fmt not in LOG_FORMATS:
            raise ValueError(f"unknown log format {fmt!r}; known: {', '.join(LOG_FORMATS)}")
        if fmt != self._format:
            self._handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(iso8601=fmt == "ISO8601"))
            self._format = fmt
        self._switch.levels = levels
        logging.getLogger().setLevel(levels.lowest())


def configure_logging(level: str, fmt: Literal["text", "json"], stream: TextIO | None = None) -> LogControl:
    """Send every logger's records to ``stream`` (stderr) in ``fmt``, with trace ids; call once at start.

    Returns the control of what it set up, for changes while the process runs (LogSettings)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    return LogControl(handler, LogLevels.at(level), _CONFIG_FORMATS[fmt])


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
