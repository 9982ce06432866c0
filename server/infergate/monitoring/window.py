"""The sliding window of live feature values, and its scores against the reference profile.

Not thread-safe on purpose: one :class:`DriftWindow` belongs to one
accumulator thread, which adds rows and scores; readers only ever see the
immutable :class:`FeatureScore` tuples it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.monitoring.drift import categorical_psi, ks, psi, wasserstein
from infergate.monitoring.features import category_keys, extract
from infergate.monitoring.profile import CategoricalFeature, NumericFeature, ReferenceProfile, TensorProfile

__all__ = ["DriftWindow", "FeatureScore", "TensorWindow"]


@dataclass(frozen=True, slots=True)
class FeatureScore:
    """One feature's score; ``io`` is "input" or "output"."""

    io: str
    tensor: str
    feature: str
    method: str
    score: float
    alert: bool


class TensorWindow:
    """The last ``capacity`` rows of one tensor's features, in a ring buffer."""

    def __init__(self, io: str, name: str, profile: TensorProfile, capacity: int):
        self.io, self.name, self.profile = io, name, profile
        self.capacity = capacity
        self.fill = 0
        self._position = 0
        self._buffer: npt.NDArray[Any] = np.empty((capacity, len(profile.features)), dtype=_dtype(profile))
        # Arrays made once from the profile's lists: scoring runs often.
        self._numeric = {
            j: (np.asarray(f.edges), np.asarray(f.counts), np.asarray(f.quantiles), f.std)
            for j, f in enumerate(profile.features)
            if isinstance(f, NumericFeature)
        }

    def add(self, array: npt.NDArray[Any], batches: bool) -> int:
        """Append one request's tensor; returns its rows. Raises ValueError when its shape does not fit."""
        rows = extract(array, self.profile.reduction, batches)
        if rows.shape[1] != self._buffer.shape[1]:
            raise ValueError(f"{rows.shape[1]} features, the profile has {self._buffer.shape[1]}")
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

    def scores(self, method: str, threshold: float) -> list[FeatureScore]:
        """Every feature's score over the rows in the window (their order does not matter)."""
        values = self._buffer[: self.fill]
        out = []
        for j, feature in enumerate(self.profile.features):
            used, score = self._score(j, feature, values[:, j], method)
            out.append(FeatureScore(self.io, self.name, feature.name, used, score, score > threshold))
        return out

    def _score(
        self, j: int, feature: NumericFeature | CategoricalFeature, column: npt.NDArray[Any], method: str
    ) -> tuple[str, float]:
        if isinstance(feature, CategoricalFeature):
            return "psi", categorical_psi(feature.categories, feature.other, category_keys(column))
        edges, counts, quantiles, std = self._numeric[j]
        if method == "ks":
            return method, ks(quantiles, column)
        if method == "wasserstein":
            return method, wasserstein(quantiles, std, column)
        return "psi", psi(edges, counts, column)


def _dtype(profile: TensorProfile) -> np.dtype[Any]:
    """What ``extract`` yields for this tensor: class indices, text, booleans or floats."""
    if profile.reduction == "argmax":
        return np.dtype(np.int64)
    if profile.datatype == "BYTES":
        return np.dtype(object)
    if profile.datatype == "BOOL" and profile.reduction in ("value", "columns"):
        return np.dtype(np.bool_)
    return np.dtype(np.float64)


class DriftWindow:
    """A window per profiled input and output of one model version."""

    def __init__(self, profile: ReferenceProfile, capacity: int, batches: bool):
        self.batches = batches
        self.tensors = [TensorWindow("input", n, t, capacity) for n, t in profile.inputs.items()]
        self.tensors += [TensorWindow("output", n, t, capacity) for n, t in profile.outputs.items()]

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
