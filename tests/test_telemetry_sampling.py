"""Roots are sampled once, by the interceptor, at ``sample_ratio``: unsampled calls cost no span at all."""

from __future__ import annotations

import math
import random

import pytest

from infergate.telemetry.interceptor import TelemetryInterceptor

DRAWS = 20_000


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_the_share_of_sampled_roots_is_the_ratio(ratio: float) -> None:
    interceptor = TelemetryInterceptor(None, None, sample_ratio=ratio, rng=random.Random(7))
    sampled = sum(interceptor.sampler.sample("") for _ in range(DRAWS))
    tolerance = 5 * math.sqrt(DRAWS * ratio * (1 - ratio))  # five binomial standard deviations
    assert abs(sampled - DRAWS * ratio) <= tolerance
