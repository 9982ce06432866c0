"""Structured logging: readable text by default, one JSON object per line when configured.

Every line written while a traced request is being served carries its
``trace_id`` and ``span_id`` (32 and 16 hex digits, as in ``traceparent``), so a
log search and a trace view find each other. Log calls in infergate pass
names, numbers and statuses only: never metadata (tokens live there) and never
tensor contents.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from opentelemetry import trace

__all__ = [
    "HEALTH",
    "LISTENING",
    "METRICS",
    "JsonFormatter",
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
    """The familiar one-line format, with ``trace_id=… span_id=…`` appended inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

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


def configure_logging(level: str, fmt: Literal["text", "json"], stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) in ``fmt``, with trace ids; call once at start."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


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
