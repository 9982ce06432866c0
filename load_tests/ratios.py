"""Paired ratios of interleaved A/B runs: each variant's figure ÷ a base's, slot by slot, with a 95% interval.

The figures come in slot order (``interleave``): round after round, each round
``slices`` slots, every variant one figure per slot. A slot's ratio is one
paired sample the machine's drift hardly touches.

**The estimate is the geometric mean of the per-slot ratios** (the mean of
their logarithms, exponentiated), each round weighted alike: the mean of the
rounds' mean logs, which is the same thing when every slot paired (a slot
that did not leaves its round fewer slots, not less weight). The plain mean of ratios is biased upward by
about the square of the noise (two runs that scatter by 15% each come out 2.3%
apart on average when nothing differs) and is not symmetric: ÷ base and
base ÷ would not be reciprocals. On the log scale both go away.

**The interval is taken across rounds, not slots.** The slots of one round
load the same server processes, and what a process's luck gives (memory
layout, hash seed) stays with it for the whole round; rounds are the
independent samples. So the log ratios are averaged within each round, and the
interval is Student's t over the round means (``rounds - 1`` degrees of
freedom). It is computed on the log scale and exponentiated: ``low`` and
``high`` are its bounds, ``margin`` is half its width, so ``mean ± margin`` is
an interval as wide as [low, high] (which is not quite symmetric about the
mean: read targets from ``low`` and ``high``). With one round there is no
interval: margin, low and high are NaN, and the ratio says so when printed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Ratio", "paired", "t_quantile"]

# Student's t distribution, the 0.975 quantile (a two-sided 95% interval), for 1 to 30 degrees of freedom.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_NORMAL_975 = 1.959964  # the normal distribution's 0.975 quantile


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom: the table to 30; past it
    the Cornish-Fisher expansion around the normal quantile (within 1e-4 there; the normal quantile
    alone would be 4% short at 31)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _NORMAL_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Ratio:
    """A variant's figure ÷ the base's: the geometric mean of the per-slot ratios (``mean``), the half-width
    of its 95% interval over rounds (``margin``) and the interval itself (``low``, ``high``; all three NaN
    with one round), from ``pairs`` slots in ``rounds`` rounds."""

    mean: float
    margin: float
    pairs: int
    rounds: int
    low: float
    high: float

    def __str__(self) -> str:
        if math.isnan(self.margin) and not math.isnan(self.mean):
            return f"{self.mean:.3f} (one round: no margin)"
        return f"{self.mean:.3f} ± {self.margin:.3f}"


def paired(figures: Mapping[str, Sequence[float]], base: str, slices: int) -> dict[str, Ratio]:
    """Every variant's figure ÷ ``base``'s, slot by slot (see the module docstring).

    ``figures`` are in slot order, ``slices`` consecutive slots per round. A slot where either figure is
    not a positive number (a server that answered nothing) pairs nothing; a round without pairs drops out.
    Raises ValueError when a variant has not one figure per slot of the base, or the slots are not whole rounds.
    """
    reference = figures[base]
    if slices < 1 or len(reference) % slices:
        raise ValueError(f"{len(reference)} slots are not whole rounds of {slices} slices")
    return {name: _ratio(name, values, base, reference, slices) for name, values in figures.items()}


def _ratio(name: str, values: Sequence[float], base: str, reference: Sequence[float], slices: int) -> Ratio:
    if len(values) != len(reference):
        raise ValueError(f"{name} has {len(values)} figures and {base} {len(reference)}: not paired")
    by_round: dict[int, list[float]] = {}
    for slot, (value, ref) in enumerate(zip(values, reference, strict=True)):
        if value > 0 and ref > 0 and math.isfinite(value) and math.isfinite(ref):
            by_round.setdefault(slot // slices, []).append(math.log(value / ref))
    pairs = sum(len(logs) for logs in by_round.values())
    means = [statistics.fmean(logs) for logs in by_round.values()]
    if not means:
        return Ratio(math.nan, math.nan, 0, 0, math.nan, math.nan)
    centre = statistics.fmean(means)
    if len(means) == 1:
        return Ratio(math.exp(centre), math.nan, pairs, 1, math.nan, math.nan)
    half = t_quantile(len(means) - 1) * statistics.stdev(means) / math.sqrt(len(means))
    low, high = math.exp(centre - half), math.exp(centre + half)
    return Ratio(math.exp(centre), (high - low) / 2, pairs, len(means), low, high)
