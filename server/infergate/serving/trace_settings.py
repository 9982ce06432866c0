"""Triton's trace extension (TraceSetting): which calls are traced, server-wide or per model, changed at run time.

The settings, with Triton's names (each value a list of strings):

* ``trace_level``: ``["OFF"]`` or ``["TIMESTAMPS"]``. ``TENSORS`` is refused:
  infergate never puts tensor contents on a span (docs/privacy.md).
* ``trace_rate``: ``["N"]``, one call in N traced (on average: the draw is
  random), N ≥ 1.
* ``trace_count``: ``["N"]``, how many more calls are traced, then none;
  ``["-1"]`` for no limit.
* ``trace_mode``: always ``["opentelemetry"]``; spans go where the ``OTEL_*``
  variables say. Triton's ``trace_file`` and ``log_frequency`` (its own file
  output) are UNIMPLEMENTED.

With ``model_name`` a request reads or changes that model's settings; an empty
value list (``[]``) clears one of them, so the model follows the server-wide one
again. Without, the server-wide settings, which start from
``telemetry.sample_ratio`` (1/ratio as the rate). A request is applied whole or
not at all: an unknown name or value is INVALID_ARGUMENT naming it (Triton
passes over names and levels it does not know). Changing anything needs a
server started with tracing on (``--traces``); reading never does. Calls whose
caller sent a ``traceparent`` follow the caller's decision, whatever is set
here (``telemetry/sampling.py``). An admin call, audited.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument, Unimplemented
from infergate.telemetry.sampling import UNLIMITED, TraceRule, TraceSampler

__all__ = [
    "LocalTraceSettings",
    "TraceChange",
    "TraceSettings",
    "requested_trace_change",
    "trace_settings_line",
    "trace_settings_message",
]

_FIELDS = {"trace_level": "level", "trace_rate": "ratio", "trace_count": "count"}
_MODE = "opentelemetry"
_FILE_OUTPUT = ("trace_file", "log_frequency")
_KNOWN = ", ".join([*_FIELDS, "trace_mode", *_FILE_OUTPUT])
TRACING_OFF = TraceRule("OFF", 1.0, UNLIMITED)  # what a server started without tracing reads back


@dataclasses.dataclass(frozen=True)
class TraceChange:
    """What one TraceSetting request changes: in ``model`` ("" server-wide), the fields ``rule`` sets,
    and the ``cleared`` ones (a model's, back to the server-wide value)."""

    model: str
    rule: TraceRule
    cleared: frozenset[str] = frozenset()

    def then(self, later: TraceChange) -> TraceChange:
        """This change and then ``later`` (same scope) as one: what a worker that joins late replays."""
        rule = self.rule.changed(later.rule, later.cleared)
        return TraceChange(self.model, rule, (self.cleared - later.rule.given().keys()) | later.cleared)

    def as_message(self) -> dict[str, Any]:
        """As JSON for the workers' control channel (``workers/control.py``)."""
        return {"model": self.model, "rule": dataclasses.asdict(self.rule), "cleared": sorted(self.cleared)}

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> TraceChange:
        """What :meth:`as_message` wrote; InvalidArgument for anything else."""
        try:
            rule = TraceRule(**message["rule"])
            return cls(str(message["model"]), rule, frozenset(message["cleared"]))
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(f"trace settings: not a settings message {dict(message)!r}") from exc


class TraceSettings(Protocol):
    """The seam TraceSetting calls: this process's :class:`LocalTraceSettings`, or under ``--workers N``
    the worker's control, which has the supervisor apply a change in every worker."""

    def rule(self, model: str) -> TraceRule: ...

    async def change(self, change: TraceChange) -> None: ...


class LocalTraceSettings:
    """The trace settings of this process: its interceptor's :class:`~infergate.telemetry.sampling.TraceSampler`."""

    def __init__(self, sampler: TraceSampler):
        self._sampler = sampler

    def rule(self, model: str) -> TraceRule:
        return self._sampler.rule(model)

    async def change(self, change: TraceChange) -> None:
        self._sampler.update(change.model, change.rule, change.cleared)


def requested_trace_change(model: str, settings: Mapping[str, pb.TraceSettingRequest.SettingValue]) -> TraceChange:
    """What ``settings`` change for ``model`` ("" server-wide); InvalidArgument or Unimplemented naming the
    first setting that cannot be applied (in name order), before anything is."""
    changes: dict[str, Any] = {}
    cleared: set[str] = set()
    for name in sorted(settings):
        values = list(settings[name].value)
        if name in _FILE_OUTPUT:
            if values:
                raise Unimplemented(
                    f"TraceSetting: {name} is Triton's own trace file output; infergate sends spans where the "
                    "OTEL_* variables say (trace_mode opentelemetry)"
                )
            continue
        if name == "trace_mode":
            if values not in ([], [_MODE]):
                raise InvalidArgument(f"TraceSetting: trace_mode is always {_MODE!r}; got {values}")
            continue
        if name not in _FIELDS:
            raise InvalidArgument(f"TraceSetting: unknown setting {name!r} (known: {_KNOWN})")
        if not values:
            if not model:
                raise InvalidArgument(f"TraceSetting: {name} can be cleared for a model only (model_name)")
            cleared.add(_FIELDS[name])
            continue
        if len(values) != 1:
            raise InvalidArgument(f"TraceSetting: {name} takes one value; got {values}")
        changes[_FIELDS[name]] = _parsed(name, values[0])
    return TraceChange(model, TraceRule(**changes), frozenset(cleared))


def _parsed(name: str, value: str) -> Any:
    if name == "trace_level":
        if value == "TENSORS":
            raise InvalidArgument("TraceSetting: trace_level TENSORS is not supported: no tensor is put on a span")
        if value not in ("OFF", "TIMESTAMPS"):
            raise InvalidArgument(f"TraceSetting: trace_level is OFF or TIMESTAMPS; got {value!r}")
        return value
    lowest = 1 if name == "trace_rate" else UNLIMITED
    try:
        number = int(value)
    except ValueError:
        number = lowest - 1
    if number < lowest or number > 2**31 - 1:
        raise InvalidArgument(f"TraceSetting: {name} is an integer from {lowest} to {2**31 - 1}; got {value!r}")
    return 1.0 / number if name == "trace_rate" else number


def trace_settings_message(rule: TraceRule) -> pb.TraceSettingResponse:
    """The settings that apply, as TraceSetting answers (Triton's names, OpenTelemetry mode)."""
    value = pb.TraceSettingResponse.SettingValue
    ratio = rule.ratio or 1.0
    return pb.TraceSettingResponse(
        settings={
            "trace_level": value(value=[rule.level or "OFF"]),
            "trace_rate": value(value=[str(max(1, round(1 / ratio)))]),
            "trace_count": value(value=[str(rule.count if rule.count is not None else UNLIMITED)]),
            "trace_mode": value(value=[_MODE]),
        }
    )


def trace_settings_line(change: TraceChange) -> str:
    """What ``change`` sets and clears, for the log."""
    rule = change.rule
    said = [f"trace_level={rule.level}"] if rule.level is not None else []
    said += [f"trace_rate={round(1 / rule.ratio)}"] if rule.ratio else []
    said += [f"trace_count={rule.count}"] if rule.count is not None else []
    names = {field: name for name, field in _FIELDS.items()}
    said += [f"{names[field]} cleared" for field in sorted(change.cleared)]
    return " ".join(said)
