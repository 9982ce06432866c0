"""The sliding window of live feature values, and its scores against the reference profile.

Not thread-safe on purpose: one :class:`DriftWindow` belongs to one
accumulator thread, which adds rows and scores; readers only ever see the
immutable :class:`FeatureScore` tuples it returns.

Scoring works on all numeric features of a tensor at once (PSI with one
comparison of the window against every edge; KS and Wasserstein with one
sort of the window), so a window of hundreds of features costs milliseconds.

Text (BYTES) is kept as the position of its reference category (or "other"),
never as the text: scores need nothing more, and a window of 2000 rows must
not keep 2000 requests' strings alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.monitoring.drift import (
    as_rows,
    bin_counts_rows,
    categorical_psi,
    categorical_psi_codes,
    category_codes,
    ks_rows,
    missing_psi_rows,
    outer_bins,
    psi_rows,
    quantiles_sorted,
    reference_steps,
    scale,
    sorted_rows,
    wasserstein_rows,
)
from infergate.monitoring.features import category_keys, extract
from infergate.monitoring.profile import CategoricalFeature, NumericFeature, ReferenceProfile, TensorProfile

__all__ = ["DriftWindow", "FeatureScore", "TensorWindow"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class FeatureScore:
    """One feature's score; ``io`` is "input" or "output"."""

    io: str
    tensor: str
    feature: str
    method: str
    score: float
    alert: bool


class _NumericReference:
    """The numeric features of one tensor as arrays, made once from the profile: scoring runs often."""

    def __init__(self, features: list[tuple[int, NumericFeature]], rows: int):
        self.columns = [j for j, _ in features]
        bins = [outer_bins(f.edges, f.counts, f.min, f.max) for _, f in features]
        width = max(len(counts) for _, counts in bins)
        # Padded with empty bins, which cost nothing; the last column counts the sample's non-finite values.
        self.counts = np.zeros((len(features), width + 1))
        self.counts[:, -1] = [max(rows - f.count, 0) for _, f in features]
        self.missing_share = self.counts[:, -1] / rows
        self.edges = np.full((len(features), width - 1), np.inf)  # padded with +inf: nothing lands above
        for row, (edges, counts) in enumerate(bins):
            self.counts[row, : len(counts)] = counts
            self.edges[row, : len(edges)] = edges
        self.quantiles = np.array([f.quantiles for _, f in features], dtype=np.float64)  # [k, 101]
        below, at_or_below = reference_steps(self.quantiles.T)
        self.below, self.at_or_below = below.T, at_or_below.T
        self.scales = np.array([scale(f.std, f.quantiles) for _, f in features])

    def scores(self, block: FloatArray, method: str) -> FloatArray:
        """One score per feature for ``block`` [rows, k] (the window's values of these features)."""
        total = block.shape[0]
        if method == "psi":
            live = bin_counts_rows(as_rows(block), self.edges)
            return psi_rows(self.counts, np.column_stack([live, total - live.sum(axis=1)]))
        rows, counts = sorted_rows(block)
        if method == "ks":
            found = ks_rows(self.quantiles, self.below, self.at_or_below, rows, counts)
        else:
            found = wasserstein_rows(self.quantiles, self.scales, quantiles_sorted(rows, counts))
        # Without this, a window of only NaN would score 0 on KS and Wasserstein: they see no value at all.
        return np.maximum(found, missing_psi_rows(self.missing_share, total - counts, total))


class TensorWindow:
    """The last ``capacity`` rows of one tensor's features, in a ring buffer."""

    def __init__(self, io: str, name: str, profile: TensorProfile, capacity: int, reference_rows: int):
        self.io, self.name, self.profile = io, name, profile
        self.capacity = capacity
        self.fill = 0
        self._position = 0
        self._buffer: npt.NDArray[Any] = np.empty((capacity, len(profile.features)), dtype=_dtype(profile))
        numeric = [(j, f) for j, f in enumerate(profile.features) if isinstance(f, NumericFeature)]
        self._numeric = _NumericReference(numeric, reference_rows) if numeric else None
        # A text tensor's features are all categorical: the window keeps their codes (see _codes).
        text = profile.datatype == "BYTES" and profile.reduction != "argmax"
        self._text = [f for f in profile.features if isinstance(f, CategoricalFeature)] if text else None

    def add(self, array: npt.NDArray[Any], batches: bool) -> int:
        """Append one request's tensor; returns its rows. Raises ValueError when its shape does not fit."""
        rows = extract(array, self.profile.reduction, batches)
        if rows.shape[1] != self._buffer.shape[1]:
            raise ValueError(f"{rows.shape[1]} features, the profile has {self._buffer.shape[1]}")
        if self._text is not None:
            rows = self._codes(self._text, rows)
        count = int(rows.shape[0])
        if count >= self.capacity:
            self._buffer[:] = rows[-self.capacity :]
            self._position, self.fill = 0, self.capacity
            return count
        end = self._position + count
        if end <= self.capacity:
            self._buffer[self._position : end] = rows
        else:
            split = self.capacity - self._position
            self._buffer[self._position :] = rows[:split]
            self._buffer[: count - split] = rows[split:]
        self._position = end % self.capacity
        self.fill = min(self.capacity, self.fill + count)
        return count

    @staticmethod
    def _codes(features: list[CategoricalFeature], rows: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Text rows as the codes of their categories, column by column: the text itself is not kept."""
        codes = np.empty(rows.shape, dtype=np.int64)
        for j, feature in enumerate(features):
            codes[:, j] = category_codes(feature.categories, category_keys(rows[:, j]))
        return codes

    def scores(self, method: str, threshold: float) -> list[FeatureScore]:
        """Every feature's score over the rows in the window (their order does not matter), in profile order."""
        values = self._buffer[: self.fill]
        found: dict[int, tuple[str, float]] = {}
        if self._numeric is not None:
            block = np.asarray(values[:, self._numeric.columns], dtype=np.float64)
            used = "psi" if method not in ("ks", "wasserstein") else method
            for j, score in zip(self._numeric.columns, self._numeric.scores(block, used), strict=True):
                found[j] = (used, float(score))
        for j, feature in enumerate(self.profile.features):
            if isinstance(feature, CategoricalFeature) and self._text is not None:
                found[j] = ("psi", categorical_psi_codes(feature.categories, feature.other, values[:, j]))
            elif isinstance(feature, CategoricalFeature):
                found[j] = ("psi", categorical_psi(feature.categories, feature.other, category_keys(values[:, j])))
        return [
            FeatureScore(self.io, self.name, f.name, found[j][0], found[j][1], found[j][1] > threshold)
            for j, f in enumerate(self.profile.features)
        ]


def _dtype(profile: TensorProfile) -> np.dtype[Any]:
    """What the window keeps of ``extract``'s output: class indices, category codes of text, booleans or floats."""
    if profile.reduction == "argmax" or profile.datatype == "BYTES":
        return np.dtype(np.int64)
    if profile.datatype == "BOOL" and profile.reduction in ("value", "columns"):
        return np.dtype(np.bool_)
    return np.dtype(np.float64)


class DriftWindow:
    """A window per profiled input and output of one model version."""

    def __init__(self, profile: ReferenceProfile, capacity: int, batches: bool):
        self.batches = batches
        rows = profile.rows
        self.tensors = [TensorWindow("input", n, t, capacity, rows) for n, t in profile.inputs.items()]
        self.tensors += [TensorWindow("output", n, t, capacity, rows) for n, t in profile.outputs.items()]

    @property
    def fill(self) -> int:
        """Rows in the window (the emptiest tensor's, should a request have missed one)."""
        return min(t.fill for t in self.tensors)

    def add(self, inputs: dict[str, npt.NDArray[Any]], outputs: dict[str, npt.NDArray[Any]]) -> int:
        """Append one request; returns its rows. Raises ValueError (naming the tensor) when one does not fit."""
        rows = 0
        for window in self.tensors:
            array = (inputs if window.io == "input" else outputs).get(window.name)
            if array is None:
                raise ValueError(f"{window.io} {window.name} is missing")
            try:
                rows = window.add(array, self.batches)
            except ValueError as exc:
                raise ValueError(f"{window.io} {window.name}: {exc}") from None
        return rows

    def scores(self, method: str, threshold: float) -> tuple[FeatureScore, ...]:
        return tuple(s for t in self.tensors for s in t.scores(method, threshold))
