"""Sample files for ``infergate profile``: .npy, .npz, .parquet and .csv, checked against the model's inputs.

* ``.npy``: one array, for a model with a single input;
* ``.npz``: one array per input, keyed by input name;
* ``.parquet`` and ``.csv`` (with a header row): one column per feature of
  1-D or 2-D inputs. With a single input every column is one of its features,
  in order. With several, a column is named ``INPUT`` (an input of one
  feature) or ``INPUT.FEATURE``; the part after the dot names the feature.

Rows run along the first axis (also for a model that does not batch: each row
is then one request of the model's full shape). Every refusal is a
:class:`SampleError` naming the file and the input, key or column.
Parquet needs pyarrow (``pip install 'infergate[profile]'``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from infergate.models.spec import ModelSpec, TensorSpec

__all__ = ["SUFFIXES", "Sample", "SampleError", "read_sample"]

SUFFIXES = (".npy", ".npz", ".parquet", ".csv")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class SampleError(ValueError):
    """A sample file that does not fit the model; the message names the file and the input or column."""


@dataclass
class Sample:
    """The sample's inputs, each [rows, *item] in the model's dtype, and column names where a table gave them."""

    inputs: dict[str, npt.NDArray[Any]]
    feature_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def read_sample(path: Path, spec: ModelSpec, max_rows: int | None = None, progress: bool | None = None) -> Sample:
    """Read ``path`` as inputs of ``spec`` (at most ``max_rows`` rows). ``progress`` None: a bar on a terminal."""
    if not path.is_file():
        raise SampleError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        sample = _npy(path, spec)
    elif suffix == ".npz":
        sample = _npz(path, spec)
    elif suffix in (".parquet", ".csv"):
        columns = _parquet(path, max_rows, progress) if suffix == ".parquet" else _csv(path, max_rows, progress)
        sample = _from_table(path, spec, columns)
    else:
        raise SampleError(f"{path}: unknown sample format {suffix!r} (use {', '.join(SUFFIXES)})")
    if max_rows is not None:
        sample.inputs = {name: array[:max_rows] for name, array in sample.inputs.items()}
    rows = {name: a.shape[0] for name, a in sample.inputs.items()}
    if len(set(rows.values())) != 1:
        raise SampleError(f"{path}: the inputs hold different numbers of rows: {rows}")
    if sample.rows == 0:
        raise SampleError(f"{path}: the sample holds no rows")
    return sample


# --- arrays ---------------------------------------------------------------------------------


def _npy(path: Path, spec: ModelSpec) -> Sample:
    if len(spec.inputs) != 1:
        names = ", ".join(spec.input_by_name)
        raise SampleError(f"{path}: a .npy file holds one array, but model {spec.name} has inputs {names}; use .npz")
    tensor = spec.inputs[0]
    array = _load(path, lambda: np.load(path, mmap_mode="r", allow_pickle=False))
    return Sample({tensor.name: _conform(path, f"input {tensor.name}", np.asarray(array), tensor, spec.batches)})


def _npz(path: Path, spec: ModelSpec) -> Sample:
    archive = _load(path, lambda: np.load(path, allow_pickle=False))
    with archive:
        keys = set(archive.files)
        unknown = sorted(keys - set(spec.input_by_name))
        if unknown:
            inputs = ", ".join(spec.input_by_name)
            raise SampleError(f"{path}: keys {unknown} are not inputs of model {spec.name} ({inputs})")
        missing = [t.name for t in spec.inputs if t.name not in keys]
        if missing:
            raise SampleError(f"{path}: no array for input(s) {missing} of model {spec.name}")
        arrays: dict[str, npt.NDArray[Any]] = {}
        for tensor in spec.inputs:
            array = _load(path, lambda name=tensor.name: archive[name])
            arrays[tensor.name] = _conform(path, f"key {tensor.name}", array, tensor, spec.batches)
        return Sample(arrays)


def _load(path: Path, read: Any) -> Any:
    try:
        return read()
    except ValueError as exc:  # pickled object arrays, among others: never unpickled
        raise SampleError(f"{path}: cannot read: {exc}") from None
    except OSError as exc:
        raise SampleError(f"{path}: cannot read: {exc}") from None


def _conform(path: Path, what: str, array: npt.NDArray[Any], tensor: TensorSpec, batches: bool) -> npt.NDArray[Any]:
    """``array`` as [rows, *item] in the input's dtype; refuses shapes and types that do not fit."""
    item = tensor.shape[1:] if batches else tensor.shape
    if array.ndim != len(item) + 1:
        raise SampleError(
            f"{path}: {what} has shape {list(array.shape)}; input {tensor.name} needs [rows, "
            f"{', '.join(str(d) for d in item)}] (rank {len(item) + 1})".replace(", ]", "]")
        )
    for axis, (want, got) in enumerate(zip(item, array.shape[1:], strict=True), start=1):
        if want >= 0 and want != got:
            raise SampleError(f"{path}: {what} has {got} in dimension {axis}; input {tensor.name} needs {want}")
    return _cast(path, what, array, tensor)


def _cast(path: Path, what: str, array: npt.NDArray[Any], tensor: TensorSpec) -> npt.NDArray[Any]:
    datatype = tensor.datatype
    if datatype.name == "BYTES":
        if array.dtype.kind not in "USO":
            raise SampleError(f"{path}: {what} holds {array.dtype}; input {tensor.name} takes text (BYTES)")
        return np.asarray(array.astype(str), dtype=object)
    if array.dtype.kind in "USO":
        raise SampleError(f"{path}: {what} holds text; input {tensor.name} takes {datatype.name}")
    if not np.can_cast(array.dtype, datatype.numpy, casting="same_kind"):
        raise SampleError(f"{path}: {what} holds {array.dtype}, which does not convert to {datatype.name} safely")
    return np.ascontiguousarray(array, dtype=datatype.numpy)


# --- tables ---------------------------------------------------------------------------------


def _parquet(path: Path, max_rows: int | None, progress: bool | None) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # an optional dependency: the server itself never needs it
        raise SampleError(f"{path}: reading Parquet needs pyarrow: pip install 'infergate[profile]'") from None
    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid and OSError
        raise SampleError(f"{path}: not a readable Parquet file: {exc}") from None
    total = reader.metadata.num_rows if max_rows is None else min(max_rows, reader.metadata.num_rows)
    columns: dict[str, list[Any]] = {name: [] for name in reader.schema_arrow.names}
    with tqdm(total=total, unit="rows", desc=f"reading {path.name}", disable=_disabled(progress)) as bar:
        read = 0
        for batch in reader.iter_batches(batch_size=65_536):
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                columns[name].extend(column.to_pylist())
            read += batch.num_rows
            bar.update(batch.num_rows)
            if max_rows is not None and read >= max_rows:
                break
    return columns


def _csv(path: Path, max_rows: int | None, progress: bool | None) -> dict[str, list[Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise SampleError(f"{path}: no header row (the first row names the columns)")
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise SampleError(f"{path}: columns {duplicated} appear more than once")
        columns: dict[str, list[Any]] = {name: [] for name in header}
        bar = tqdm(_limited(reader, max_rows), unit="rows", desc=f"reading {path.name}", disable=_disabled(progress))
        for line, row in enumerate(bar, start=2):
            if len(row) != len(header):
                raise SampleError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
            for name, value in zip(header, row, strict=True):
                columns[name].append(value)
    return columns


def _limited(rows: Iterable[list[str]], limit: int | None) -> Iterator[list[str]]:
    for count, row in enumerate(rows):
        if limit is not None and count >= limit:
            return
        yield row


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None hides the bar when not on a terminal


def _from_table(path: Path, spec: ModelSpec, columns: dict[str, list[Any]]) -> Sample:
    groups = _assign(path, spec, list(columns))
    inputs: dict[str, npt.NDArray[Any]] = {}
    names: dict[str, list[str]] = {}
    for tensor in spec.inputs:
        item = tensor.shape[1:] if spec.batches else tensor.shape
        assigned = groups.get(tensor.name, [])
        where = f"{path}: input {tensor.name}"
        if len(item) > 1:
            raise SampleError(f"{where} has shape {list(tensor.shape)}; a table holds 1-D and 2-D inputs only (.npz)")
        if not assigned:
            raise SampleError(f"{where}: no column for it (name columns {tensor.name} or {tensor.name}.FEATURE)")
        width = item[0] if item else 1
        if width >= 0 and len(assigned) != width:
            found = [column for column, _ in assigned]
            raise SampleError(f"{where} has {width} features, but the file has {len(found)} columns for it: {found}")
        stacked = np.stack([_column(path, column, columns[column], tensor) for column, _ in assigned], axis=1)
        inputs[tensor.name] = stacked if item else stacked[:, 0]
        names[tensor.name] = [feature for _, feature in assigned]
    return Sample(inputs, names)


def _assign(path: Path, spec: ModelSpec, columns: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Each input's (column, feature name) pairs, in file order."""
    if len(spec.inputs) == 1:
        return {spec.inputs[0].name: [(c, c) for c in columns]}
    groups: dict[str, list[tuple[str, str]]] = {}
    by_length = sorted(spec.input_by_name, key=len, reverse=True)  # "input.1" before "input"
    for column in columns:
        owner = next((n for n in by_length if column == n or column.startswith(n + ".")), None)
        if owner is None:
            raise SampleError(
                f"{path}: column {column!r} matches no input of model {spec.name} "
                f"(inputs: {', '.join(spec.input_by_name)}; name columns INPUT or INPUT.FEATURE)"
            )
        groups.setdefault(owner, []).append((column, column[len(owner) + 1 :] or column))
    return groups


def _column(path: Path, name: str, values: list[Any], tensor: TensorSpec) -> npt.NDArray[Any]:
    """One column as the input's dtype; the first value that does not fit is named with its row."""
    datatype = tensor.datatype
    if datatype.name == "BYTES":
        return np.array(["" if v is None else str(v) for v in values], dtype=object)
    convert = _bool if datatype.name == "BOOL" else (float if datatype.numpy.kind == "f" else _int)
    out = np.empty(len(values), dtype=datatype.numpy)
    for row, value in enumerate(values):
        try:
            out[row] = _missing(datatype.numpy.kind) if value in (None, "") else convert(value)
        except (TypeError, ValueError, OverflowError):
            raise SampleError(
                f"{path}: column {name!r}, row {row + 1}: {value!r} is not a {datatype.name} (input {tensor.name})"
            ) from None
    return out


def _missing(kind: str) -> float:
    if kind != "f":
        raise ValueError("missing value")  # integers and booleans have no NaN
    return float("nan")


def _int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not a whole number")  # never truncate silently
    return int(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean")
