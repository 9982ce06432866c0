"""Drift statistics as pure functions: a reference summary and live values in, a score out.

The reference is what a profile keeps of the training sample, not the sample
itself: quantile bin edges with their counts (PSI), 101 quantiles (KS,
Wasserstein) and category counts. Every score is 0 for identical
distributions and grows with the difference; one threshold (0.2 by default)
works for all three on the scales chosen here:

* **PSI** (population stability index), ``sum((live - ref) * ln(live / ref))``
  over the reference's quantile bins, each share floored at :data:`PSI_FLOOR`
  so an empty bin costs a bounded amount. Rules of thumb: < 0.1 stable,
  0.1-0.25 moving, > 0.25 shifted. A one-sigma shift of a normal feature
  scores about 1. The outer quantile bins are open-ended, so
  :func:`outer_bins` adds a bin below the reference's minimum and one above
  its maximum, each holding one count (the chance that a new value falls past
  n samples' range is 1/(n + 1)): values past the reference's range count as
  new, not as more of its extreme bins (without them a feature constant in the reference
  could never score when it moved up).
* **KS**: the largest gap between the reference CDF and the live empirical
  CDF, looked at on both sides of each of the reference's 101 quantiles
  (so within about 0.01 of the exact statistic), in [0, 1].
* **Wasserstein** (earth mover's distance) between the quantile functions,
  divided by the reference's standard deviation, so 1.0 means "moved by one
  sigma" whatever the feature's unit.

The ``*_rows`` and ``*_sorted`` forms score many features at once: one sort
of the window (a row per feature) serves all three methods, which is how a
window of hundreds of features is scored in milliseconds.
Non-finite values (NaN, ±Inf) are "missing": PSI gives them a bin of their
own (the reference's share is what its sample lacked), and a KS or
Wasserstein score is at least the PSI of the split between finite and
missing values (:func:`missing_psi_rows`), so a feature that turns all NaN
scores high instead of 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "PSI_FLOOR",
    "QUANTILE_GRID",
    "as_rows",
    "bin_counts",
    "bin_counts_rows",
    "categorical_psi",
    "categorical_psi_codes",
    "category_codes",
    "ks",
    "ks_rows",
    "ks_sorted",
    "missing_psi_rows",
    "outer_bins",
    "psi",
    "psi_from_counts",
    "psi_rows",
    "quantiles_sorted",
    "reference_steps",
    "scale",
    "sorted_rows",
    "wasserstein",
    "wasserstein_rows",
]

PSI_FLOOR = 1e-4
QUANTILE_GRID: npt.NDArray[np.float64] = np.linspace(0.0, 1.0, 101)

FloatArray = npt.NDArray[np.float64]
Values = Sequence[float] | npt.NDArray[Any]  # anything np.asarray makes floats of


# --- PSI -------------------------------------------------------------------------------------


def psi_rows(reference: Values, live: Values) -> FloatArray:
    """PSI of each row of ``live`` against the same row of ``reference`` (histograms over the same bins,
    counts or shares). Bins empty on both sides cost nothing; a row with no count scores 0."""
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    cur = np.atleast_2d(np.asarray(live, dtype=np.float64))
    if ref.shape != cur.shape:
        raise ValueError(f"histograms differ in bins: {ref.shape[-1]} and {cur.shape[-1]}")
    ref_total, cur_total = ref.sum(axis=1, keepdims=True), cur.sum(axis=1, keepdims=True)
    p = np.maximum(ref / np.where(ref_total > 0, ref_total, 1.0), PSI_FLOOR)
    q = np.maximum(cur / np.where(cur_total > 0, cur_total, 1.0), PSI_FLOOR)
    scores = np.sum((q - p) * np.log(q / p), axis=1)
    return np.where((ref_total[:, 0] > 0) & (cur_total[:, 0] > 0), scores, 0.0)


def psi_from_counts(reference: Values, live: Values) -> float:
    """PSI of two histograms over the same bins (counts or shares; zero totals score 0)."""
    return float(psi_rows(reference, live)[0])


def outer_bins(edges: Values, counts: Values, low: float, high: float) -> tuple[FloatArray, FloatArray]:
    """The reference's bins (inner ``edges``, ``counts``) with a bin at each end for live values below its
    minimum ``low`` or above its maximum ``high``: edges ``[low, *edges, the float after high]``, counts
    ``[1, *counts, 1]``. A new value falls past the largest of n samples with probability 1/(n + 1), so
    each outer bin holds one count: about that share, where an empty bin (the floor, 1e-4) would make a
    small sample's chance outliers look like drift. ``low`` itself stays in the lowest reference bin and
    ``high`` in the highest (a value on an edge goes to the bin above it). Outer edges that would fall
    inside the inner ones (a profile whose minimum or maximum contradicts its edges) are moved out to
    them, so edges never decrease.
    """
    inner = np.asarray(edges, dtype=np.float64)
    bottom = float(np.min(inner, initial=low))
    top = float(np.max(inner, initial=max(high, bottom)))
    return (
        np.concatenate([[bottom], inner, [np.nextafter(top, np.inf)]]),
        np.concatenate([[1.0], np.asarray(counts, dtype=np.float64), [1.0]]),
    )


def bin_counts(edges: Values, values: Values) -> npt.NDArray[np.int64]:
    """Counts of ``values`` in the bins that inner ``edges`` cut (len(edges) + 1 bins; a value on an edge
    goes to the bin above it, as in the profile)."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.int64)


def psi(edges: Values, reference_counts: Values, values: Values, reference_missing: float = 0.0) -> float:
    """PSI of live ``values`` against the reference's bins (inner ``edges``) and their counts, with one
    more bin for non-finite values (``reference_missing``: the reference's count of them)."""
    finite = _finite(values)
    live = [*bin_counts(edges, finite).tolist(), np.asarray(values).size - finite.size]
    return psi_from_counts([*np.asarray(reference_counts, dtype=np.float64).tolist(), reference_missing], live)


def missing_psi_rows(reference_share: Values, missing: Values, total: int) -> FloatArray:
    """PSI of the split between finite and non-finite values alone, row by row: the reference's share of
    non-finite values [k] against ``missing`` [k] of ``total`` live values (0 without live values)."""
    share = np.asarray(reference_share, dtype=np.float64)
    gone = np.asarray(missing, dtype=np.float64)
    return psi_rows(np.stack([1.0 - share, share], axis=1), np.stack([total - gone, gone], axis=1))


def categorical_psi(reference: Mapping[str, int], other: int, live: Sequence[str]) -> float:
    """PSI over categories: the reference's named ones plus "other" (rare or unseen categories)."""
    return categorical_psi_codes(reference, other, category_codes(reference, live))


def category_codes(reference: Mapping[str, int], live: Sequence[str]) -> npt.NDArray[np.int64]:
    """Each of ``live`` as the position of its category in ``reference``; ``len(reference)`` for "other"."""
    position = {name: i for i, name in enumerate(reference)}
    return np.array([position.get(key, len(position)) for key in live], dtype=np.int64)


def categorical_psi_codes(reference: Mapping[str, int], other: int, codes: npt.NDArray[np.int64]) -> float:
    """:func:`categorical_psi` of values already turned into :func:`category_codes`."""
    ref = np.array([*reference.values(), other], dtype=np.float64)
    return psi_from_counts(ref, np.bincount(codes, minlength=len(reference) + 1))


# --- sorted rows: one sort serves all three methods -------------------------------------------


def as_rows(values: Values) -> FloatArray:
    """Each column of ``values`` [n, k] as a row of a new [k, n] array, non-finite values turned to NaN."""
    rows = np.array(np.asarray(values, dtype=np.float64).T, order="C")
    rows[~np.isfinite(rows)] = np.nan
    return rows


def sorted_rows(values: Values) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """:func:`as_rows`, each row sorted (its NaNs at the end), and how many finite values each row has."""
    rows = as_rows(values)
    rows.sort(axis=1)
    return rows, np.count_nonzero(~np.isnan(rows), axis=1)


def quantiles_sorted(rows: FloatArray, counts: npt.NDArray[np.int64]) -> FloatArray:
    """The QUANTILE_GRID quantiles [k, 101] of sorted rows with ``counts`` finite values each (numpy's
    default linear interpolation); rows without a value give NaN."""
    last = np.maximum(counts - 1, 0)[:, np.newaxis].astype(np.float64)
    position = QUANTILE_GRID[np.newaxis, :] * last
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, last.astype(np.int64))
    fraction = position - low
    below, above = np.take_along_axis(rows, low, axis=1), np.take_along_axis(rows, high, axis=1)
    out = below + (above - below) * fraction
    return np.where(counts[:, np.newaxis] > 0, out, np.nan)


def bin_counts_rows(rows: FloatArray, edges: FloatArray) -> npt.NDArray[np.int64]:
    """:func:`bin_counts` of every row of ``rows`` [k, n] (NaN: no value). ``edges`` [k, E] holds each
    row's inner edges, padded with +inf (the padding bins stay empty); result [k, E + 1]."""
    out = np.empty((rows.shape[0], edges.shape[1] + 1), dtype=np.int64)
    missing = np.asarray(np.isnan(rows).any(axis=1))
    for i, gaps in enumerate(missing.tolist()):
        row = rows[i][~np.isnan(rows[i])] if gaps else rows[i]
        out[i] = np.bincount(np.searchsorted(edges[i], row, side="right"), minlength=edges.shape[1] + 1)
    return out


# --- KS --------------------------------------------------------------------------------------


def reference_steps(quantiles: Values) -> tuple[FloatArray, FloatArray]:
    """For each quantile on QUANTILE_GRID (each column of a [101, k] array): P_ref(X < q) and P_ref(X <= q).

    They differ where the reference holds one value often (an integer feature):
    the quantile repeats, and its CDF jumps from the first grid point that has
    it to the last.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    columns = q.reshape(len(QUANTILE_GRID), -1)
    below = np.empty_like(columns)
    at_or_below = np.empty_like(columns)
    for j in range(columns.shape[1]):
        column = columns[:, j]
        below[:, j] = QUANTILE_GRID[np.searchsorted(column, column, side="left")]
        at_or_below[:, j] = QUANTILE_GRID[np.searchsorted(column, column, side="right") - 1]
    return below.reshape(q.shape), at_or_below.reshape(q.shape)


def ks_sorted(quantiles: FloatArray, below: FloatArray, at_or_below: FloatArray, values: FloatArray) -> float:
    """KS distance of sorted, finite live ``values`` from a reference given by :func:`reference_steps`."""
    n = values.size
    if n == 0:
        return 0.0
    live_at_or_below = np.searchsorted(values, quantiles, side="right") / n
    live_below = np.searchsorted(values, quantiles, side="left") / n
    return float(max(np.abs(live_at_or_below - at_or_below).max(), np.abs(live_below - below).max()))


def ks_rows(
    quantiles: FloatArray, below: FloatArray, at_or_below: FloatArray, rows: FloatArray, counts: npt.NDArray[np.int64]
) -> FloatArray:
    """:func:`ks_sorted` of every row of :func:`sorted_rows`' output; the reference arrays are [k, 101]."""
    live_at_or_below = np.empty_like(quantiles)
    live_below = np.empty_like(quantiles)
    for i, count in enumerate(counts.tolist()):
        row = rows[i, :count]
        live_at_or_below[i] = np.searchsorted(row, quantiles[i], side="right")
        live_below[i] = np.searchsorted(row, quantiles[i], side="left")
    n = np.maximum(counts, 1)[:, np.newaxis]
    gaps = np.maximum(np.abs(live_at_or_below / n - at_or_below), np.abs(live_below / n - below))
    return np.where(counts > 0, gaps.max(axis=1), 0.0)


def ks(quantiles: Values, values: Values, missing_share: float = 0.0) -> float:
    """KS distance between the reference (its quantiles on QUANTILE_GRID) and live ``values``, at least
    :func:`missing_psi_rows` (``missing_share``: the reference's share of non-finite values)."""
    q = np.asarray(quantiles, dtype=np.float64)
    below, at_or_below = reference_steps(q)
    finite = _finite(values)
    missing = missing_psi_rows([missing_share], [np.asarray(values).size - finite.size], np.asarray(values).size)
    return max(ks_sorted(q, below, at_or_below, np.sort(finite)), float(missing[0]))


# --- Wasserstein -----------------------------------------------------------------------------


def wasserstein_rows(reference: FloatArray, scales: FloatArray, live: FloatArray) -> FloatArray:
    """Wasserstein-1 distance between reference and live quantile functions, row by row ([k, 101] each),
    in units of ``scales`` [k] (see :func:`scale`); a row without live values scores 0."""
    distance = np.trapezoid(np.abs(live - reference), QUANTILE_GRID, axis=1) / scales
    return np.where(np.isnan(distance), 0.0, distance)


def wasserstein(quantiles: Values, std: float, values: Values, missing_share: float = 0.0) -> float:
    """Wasserstein-1 distance between the reference's and the live quantile functions, in reference sigmas,
    at least :func:`missing_psi_rows` (``missing_share``: the reference's share of non-finite values)."""
    ref = np.asarray(quantiles, dtype=np.float64)
    rows, counts = sorted_rows(np.asarray(values, dtype=np.float64).reshape(-1, 1))
    live = quantiles_sorted(rows, counts)
    distance = float(wasserstein_rows(ref[np.newaxis, :], np.array([scale(std, ref)]), live)[0])
    missing = missing_psi_rows([missing_share], [rows.shape[1] - int(counts[0])], rows.shape[1])
    return max(distance, float(missing[0]))


def scale(std: float, quantiles: Values) -> float:
    """The unit of a Wasserstein score: the reference's sigma, else its range, else 1 (a constant feature)."""
    if std > 0:
        return std
    q = np.asarray(quantiles, dtype=np.float64)
    spread = float(q[-1] - q[0])
    return spread if spread > 0 else 1.0


def _finite(values: Values) -> FloatArray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]
