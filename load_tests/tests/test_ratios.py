"""Paired ratios of interleaved runs: what the estimate and its margin promise.

Everything here is deterministic: simulated runs come from seeded generators,
and nothing is timed.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from load_tests.ratios import Ratio, paired, t_quantile


def _simulated(
    rng: random.Random, rounds: int, slices: int, noise: float, round_offsets: list[float] | None = None
) -> dict[str, list[float]]:
    """Two variants of the same server, slot by slot (round after round): every slot shares a
    drift factor (the machine's load of the moment), each run has its own noise (log-normal, ``noise``
    its standard deviation on the log scale), and each round of ``b`` its own offset (its processes' luck)."""
    offsets = round_offsets or [0.0] * rounds
    a, b = [], []
    for round_ in range(rounds):
        for _ in range(slices):
            drift = rng.uniform(1500.0, 2500.0)
            a.append(drift * rng.lognormvariate(0, noise))
            b.append(drift * rng.lognormvariate(0, noise) * math.exp(offsets[round_]))
    return {"a": a, "b": b}


def test_an_a_a_comparison_comes_out_at_one_within_its_margin() -> None:
    figures = _simulated(random.Random(7), rounds=6, slices=6, noise=0.15)
    ratio = paired(figures, "a", slices=6)["b"]
    assert ratio.pairs == 36 and ratio.rounds == 6
    assert abs(ratio.mean - 1.0) <= ratio.margin
    assert ratio.low <= 1.0 <= ratio.high


def test_noise_does_not_push_an_a_a_comparison_above_one() -> None:
    """The mean of per-slot ratios comes out about exp(noise²) above 1 (1.023 at 15% per run)."""
    rng = random.Random(1)
    estimates = [paired(_simulated(rng, 6, 6, noise=0.15), "a", slices=6)["b"].mean for _ in range(1000)]
    assert statistics.fmean(estimates) == pytest.approx(1.0, abs=0.005)


def test_swapping_base_and_variant_gives_the_reciprocal() -> None:
    figures = {"a": [100.0, 210.0, 55.0, 80.0, 120.0, 90.0], "b": [90.0, 190.0, 60.0, 70.0, 125.0, 81.0]}
    forward, backward = paired(figures, "a", slices=2)["b"], paired(figures, "b", slices=2)["a"]
    assert forward.mean * backward.mean == pytest.approx(1.0)
    assert forward.low == pytest.approx(1 / backward.high) and forward.high == pytest.approx(1 / backward.low)


def test_the_base_against_itself_is_exactly_one() -> None:
    ratio = paired({"a": [100.0, 200.0, 50.0, 70.0], "b": [1.0, 2.0, 3.0, 4.0]}, "a", slices=2)["a"]
    assert ratio == Ratio(1.0, 0.0, pairs=4, rounds=2, low=1.0, high=1.0)
    assert str(ratio) == "1.000 ± 0.000"


def test_a_per_round_offset_widens_the_margin() -> None:
    """The same slot noise, once without and once with each round's processes a few percent off."""
    calm = paired(_simulated(random.Random(3), 4, 6, noise=0.05), "a", slices=6)["b"]
    offsets = [0.08, -0.06, 0.05, -0.07]
    lucky = paired(_simulated(random.Random(3), 4, 6, noise=0.05, round_offsets=offsets), "a", slices=6)["b"]
    assert lucky.margin > 2 * calm.margin


def test_the_interval_covers_the_truth_95_times_in_100_when_rounds_differ() -> None:
    """Rounds about 10% apart (each its processes' luck), slots scattering by 10% per run around them:
    what the published runs showed. Slots taken as independent samples covered it three times in four."""
    rng = random.Random(5)
    covered = 0
    for _ in range(400):
        offsets = [rng.gauss(0, 0.1) for _ in range(4)]
        ratio = paired(_simulated(rng, 4, 6, noise=0.1, round_offsets=offsets), "a", slices=6)["b"]
        covered += ratio.low <= 1.0 <= ratio.high
    assert 0.92 <= covered / 400 <= 0.98


def test_slices_of_one_round_count_as_one_sample_not_many() -> None:
    """Six identical slices per round say no more than one: the interval is taken across rounds."""
    per_round = {"a": [100.0, 100.0, 100.0, 100.0], "b": [97.0, 104.0, 95.0, 99.0]}
    repeated = {name: [f for f in figures for _ in range(6)] for name, figures in per_round.items()}
    once, six_times = paired(per_round, "a", slices=1)["b"], paired(repeated, "a", slices=6)["b"]
    assert six_times.mean == pytest.approx(once.mean)
    assert six_times.margin == pytest.approx(once.margin)
    assert (six_times.pairs, six_times.rounds) == (24, 4)


def test_the_margin_is_the_student_t_interval_over_the_round_means() -> None:
    figures = {"a": [100.0, 100.0, 100.0, 100.0, 100.0, 100.0], "b": [90.0, 110.0, 100.0, 104.0, 96.0, 100.0]}
    ratio = paired(figures, "a", slices=2)["b"]
    means = [
        statistics.fmean([math.log(0.9), math.log(1.1)]),
        statistics.fmean([math.log(1.0), math.log(1.04)]),
        statistics.fmean([math.log(0.96), math.log(1.0)]),
    ]
    centre, half = statistics.fmean(means), t_quantile(2) * statistics.stdev(means) / math.sqrt(3)
    assert ratio.mean == pytest.approx(math.exp(centre))
    assert ratio.low == pytest.approx(math.exp(centre - half)) and ratio.high == pytest.approx(math.exp(centre + half))
    assert ratio.margin == pytest.approx((ratio.high - ratio.low) / 2)
    assert str(ratio) == f"{ratio.mean:.3f} ± {ratio.margin:.3f}"


def test_one_round_has_no_margin_and_says_so() -> None:
    ratio = paired({"a": [100.0, 100.0, 100.0], "b": [80.0, 125.0, 100.0]}, "a", slices=3)["b"]
    assert ratio.mean == pytest.approx(1.0) and (ratio.pairs, ratio.rounds) == (3, 1)
    assert math.isnan(ratio.margin) and math.isnan(ratio.low) and math.isnan(ratio.high)
    assert str(ratio) == "1.000 (one round: no margin)"


def test_slots_without_a_figure_pair_nothing_and_unpaired_figures_are_refused() -> None:
    # A slot where either server answered nothing (0, or NaN for a latency) has no ratio.
    ratio = paired({"a": [0.0, 100.0, 100.0, 100.0], "b": [50.0, math.nan, 110.0, 90.0]}, "a", slices=2)["b"]
    assert (ratio.pairs, ratio.rounds) == (2, 1)
    assert paired({"a": [0.0, 0.0], "b": [1.0, 1.0]}, "a", slices=1)["b"].pairs == 0
    assert math.isnan(paired({"a": [0.0, 0.0], "b": [1.0, 1.0]}, "a", slices=1)["b"].mean)
    with pytest.raises(ValueError, match="not paired"):
        paired({"a": [1.0, 2.0], "b": [1.0]}, "a", slices=1)
    with pytest.raises(ValueError, match="whole rounds"):
        paired({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0]}, "a", slices=2)


def _student_cdf(x: float, df: int) -> float:
    """Student's t distribution function, by Simpson's rule on its density from 0 to ``x``."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    steps = 20_000
    width = x / steps
    inner = sum((4 if i % 2 else 2) * density(i * width) for i in range(1, steps))
    return 0.5 + width / 3 * (density(0.0) + inner + density(x))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 8, 13, 21, 30, 31, 45, 100, 1000])
def test_the_quantile_is_student_t_at_97_5_percent_in_the_table_and_past_it(df: int) -> None:
    assert _student_cdf(t_quantile(df), df) == pytest.approx(0.975, abs=2e-4)


def test_past_the_table_the_quantile_keeps_falling_towards_the_normal_one() -> None:
    assert t_quantile(30) > t_quantile(31) > t_quantile(1000) > 1.959964
    with pytest.raises(ValueError):
        t_quantile(0)
