"""Which calls that bring no trace context are traced: server-wide, and per model once TraceSetting says so.

The interceptor asks :meth:`TraceSampler.sample` once per such call, with the
model the request names (empty for calls that name none, and for streams).
The answer follows a :class:`TraceRule`:

* ``level``: ``OFF`` traces nothing, ``TIMESTAMPS`` traces (Triton's names; a
  span is infergate's record of a call's times);
* ``ratio``: the share of calls traced, drawn at random (Triton's
  ``trace_rate`` N is a ratio of 1/N);
* ``count``: how many more calls may be traced, then none; -1 for no limit.

The server-wide rule starts from ``telemetry.sample_ratio``. A model's rule
sets any of the three for that model alone; what it leaves unset is the
server-wide rule's. A model's ``count`` counts that model's traces; otherwise
the server-wide count counts every call it applies to. Calls whose caller sent
a ``traceparent`` follow the caller's decision and never reach the sampler.

Why the interceptor samples, and not only the SDK's sampler: a call that is not
sampled then costs no span, no id generation and no context switch at all. On
the overhead-bound model, creating and ending non-recording spans cost about 5%
of throughput. The tracer provider's root sampler is therefore always-on (see
``Telemetry.from_config``) and the draw is made once, here.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["UNLIMITED", "TraceLevel", "TraceRule", "TraceSampler"]

TraceLevel = Literal["OFF", "TIMESTAMPS"]
UNLIMITED = -1


@dataclass(frozen=True)
class TraceRule:
    """One scope's trace settings; a field left None is taken from the server-wide rule."""

    level: TraceLevel | None = None
    ratio: float | None = None
    count: int | None = None

    def given(self) -> dict[str, Any]:
        """The fields this rule sets, by name."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def changed(self, changes: TraceRule, cleared: frozenset[str] = frozenset()) -> TraceRule:
        """This rule with the fields ``changes`` sets, and the ``cleared`` ones unset."""
        return dataclasses.replace(self, **{**dict.fromkeys(cleared), **changes.given()})


@dataclass
class _Scope:
    """A rule as it applies: every field set, and where its count is kept."""

    traced: bool
    ratio: float
    budget: _Budget


@dataclass
class _Budget:
    left: int  # traces left; UNLIMITED for no limit


class TraceSampler:
    """The server-wide :class:`TraceRule` and each model's, and the draw for each call."""

    def __init__(self, ratio: float, rng: random.Random | None = None):
        self._rng = rng or random.Random()
        self._level: TraceLevel = "TIMESTAMPS" if ratio > 0 else "OFF"
        self._ratio = ratio if ratio > 0 else 1.0
        self._server_budget = _Budget(UNLIMITED)
        self._models: dict[str, TraceRule] = {}
        self._model_budgets: dict[str, _Budget] = {}
        self._scopes: dict[str, _Scope] = {}  # per model with a rule of its own; the rest use _default
        self._default = self._resolve(TraceRule())

    def sample(self, model: str) -> bool:
        """Whether a call naming ``model`` (or none: "") is traced; counts it against its budget if so."""
        scope = self._scopes.get(model, self._default) if self._scopes else self._default
        if not scope.traced:
            return False
        budget = scope.budget
        if budget.left == 0 or (scope.ratio < 1.0 and self._rng.random() >= scope.ratio):
            return False
        if budget.left > 0:
            budget.left -= 1
        return True

    def rule(self, model: str = "") -> TraceRule:
        """The settings that apply to ``model`` ("" for the server-wide ones), every field set."""
        level, ratio = self._effective(self._models.get(model, TraceRule()))
        return TraceRule(level, ratio, self._model_budgets.get(model, self._server_budget).left)

    def update(self, model: str, changes: TraceRule, cleared: frozenset[str] = frozenset()) -> None:
        """Set the fields ``changes`` sets, for ``model`` ("" server-wide); a model's ``cleared`` fields
        go back to the server-wide ones. A new ``count`` starts counting afresh."""
        if not model:
            self._level = changes.level or self._level
            self._ratio = changes.ratio if changes.ratio is not None else self._ratio
            if changes.count is not None:
                self._server_budget.left = changes.count
        else:
            rule = self._models.get(model, TraceRule()).changed(changes, cleared)
            if changes.count is not None:
                self._model_budgets[model] = _Budget(changes.count)
            elif "count" in cleared:
                self._model_budgets.pop(model, None)
            if rule == TraceRule():
                self._models.pop(model, None)
            else:
                self._models[model] = rule
        self._default = self._resolve(TraceRule())
        self._scopes = {name: self._resolve(rule, self._model_budgets.get(name)) for name, rule in self._models.items()}

    def _resolve(self, own: TraceRule, budget: _Budget | None = None) -> _Scope:
        level, ratio = self._effective(own)
        return _Scope(level != "OFF" and ratio > 0, ratio, budget or self._server_budget)

    def _effective(self, own: TraceRule) -> tuple[TraceLevel, float]:
        """The level and ratio of a scope whose own rule is ``own``: its own, else the server-wide ones."""
        return own.level or self._level, own.ratio if own.ratio is not None else self._ratio
