"""The router: which loaded version serves a request that names none.

Pure decision logic over version numbers — no gRPC, no onnxruntime — so it is
tested with tables. One :class:`Router` per model, rebuilt (never mutated) when
the model's versions or its ``routing:`` block change; only the canary's
step state changes in place, fed by :meth:`Router.observe`.

Decision order for a request:

1. It names a version: that version (``arm="requested"``), no shadow.
2. A canary is ramping: with probability ``weight%`` the canary serves it
   (``arm="canary"``); a sticky key decides by hash instead of by chance.
3. The weighted split (``arm="split"``, or ``"sticky"`` when a key decided):
   with a key, weighted rendezvous hashing, so a key keeps its version while
   the config is unchanged and moves only as far as a weight change requires.
   Without weights: the newest loaded version (``arm="default"``).
4. Shadow: a ``fraction`` of routed requests is also mirrored to the shadow.

The canary's judgements (a step up, holding at the last step, a rollback) are
also told to an optional :class:`CanaryEvents` (the audit log, connected by the
repository): the router itself writes nothing anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from infergate.routing.config import CanaryRouting, Routing

__all__ = [
    "CanaryEvents",
    "CanaryStatus",
    "Decision",
    "Router",
    "RoutingError",
    "answering_versions",
    "check_routing",
    "rendezvous",
    "split_weights",
]

log = logging.getLogger(__name__)

_HASH_SCALE = float(1 << 64)


class RoutingError(ValueError):
    """A routing block that does not fit the loaded versions; ``field`` is its dotted path."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"routing.{field_path}: {message}")
        self.field = field_path


@dataclass(frozen=True, slots=True)
class Decision:
    version: int
    arm: str  # requested | default | split | sticky | canary
    shadow: int | None = None


def check_routing(routing: Routing, loaded: Sequence[int]) -> None:
    """Raise RoutingError when the routing names a version that is not loaded."""
    for where, version in routing.versions().items():
        if version not in loaded:
            have = ", ".join(str(v) for v in sorted(loaded)) or "none"
            raise RoutingError(where, f"version {version} is not loaded (loaded: {have})")
    if not routing.weights and set(loaded) <= routing.side_versions():
        where = "shadow.version" if routing.shadow is not None else "canary.version"
        raise RoutingError(where, "no other version is loaded to answer callers: it would shadow itself")


def split_weights(routing: Routing) -> dict[int, float]:
    """The versions the weighted split sends traffic to, with their weights (a zero weight takes none)."""
    return {v: w for v, w in routing.weights.items() if w > 0}


def answering_versions(routing: Routing, loaded: Sequence[int]) -> list[int]:
    """The versions that may answer a request naming none, the primary first: the weighted ones (the
    largest weight, the newest on a tie, is the primary), else the newest that is neither shadow nor
    canary; then a canary. A shadow only gets copies. ``routing`` fits ``loaded`` (:func:`check_routing`)."""
    weights = split_weights(routing)
    if weights:
        answering = sorted(weights, key=lambda v: (weights[v], v), reverse=True)
    else:
        side = routing.side_versions()
        answering = [max(v for v in loaded if v not in side)]
    canary = routing.canary
    if canary is not None and canary.version not in answering:
        answering.append(canary.version)
    return answering


def _unit_hash(*parts: str) -> float:
    """A stable hash in (0, 1): the same in every process (unlike ``hash()``, which is salted)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _HASH_SCALE


def rendezvous(key: str, weights: dict[int, float]) -> int:
    """Weighted rendezvous (highest random weight) hashing: a key's version for these weights."""
    best, best_score = -1, -math.inf
    for version, weight in sorted(weights.items()):
        if weight <= 0:
            continue
        score = weight / -math.log(_unit_hash(key, str(version)))
        if score > best_score:
            best, best_score = version, score
    return best


class CanaryEvents(Protocol):
    """Told of each canary judgement, on the event loop as the request that decided it finishes.

    Implementations must be cheap and must not raise (:class:`~infergate.audit.AuditLog` is one).
    """

    def canary_step(self, model: str, version: int, step: int, weight: float) -> None:
        """The canary moved up to ``step`` (0-based) and now takes ``weight`` % of the traffic."""

    def canary_completed(self, model: str, version: int, weight: float) -> None:
        """The canary passed its last step and holds at ``weight`` %."""

    def canary_rolled_back(self, model: str, version: int, reason: str) -> None:
        """The canary breached a limit (``reason``) and takes no more traffic."""


@dataclass(slots=True)
class CanaryStatus:
    version: int
    weight: float
    step: int
    state: str  # ramping | complete | rolled_back
    reason: str = ""


@dataclass(slots=True)
class _Window:
    """Outcomes of one arm during one canary step."""

    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def add(self, ok: bool, latency_s: float) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        if ok:
            self.latencies.append(latency_s)

    def p99(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class _Canary:
    """The step schedule of one canary and its judgement at the end of each step."""

    def __init__(self, spec: CanaryRouting, model: str, events: CanaryEvents | None = None):
        self.spec = spec
        self.model = model
        self._events = events
        self.status = CanaryStatus(spec.version, spec.steps[0], 0, "ramping")
        self._canary = _Window()
        self._primary = _Window()

    def observe(self, arm: str, ok: bool, latency_s: float) -> None:
        if self.status.state == "rolled_back":
            return
        if arm == "canary":
            self._canary.add(ok, latency_s)
        elif arm in ("split", "sticky", "default"):
            self._primary.add(ok, latency_s)
        if self.status.state == "ramping" and self._canary.requests >= self.spec.step_requests:
            self._judge()

    def _judge(self) -> None:
        breach = self._breach()
        if breach:
            self.status.state, self.status.weight, self.status.reason = "rolled_back", 0.0, breach
            log.warning("model %s: canary version %d rolled back: %s", self.model, self.spec.version, breach)
            if self._events is not None:
                self._events.canary_rolled_back(self.model, self.spec.version, breach)
            return
        step = self.status.step + 1
        if step >= len(self.spec.steps):
            self.status.state = "complete"
            log.info("model %s: canary version %d holds at %g%%", self.model, self.spec.version, self.status.weight)
            if self._events is not None:
                self._events.canary_completed(self.model, self.spec.version, self.status.weight)
            return
        self.status.step, self.status.weight = step, self.spec.steps[step]
        log.info("model %s: canary version %d raised to %g%%", self.model, self.spec.version, self.status.weight)
        if self._events is not None:
            self._events.canary_step(self.model, self.spec.version, step, self.status.weight)
        self._canary, self._primary = _Window(), _Window()

    def _breach(self) -> str:
        canary, primary = self._canary, self._primary
        error_rate = canary.errors / canary.requests
        if error_rate > self.spec.max_error_rate:
            return f"error rate {error_rate:.2%} over {canary.requests} requests > {self.spec.max_error_rate:.2%}"
        canary_p99, primary_p99 = canary.p99(), primary.p99()
        if canary_p99 is not None and primary_p99 is not None and primary_p99 > 0:
            ratio = canary_p99 / primary_p99
            if ratio > self.spec.max_p99_ratio:
                return (
                    f"p99 {canary_p99 * 1e3:.2f} ms is {ratio:.2f}x the primary's {primary_p99 * 1e3:.2f} ms"
                    f" (limit {self.spec.max_p99_ratio:g}x)"
                )
        return ""


class Router:
    """Routes the requests of one model over its loaded versions (see the module docstring)."""

    def __init__(
        self,
        model: str,
        routing: Routing | None,
        loaded: Sequence[int],
        rng: random.Random | None = None,
        events: CanaryEvents | None = None,
    ):
        """``events``: told of the canary's judgements (see :class:`CanaryEvents`)."""
        if not loaded:
            raise ValueError(f"model {model}: a router needs at least one loaded version")
        self.model = model
        self.routing = routing or Routing()
        check_routing(self.routing, loaded)
        self._rng = rng or random.Random()
        # Primary first: without weights, the newest version that is neither shadow nor canary (check_routing
        # made sure there is one), which answers every request the canary does not take.
        self.answering: tuple[int, ...] = tuple(answering_versions(self.routing, loaded))
        self._weights = split_weights(self.routing)
        self._versions = list(self._weights)
        self._cumulative = _cumulative(self._weights)
        canary = self.routing.canary
        self._canary = _Canary(canary, model, events) if canary is not None else None

    @property
    def primary(self) -> int:
        """The version that stands for the model when a request names none and is not routed
        (metadata, config): the one with the largest weight (the newest on a tie), else the default."""
        return self.answering[0]

    @property
    def sticky_header(self) -> str | None:
        return self.routing.sticky.header if self.routing.sticky else None

    @property
    def sticky_parameter(self) -> str | None:
        return self.routing.sticky.parameter if self.routing.sticky else None

    @property
    def canary(self) -> CanaryStatus | None:
        return self._canary.status if self._canary is not None else None

    def carry_canary(self, previous: Router) -> None:
        """Go on with ``previous``'s canary (its step, its windows, a rollback) when it is the same canary:
        only a change of the routing block starts a canary over, not a version added or reloaded beside it."""
        mine, theirs = self._canary, previous._canary
        if mine is not None and theirs is not None and mine.spec == theirs.spec:
            self._canary = theirs

    def route(self, requested: int | None = None, key: str | None = None) -> Decision:
        """The version for one request; ``key`` is the sticky key when the request has one."""
        if requested is not None:
            return Decision(requested, "requested")
        version, arm = self._choose(key)
        shadow = self.routing.shadow
        if shadow is not None and shadow.version != version and self._rng.random() < shadow.fraction:
            return Decision(version, arm, shadow.version)
        return Decision(version, arm)

    def _choose(self, key: str | None) -> tuple[int, str]:
        canary = self._canary
        if canary is not None and canary.status.weight > 0:
            draw = _unit_hash(key, "canary") if key is not None else self._rng.random()
            if draw * 100 < canary.status.weight:
                return canary.spec.version, "canary"
        if not self._weights:
            return self.answering[0], "default"
        if key is not None:
            return rendezvous(key, self._weights), "sticky"
        point = self._rng.random() * self._cumulative[-1]
        for version, bound in zip(self._versions, self._cumulative, strict=True):
            if point < bound:
                return version, "split"
        return self._versions[-1], "split"

    def observe(self, decision: Decision, ok: bool, latency_s: float) -> None:
        """Feed one finished request back (drives the canary's steps and rollback)."""
        if self._canary is not None:
            self._canary.observe(decision.arm, ok, latency_s)


def _cumulative(weights: dict[int, float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights.values():
        total += weight
        out.append(total)
    return out
