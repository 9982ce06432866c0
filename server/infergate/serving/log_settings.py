"""Triton's logging extension (LogSettings): the server's log levels and format, read and changed while it runs.

The settings, with Triton's names and value kinds:

* ``log_info``, ``log_warning``, ``log_error`` (``bool_param``): whether INFO,
  WARNING and ERROR (with CRITICAL) lines are written;
* ``log_verbose_level`` (``uint32_param``): 0 writes no DEBUG lines, 1 or more
  writes them (infergate has one verbose level; the number is kept as set);
* ``log_format`` (``string_param``): ``default`` and ``ISO8601`` (Triton's text
  formats), or ``json`` (one object a line, as ``logging.format: json``);
* ``log_file`` (``string_param``): always ``""``, standard error; it cannot be
  changed through the API (as in Triton).

A request without settings reads them. A request changes the settings it
names, all of them or none: an unknown name, a value of the wrong kind or an
unknown format is INVALID_ARGUMENT before anything changes. Triton applies
settings one at a time and passes over names it does not know; a typo in the
middle of an incident would then change nothing and say nothing. The answer
holds every setting as it now is. LogSettings is an admin call, audited
(``security/interceptor.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument, Unimplemented
from infergate.telemetry.logs import LOG_FORMATS, LogControl, LogLevels

__all__ = [
    "LocalLogSettings",
    "LogSettings",
    "LogSettingsChange",
    "log_settings_line",
    "log_settings_message",
    "requested_log_settings",
]

_KINDS = {"bool_param": "a bool", "uint32_param": "an unsigned integer", "string_param": "a string"}
# Setting -> (its LogLevels field, or "format"; the value kind it takes).
_SETTINGS = {
    "log_info": ("info", "bool_param"),
    "log_warning": ("warning", "bool_param"),
    "log_error": ("error", "bool_param"),
    "log_verbose_level": ("verbose", "uint32_param"),
    "log_format": ("format", "string_param"),
}
_LOG_FILE = "log_file"
_KNOWN = ", ".join([*_SETTINGS, _LOG_FILE])


@dataclasses.dataclass(frozen=True)
class LogSettingsChange:
    """The levels and format a LogSettings request asks for (every setting it did not name as it was)."""

    levels: LogLevels
    format: str

    def as_message(self) -> dict[str, Any]:
        """As JSON for the workers' control channel (``workers/control.py``)."""
        return {**dataclasses.asdict(self.levels), "format": self.format}

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> LogSettingsChange:
        """What :meth:`as_message` wrote; InvalidArgument for anything else."""
        try:
            levels = LogLevels(**{field.name: message[field.name] for field in dataclasses.fields(LogLevels)})
            fmt = message["format"]
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(f"log settings: not a settings message {dict(message)!r}") from exc
        if fmt not in LOG_FORMATS:
            raise InvalidArgument(f"log settings: unknown format {fmt!r}")
        return cls(levels, fmt)


class LogSettings(Protocol):
    """The seam LogSettings calls: this process's :class:`LocalLogSettings`, or under ``--workers N``
    the worker's model control, which has the supervisor apply a change in every worker."""

    @property
    def current(self) -> LogSettingsChange: ...

    async def change(self, change: LogSettingsChange) -> None: ...


class LocalLogSettings:
    """The log settings of this process: its :class:`~infergate.telemetry.logs.LogControl`."""

    def __init__(self, control: LogControl, on_change: Callable[[LogLevels], None] | None = None):
        """``on_change``: told the levels after each change (the server's access log follows verbose)."""
        self._control = control
        self._on_change = on_change

    @property
    def current(self) -> LogSettingsChange:
        return LogSettingsChange(self._control.levels, self._control.format)

    async def change(self, change: LogSettingsChange) -> None:
        self._control.apply(change.levels, change.format)
        if self._on_change is not None:
            self._on_change(change.levels)


def requested_log_settings(
    current: LogSettingsChange, settings: Mapping[str, pb.LogSettingsRequest.SettingValue]
) -> LogSettingsChange:
    """``current`` with what ``settings`` change; InvalidArgument or Unimplemented naming the first
    setting that cannot be applied (in name order), before anything is."""
    changes: dict[str, Any] = {}
    for name in sorted(settings):
        value = _value(name, settings[name])
        if name == _LOG_FILE:
            if value != "":
                raise Unimplemented(
                    f"LogSettings: log_file cannot be changed through the API (got {value!r}); "
                    "infergate writes its log to standard error"
                )
            continue
        field, _ = _SETTINGS[name]
        if field == "format" and value not in LOG_FORMATS:
            raise InvalidArgument(f"LogSettings: log_format {value!r} is not one of {', '.join(LOG_FORMATS)}")
        changes[field] = value
    chosen = changes.pop("format", current.format)
    return LogSettingsChange(dataclasses.replace(current.levels, **changes), chosen)


def _value(name: str, value: pb.LogSettingsRequest.SettingValue) -> Any:
    """The value of setting ``name`` when it is of the kind the setting takes."""
    if name == _LOG_FILE:
        kind = "string_param"
    elif name in _SETTINGS:
        kind = _SETTINGS[name][1]
    else:
        raise InvalidArgument(f"LogSettings: unknown setting {name!r} (known: {_KNOWN})")
    given = value.WhichOneof("parameter_choice")
    if given != kind:
        got = _KINDS[given] if given is not None else "no value"
        raise InvalidArgument(f"LogSettings: {name} takes {_KINDS[kind]} ({kind}); got {got}")
    return getattr(value, kind)


def log_settings_message(settings: LogSettingsChange) -> pb.LogSettingsResponse:
    """Every setting, as LogSettings answers (Triton's names)."""
    value = pb.LogSettingsResponse.SettingValue
    levels = settings.levels
    return pb.LogSettingsResponse(
        settings={
            _LOG_FILE: value(string_param=""),
            "log_info": value(bool_param=levels.info),
            "log_warning": value(bool_param=levels.warning),
            "log_error": value(bool_param=levels.error),
            "log_verbose_level": value(uint32_param=levels.verbose),
            "log_format": value(string_param=settings.format),
        }
    )


def log_settings_line(settings: LogSettingsChange) -> str:
    """Every setting, for the log (Triton's names)."""
    levels = settings.levels
    return (
        f"log_info={levels.info} log_warning={levels.warning} log_error={levels.error} "
        f"log_verbose_level={levels.verbose} log_format={settings.format}"
    )
