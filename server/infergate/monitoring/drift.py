"""Drift statistics as pure functions: a reference summary and a window of live values in, a score out.

The reference is what a profile keeps of the training sample, not the sample
itself: quantile bin edges with their counts (PSI), 101 quantiles (KS,
Wasserstein) and category counts. Every score is 0 for identical
distributions and grows with the difference; one threshold (0.2 by default)
works for all three on the scales chosen here:

* **PSI** (population stability index), ``sum((live - ref) * ln(live / ref))``
  over the reference's quantile bins, each proportion floored at
  :data:`PSI_FLOOR` so an empty bin costs a bounded amount. Rules of thumb:
  < 0.1 stable, 0.1-0.25 moving, > 0.25 shifted. A one-sigma shift of a normal
  feature scores about 1.
* **KS**: the largest gap between the reference CDF (linear between its
  quantiles) and the live empirical CDF, in [0, 1].
* **Wasserstein** (earth mover's distance) between the quantile functions,
  divided by the reference's standard deviation, so 1.0 means "moved by one
  sigma" whatever the feature's unit.

Non-finite live values are left out of numeric scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "PSI_FLOOR",
    "QUANTILE_GRID",
    "categorical_psi",
    "ks",
    "psi",
    "psi_from_counts",
    "wasserstein",
]

PSI_FLOOR = 1e-4
QUANTILE_GRID: npt.NDArray[np.float64] = np.linspace(0.0, 1.0, 101)

FloatArray = npt.NDArray[np.float64]
Values = Sequence[float] | npt.NDArray[Any]  # anything np.asarray makes floats of


def psi_from_counts(reference: Values, live: Values) -> float:
    """PSI of two histograms over the same bins (counts or proportions; zero totals score 0)."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(live, dtype=np.float64)
    if ref.shape != cur.shape:
        raise ValueError(f"histograms differ in bins: {ref.shape[0]} and {cur.shape[0]}")
    if ref.sum() <= 0 or cur.sum() <= 0:
        return 0.0
    p = np.maximum(ref / ref.sum(), PSI_FLOOR)
    q = np.maximum(cur / cur.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def bin_counts(edges: Values, values: Values) -> npt.NDArray[np.int64]:
    """Counts of ``values`` in the bins that inner ``edges`` cut (len(edges) + 1 bins; a value on an edge
    goes to the bin above it, as in the profile)."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.int64)


def psi(edges: Values, reference_counts: Values, values: Values) -> float:
    """PSI of live ``values`` against the reference's bins (inner ``edges``) and their counts."""
    finite = _finite(values)
    if finite.size == 0:
        return 0.0
    return psi_from_counts(np.asarray(reference_counts, dtype=np.float64), bin_counts(edges, finite))


def categorical_psi(reference: Mapping[str, int], other: int, live: Sequence[str]) -> float:
    """PSI over categories: the reference's named ones plus "other" (rare or unseen categories)."""
    names = list(reference)
    position = {name: i for i, name in enumerate(names)}
    ref = np.array([*reference.values(), other], dtype=np.float64)
    cur = np.zeros(len(names) + 1, dtype=np.float64)
    for key in live:
        cur[position.get(key, len(names))] += 1
    return psi_from_counts(ref, cur)


def ks(quantiles: Values, values: Values) -> float:
    """Kolmogorov-Smirnov distance between the reference CDF (from its quantiles on QUANTILE_GRID)
    and the empirical CDF of ``values``."""
    x = np.sort(_finite(values))
    n = x.size
    if n == 0:
        return 0.0
    at_or_below, below = _reference_cdf(np.asarray(quantiles, dtype=np.float64), x)
    rank = np.arange(1, n + 1) / n
    # The live CDF steps from (i-1)/n to i/n at x_i; compare both ends with the reference on the same side.
    return float(max((rank - at_or_below).max(), (below - (rank - 1 / n)).max(), 0.0))


def _reference_cdf(quantiles: FloatArray, x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """P_ref(X <= x) and P_ref(X < x), linear between quantiles.

    A value repeated among the quantiles (one the reference holds often, as
    integer features do) is a jump of the CDF there, not a slope.
    """
    edges, first, repeats = np.unique(quantiles, return_index=True, return_counts=True)
    low, high = QUANTILE_GRID[first], QUANTILE_GRID[first + repeats - 1]
    # Each edge twice: where the CDF arrives and where it leaves. np.interp takes the last of equal
    # points, so at an edge it answers P(X <= x).
    at_or_below = np.interp(x, np.repeat(edges, 2), np.column_stack([low, high]).ravel())
    index = np.searchsorted(edges, x).clip(max=edges.size - 1)
    below = np.where(edges[index] == x, low[index], at_or_below)
    return at_or_below, below


def wasserstein(quantiles: Values, std: float, values: Values) -> float:
    """Wasserstein-1 distance between the reference's and the live quantile functions, in reference sigmas."""
    finite = _finite(values)
    if finite.size == 0:
        return 0.0
    ref = np.asarray(quantiles, dtype=np.float64)
    live = np.quantile(finite, QUANTILE_GRID)
    distance = float(np.trapezoid(np.abs(live - ref), QUANTILE_GRID))
    return distance / _scale(std, ref)


def _scale(std: float, quantiles: FloatArray) -> float:
    """The unit of a Wasserstein score: the reference's sigma, else its range, else 1 (a constant feature)."""
    if std > 0:
        return std
    spread = float(quantiles[-1] - quantiles[0])
    return spread if spread > 0 else 1.0


def _finite(values: Values) -> FloatArray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]
