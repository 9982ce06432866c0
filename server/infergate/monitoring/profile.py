"""Reference profiles: what a model's inputs and outputs looked like on a sample it was meant for.

``infergate profile`` builds one from a sample file (see profiling.py) and
writes it next to the version as ``reference_profile.json``; a version whose
config has ``monitoring.drift`` loads it and compares live traffic with it.

Per tensor: the reduction that turns a row into features (features.py), and
per feature either

* numeric: count, mean, std, min, max, the inner edges of ``bins`` quantile
  bins with the sample's count in each (PSI, which adds an empty bin below min
  and one above max: drift.outer_bins), and 101 quantiles (KS, Wasserstein); or
* categorical: the count of each category (at most :data:`MAX_CATEGORIES`;
  BYTES values seen fewer than :data:`MIN_TEXT_CATEGORY_COUNT` times are
  only counted in ``other``, so a profile does not keep rare free text such as names).

The file is JSON, validated like a config when read: an error names the file
and the field path.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from infergate.configfile import ConfigError, Strict, validate
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.monitoring.drift import QUANTILE_GRID, bin_counts
from infergate.monitoring.features import (
    MAX_FEATURES,
    MAX_INTEGER_CATEGORIES,
    Reduction,
    category_keys,
    choose_reduction,
    extract,
    feature_count,
    item_shape,
)

__all__ = [
    "FORMAT",
    "MAX_CATEGORIES",
    "CategoricalFeature",
    "NumericFeature",
    "ReferenceProfile",
    "TensorProfile",
    "build_profile",
    "check_profile",
    "read_profile",
    "write_profile",
]

FORMAT: Final = "infergate.reference_profile/1"
DEFAULT_BINS = 10
MAX_CATEGORIES = 50
MIN_TEXT_CATEGORY_COUNT = 5


class NumericFeature(Strict):
    name: str
    kind: Literal["numeric"] = "numeric"
    count: Annotated[int, Field(ge=1)]  # finite values in the sample
    mean: Annotated[float, Field(allow_inf_nan=False)]
    std: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    min: Annotated[float, Field(allow_inf_nan=False)]
    max: Annotated[float, Field(allow_inf_nan=False)]
    edges: list[Annotated[float, Field(allow_inf_nan=False)]]  # inner bin edges, increasing
    counts: list[Annotated[int, Field(ge=0)]]  # the sample's count in each of len(edges) + 1 bins
    quantiles: list[Annotated[float, Field(allow_inf_nan=False)]]  # at 0, 1, ..., 100 percent

    @model_validator(mode="after")
    def _coherent(self) -> NumericFeature:
        if len(self.counts) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} counts, not {len(self.counts)}")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must increase")
        if len(self.quantiles) != len(QUANTILE_GRID):
            raise ValueError(f"quantiles must hold {len(QUANTILE_GRID)} values (0 to 100 percent)")
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise ValueError("quantiles must not decrease")
        return self


class CategoricalFeature(Strict):
    name: str
    kind: Literal["categorical"] = "categorical"
    count: Annotated[int, Field(ge=1)]
    categories: dict[str, Annotated[int, Field(ge=0)]]
    other: Annotated[int, Field(ge=0)] = 0  # rows in categories not listed


Feature = Annotated[NumericFeature | CategoricalFeature, Field(discriminator="kind")]


class TensorProfile(Strict):
    datatype: str
    reduction: Reduction
    features: list[Feature] = Field(min_length=1)


class ReferenceProfile(Strict):
    format: Literal["infergate.reference_profile/1"] = FORMAT
    model: str
    version: int
    created: str  # ISO 8601, UTC
    source: str  # the sample file's name
    rows: Annotated[int, Field(ge=1)]
    inputs: dict[str, TensorProfile]
    outputs: dict[str, TensorProfile] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)  # "input NAME" / "output NAME": why it is not monitored


# --- building ---------------------------------------------------------------------------------


def build_profile(
    spec: ModelSpec,
    inputs: dict[str, npt.NDArray[Any]],
    outputs: dict[str, npt.NDArray[Any]],
    *,
    source: str,
    bins: int = DEFAULT_BINS,
    feature_names: dict[str, list[str]] | None = None,
) -> ReferenceProfile:
    """Profile a sample: ``inputs`` and ``outputs`` hold every row along axis 0 (also for a model that
    does not batch). ``feature_names`` may name the columns of ``columns`` inputs (from a table's header).

    Raises ValueError naming the tensor and feature when the sample cannot be profiled.
    """
    names = feature_names or {}
    skipped: dict[str, str] = {}
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) != 1:
        raise ValueError(f"the inputs hold different numbers of rows: {sorted(rows)}")
    profiled_inputs = _profile_tensors("input", spec.inputs, inputs, spec.batches, bins, names, skipped)
    profiled_outputs = _profile_tensors("output", spec.outputs, outputs, spec.batches, bins, {}, skipped)
    if not profiled_inputs:
        raise ValueError(f"no input of model {spec.name} can be monitored: {'; '.join(skipped.values())}")
    return ReferenceProfile(
        model=spec.name,
        version=spec.version,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source,
        rows=rows.pop(),
        inputs=profiled_inputs,
        outputs=profiled_outputs,
        skipped=skipped,
    )


def _profile_tensors(
    io: str,
    specs: tuple[TensorSpec, ...],
    data: dict[str, npt.NDArray[Any]],
    batches: bool,
    bins: int,
    names: dict[str, list[str]],
    skipped: dict[str, str],
) -> dict[str, TensorProfile]:
    out: dict[str, TensorProfile] = {}
    for tensor in specs:
        where = f"{io} {tensor.name}"
        try:
            reduction = choose_reduction(tensor, batches, output=io == "output")
        except ValueError as exc:
            skipped[where] = str(exc)
            continue
        try:
            features = extract(data[tensor.name], reduction, batches=True)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if features.shape[1] > MAX_FEATURES:
            raise ValueError(f"{where}: {features.shape[1]} features; at most {MAX_FEATURES} are monitored")
        labels = _labels(reduction, features.shape[1], names.get(tensor.name))
        classes = item_shape(tensor, batches)[0] if reduction == "argmax" else 0
        profiled = [
            _profile_feature(label, features[:, j], reduction, tensor, bins, classes, where)
            for j, label in enumerate(labels)
        ]
        out[tensor.name] = TensorProfile(datatype=tensor.datatype.name, reduction=reduction, features=profiled)
    return out


def _labels(reduction: Reduction, count: int, given: list[str] | None) -> list[str]:
    if reduction == "value":
        return ["value"]
    if reduction == "row_mean":
        return ["mean"]
    if reduction == "argmax":
        return ["class"]
    if given is not None and len(given) == count:
        return given
    return [str(j) for j in range(count)]


def _profile_feature(
    name: str,
    column: npt.NDArray[Any],
    reduction: Reduction,
    tensor: TensorSpec,
    bins: int,
    classes: int,
    where: str,
) -> NumericFeature | CategoricalFeature:
    if reduction == "argmax":  # every class is listed, also one the sample never predicted
        return _categorical(name, category_keys(column), [str(c) for c in range(classes)], 0)
    if column.dtype == object or column.dtype == np.bool_:
        floor = MIN_TEXT_CATEGORY_COUNT if column.dtype == object else 0
        return _categorical(name, category_keys(column), [], floor)
    if tensor.datatype.numpy.kind in "iu":
        finite = column[np.isfinite(column)]
        if np.unique(finite).size <= MAX_INTEGER_CATEGORIES:
            return _categorical(name, category_keys(finite), [], 0)
    return _numeric(name, column, bins, where)


def _categorical(name: str, keys: list[str], always: list[str], floor: int) -> CategoricalFeature:
    """The most frequent categories (and every one in ``always``); the rest, and any seen < floor times, in other."""
    counts = Counter(keys)
    kept = {key: counts.get(key, 0) for key in always}
    for key, count in counts.most_common():
        if len(kept) >= MAX_CATEGORIES or count < floor:
            break
        kept.setdefault(key, count)
    other = len(keys) - sum(kept.values())
    return CategoricalFeature(name=name, count=max(len(keys), 1), categories=kept, other=other)


def _numeric(name: str, column: npt.NDArray[Any], bins: int, where: str) -> NumericFeature:
    values = np.asarray(column, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(f"{where}: feature {name!r} has no finite value in the sample")
    cuts = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.unique(np.quantile(values, cuts))
    return NumericFeature(
        name=name,
        count=int(values.size),
        mean=float(values.mean()),
        std=float(values.std()),
        min=float(values.min()),
        max=float(values.max()),
        edges=edges.tolist(),
        counts=bin_counts(edges, values).tolist(),
        quantiles=np.quantile(values, QUANTILE_GRID).tolist(),
    )


# --- files -----------------------------------------------------------------------------------


def write_profile(profile: ReferenceProfile, path: Path) -> None:
    """Write ``profile`` as JSON (a temporary file renamed into place: a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(profile.model_dump_json(indent=1) + "\n", encoding="utf-8")
    temporary.replace(path)


def read_profile(path: Path) -> ReferenceProfile:
    """Read and validate a profile; raises ConfigError naming the file (and the field)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    return validate(ReferenceProfile, data, path)


def check_profile(profile: ReferenceProfile, spec: ModelSpec, path: Path) -> None:
    """Raise ConfigError (naming the file and field) when ``profile`` does not describe ``spec``'s tensors."""
    sides = (("inputs", profile.inputs, spec.input_by_name), ("outputs", profile.outputs, spec.output_by_name))
    for io, tensors, specs in sides:
        for name, tensor in tensors.items():
            where = f"{path}: {io}.{name}"
            found = specs.get(name)
            if found is None:
                raise ConfigError(f"{where}: model {spec.name} has no such {io[:-1]} (it has {', '.join(specs)})")
            _check_tensor(tensor, found, spec.batches, io == "outputs", where)


def _check_tensor(tensor: TensorProfile, found: TensorSpec, batches: bool, output: bool, where: str) -> None:
    if found.datatype.name != tensor.datatype:
        raise ConfigError(f"{where}: profiled as {tensor.datatype}, but the model's is {found.datatype.name}")
    try:
        expected = choose_reduction(found, batches, output)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if expected != tensor.reduction:
        raise ConfigError(
            f"{where}: reduction {tensor.reduction!r} does not fit shape {list(found.shape)} (expected {expected!r})"
        )
    item = item_shape(found, batches)
    wanted = feature_count(tensor.reduction, item)
    if wanted > 0 and len(tensor.features) != wanted:
        raise ConfigError(f"{where}: {len(tensor.features)} features, but shape {list(found.shape)} has {wanted}")
