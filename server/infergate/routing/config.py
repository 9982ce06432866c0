"""The ``routing:`` block of a model's config.yaml: weights, sticky keys, shadow and canary.

Checked for coherence here, at load; whether the versions it names are loaded is
:func:`infergate.routing.router.check_routing`'s job, when it is applied.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator, model_validator

from infergate.configfile import Strict

__all__ = ["CanaryRouting", "Routing", "ShadowRouting", "StickyRouting"]


def _version_key(value: object) -> object:
    """A version number written as a mapping key in quotes is still one: Helm renders every map key as a
    string (``weights: {"1": 90}``). Anything else is left for the (strict) integer check to refuse."""
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value


VersionKey = Annotated[int, BeforeValidator(_version_key), Field(ge=0)]


class StickyRouting(Strict):
    """Where the key that pins a caller to one version comes from: a gRPC metadata header or a request parameter."""

    header: Annotated[str, Field(min_length=1, pattern=r"^[a-z0-9_.-]+$")] | None = None
    parameter: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> StickyRouting:
        if (self.header is None) == (self.parameter is None):
            raise ValueError("set exactly one of header, parameter")
        return self


class ShadowRouting(Strict):
    """Mirror a fraction of routed requests to ``version``; its answers are compared, never returned."""

    version: Annotated[int, Field(ge=0)]
    fraction: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Shadow calls waiting to run; when full, new ones are dropped (and counted).
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 64
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    # Shadow calls of this model may be running at most this share of the time; beyond it copies are dropped.
    max_busy_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1


class CanaryRouting(Strict):
    """Give ``version`` a share of traffic that grows step by step while it stays within limits."""

    version: Annotated[int, Field(ge=0)]
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(min_length=1)  # percent of traffic
    # Canary requests observed at each step before it is judged.
    step_requests: Annotated[int, Field(ge=20, le=10_000_000)] = 200
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Canary p99 latency may be at most this multiple of the primary's over the same step.
    max_p99_ratio: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 2.0

    @model_validator(mode="after")
    def _increasing(self) -> CanaryRouting:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must increase")
        return self


class Routing(Strict):
    """How requests that name no version are spread over the loaded versions."""

    weights: dict[VersionKey, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}
    sticky: StickyRouting | None = None
    shadow: ShadowRouting | None = None
    canary: CanaryRouting | None = None

    @field_validator("weights")
    @classmethod
    def _finite_total(cls, weights: dict[int, float]) -> dict[int, float]:
        # Each weight is finite, but two near the largest float add up to inf: the router's running
        # total would then send every request to the version past the overflow.
        if not math.isfinite(sum(weights.values())):
            raise ValueError("weights must sum to a finite total")
        return weights

    @model_validator(mode="after")
    def _coherent(self) -> Routing:
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("weights must sum to a positive total")
        shadow, canary = self.shadow, self.canary
        if shadow is not None and self.weights.get(shadow.version, 0) > 0:
            raise ValueError(f"shadow.version {shadow.version} also takes traffic in weights: it would shadow itself")
        if canary is not None and self.weights.get(canary.version, 0) > 0:
            raise ValueError(f"canary.version {canary.version} also has a weight; canary traffic comes from its steps")
        if shadow is not None and canary is not None and shadow.version == canary.version:
            raise ValueError(f"version {shadow.version} cannot be both the shadow and the canary")
        return self

    def versions(self) -> dict[str, int]:
        """Every version the routing names, by the field that names it."""
        named = {f"weights.{v}": v for v in self.weights}
        if self.shadow is not None:
            named["shadow.version"] = self.shadow.version
        if self.canary is not None:
            named["canary.version"] = self.canary.version
        return named

    def side_versions(self) -> set[int]:
        """The shadow and canary versions: they get their own share of traffic, never the default one."""
        return {side.version for side in (self.shadow, self.canary) if side is not None}
