"""How one tensor becomes per-row features: the reductions shared by profiles and live windows.

A request's tensor has rows along its first axis (a model that does not batch
gets one row per request). Each row's *item* (the rest of the tensor) is
reduced to a few scalar features:

* ``value``: the item is a scalar ([batch]): one feature, ``value``;
* ``columns``: the item is a vector of fixed length F ([batch, F]): F features, one per column;
* ``channel_mean``: a numeric item of rank 2 or more with a fixed first axis C
  ([batch, C, H, W], NCHW): C features, each channel's mean over the remaining axes;
* ``row_mean``: a numeric item of variable length: one feature, ``mean``, the item's mean
  (NaN, a missing value that scores leave out, for an item with no elements);
* ``argmax``: a floating-point output [batch, C] with C >= 2 (classifier-shaped):
  one categorical feature, ``class``, the index of the largest score.

BYTES and BOOL features are categorical; integer features are categorical
when the reference sample holds at most :data:`MAX_INTEGER_CATEGORIES`
distinct values (decided once, by the profile). BYTES or BOOL tensors whose
item is not a scalar or a fixed vector are not monitored (the profile lists
them with the reason).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from infergate.models.spec import TensorSpec

__all__ = [
    "MAX_FEATURES",
    "MAX_INTEGER_CATEGORIES",
    "Reduction",
    "category_keys",
    "choose_reduction",
    "extract",
    "feature_count",
    "item_shape",
]

Reduction = Literal["value", "columns", "channel_mean", "row_mean", "argmax"]

# More features than this in one tensor cost more to score than they tell; refused with a clear error.
MAX_FEATURES = 4096
MAX_INTEGER_CATEGORIES = 20
_CATEGORICAL_TYPES = ("BYTES", "BOOL")


def item_shape(spec: TensorSpec, batches: bool) -> tuple[int, ...]:
    """The shape of one row of ``spec`` (-1: variable)."""
    return spec.shape[1:] if batches else spec.shape


def choose_reduction(spec: TensorSpec, batches: bool, output: bool) -> Reduction:
    """The reduction for a tensor; ValueError says why one cannot be monitored."""
    item = item_shape(spec, batches)
    categorical = spec.datatype.name in _CATEGORICAL_TYPES
    if len(item) == 0:
        return "value"
    fixed = -1 not in item
    if output and not categorical and spec.datatype.name.startswith("FP") and len(item) == 1 and item[0] >= 2:
        return "argmax"
    if len(item) == 1 and fixed:
        return "columns"
    if categorical:
        raise ValueError(
            f"{spec.datatype.name} rows of shape {list(item)} have no per-row categories (only [batch] or [batch, F])"
        )
    if len(item) >= 2 and item[0] >= 1:
        return "channel_mean"
    return "row_mean"


def feature_count(reduction: Reduction, item: tuple[int, ...]) -> int:
    """How many features the reduction yields for rows of shape ``item`` (fixed where it matters)."""
    return item[0] if reduction in ("columns", "channel_mean") else 1


def extract(array: npt.NDArray[Any], reduction: Reduction, batches: bool) -> npt.NDArray[Any]:
    """``array`` (a request's tensor) as a [rows, features] array.

    Numeric tensors come back as float64 (``argmax`` as int64 class indices);
    BYTES and BOOL keep their own dtype. Raises ValueError when the array's
    shape does not fit the reduction.
    """
    rows = array if batches else array[np.newaxis, ...]
    count = rows.shape[0]
    if reduction == "value":
        if rows.ndim != 1:
            raise ValueError(f"expected one value per row, got shape {list(array.shape)}")
        return _numeric(rows.reshape(count, 1))
    if reduction == "columns":
        if rows.ndim != 2:
            raise ValueError(f"expected rows of one vector, got shape {list(array.shape)}")
        return _numeric(rows)
    if reduction == "argmax":
        if rows.ndim != 2 or rows.shape[1] < 2:
            raise ValueError(f"expected [rows, classes] scores, got shape {list(array.shape)}")
        classes: npt.NDArray[Any] = np.argmax(rows, axis=1).astype(np.int64)
        return classes.reshape(count, 1)
    if reduction == "channel_mean":
        if rows.ndim < 3:
            raise ValueError(f"expected [rows, channels, ...], got shape {list(array.shape)}")
        channels: npt.NDArray[Any] = rows.reshape(count, rows.shape[1], -1)
        return np.asarray(channels.mean(axis=2, dtype=np.float64))
    items: npt.NDArray[Any] = rows.reshape(count, -1)
    if items.shape[1] == 0:
        return np.full((count, 1), np.nan)
    return np.asarray(items.mean(axis=1, dtype=np.float64)).reshape(count, 1)


def _numeric(rows: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Floats for numeric features; BYTES (object) and BOOL stay as they are (categorical)."""
    if rows.dtype == object or rows.dtype == np.bool_:
        return rows
    return rows.astype(np.float64, copy=False)


def category_keys(values: npt.NDArray[Any]) -> list[str]:
    """The category names of a column of categorical values: text as is, booleans and integers as text.

    Integer features arrive as floats; a NaN there is a missing value (the mean of a row with no
    elements) and is left out, as numeric scores leave out non-finite values.
    """
    if values.dtype == np.bool_:
        return ["true" if v else "false" for v in values.tolist()]
    if values.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.tolist()]
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    return [str(int(v)) for v in values.tolist()]
