"""What a model is fed at load, before it may serve: warm-up data that is valid for its inputs.

Two sources, Triton's and infergate's own:

* ``model_warmup`` (Triton's ``ModelWarmup``): named samples that give every
  input's datatype, dims and data (``zero_data``, ``random_data`` or
  ``input_data_file`` under ``<model>/warmup/``). When present, only these run.
* otherwise ``warmup`` (infergate's): one run per batch size of
  :func:`valid_inputs`.

"Zero" means the value zero written in the input's datatype: numbers are 0,
booleans false, and BYTES elements the text ``"0"``, so a model that parses its
strings (a Cast from string to a number) warms up instead of failing to load.
Random BYTES fall back to that zero, as in Triton.

This module builds the feeds; ``runner.py`` runs them and, on failure, reports
:func:`describe_feeds` so the message names each input and the value it got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.models.config import ModelConfig, WarmupSample
from infergate.models.datatypes import BYTES, DATATYPES, Datatype, decode_bytes_tensor, from_triton_type
from infergate.models.paths import named_file
from infergate.models.spec import ModelSpec, Tensors, TensorSpec

__all__ = ["WarmupRun", "describe_feeds", "read_raw_tensor", "valid_inputs", "warmup_runs"]

# The text of zero: a BYTES element any numeric parser accepts.
BYTES_ZERO = "0"
_SEED = 0  # random_data is reproducible from load to load


@dataclass(frozen=True)
class WarmupRun:
    """One warm-up request: a name for messages, the feeds, and how many times to run it per instance."""

    name: str
    feeds: Tensors
    count: int


def valid_inputs(spec: ModelSpec, rows: int) -> Tensors:
    """Zeros of every input's datatype, ``rows`` rows, and 1 for every other variable dimension."""
    feeds: Tensors = {}
    for t in spec.inputs:
        dims = list(t.shape)
        if spec.batches:
            dims[0] = rows
        feeds[t.name] = _zeros(t.datatype, [1 if d < 0 else d for d in dims])
    return feeds


def warmup_runs(spec: ModelSpec, config: ModelConfig, model_dir: Path) -> list[WarmupRun]:
    """The runs to make at load, in order. Raises ValueError when a sample does not fit the model."""
    if config.model_warmup:
        return [_sample_run(spec, sample, model_dir) for sample in config.model_warmup]
    if config.warmup.iterations == 0:
        return []
    sizes = config.warmup.batch_sizes if spec.batches else [1]
    runs = []
    for size in sizes:
        rows = min(size, spec.max_batch_size or 1)
        runs.append(WarmupRun(f"at batch {size}", valid_inputs(spec, rows), config.warmup.iterations))
    return runs


def _sample_run(spec: ModelSpec, sample: WarmupSample, model_dir: Path) -> WarmupRun:
    where = f"model_warmup {sample.name!r}"
    missing = [t.name for t in spec.inputs if t.name not in sample.inputs]
    unknown = sorted(set(sample.inputs) - {t.name for t in spec.inputs})
    if missing or unknown:
        raise ValueError(f"{where}: give every model input once (missing {missing}, unknown {unknown})")
    if not spec.batches and sample.batch_size != 1:
        raise ValueError(f"{where}: batch_size is {sample.batch_size} but the model does not batch")
    if spec.batches and sample.batch_size > spec.max_batch_size:
        raise ValueError(f"{where}: batch_size {sample.batch_size} exceeds max_batch_size {spec.max_batch_size}")
    feeds: Tensors = {}
    rng = np.random.default_rng(_SEED)
    for t in spec.inputs:
        item = sample.inputs[t.name]
        datatype = from_triton_type(item.data_type)
        _check_fits(t, datatype, item.dims, spec, f"{where} input {t.name!r}")
        if item.input_data_file is not None:
            path = named_file(model_dir / "warmup", item.input_data_file, "warm-up input_data_file")
            one = read_raw_tensor(path, datatype, item.dims)
        elif item.random_data is not None:
            one = _random(datatype, item.dims, rng)
        else:
            one = _zeros(datatype, item.dims)
        # Triton repeats the sample's data for every row of the batch.
        feeds[t.name] = np.repeat(one[np.newaxis], sample.batch_size, axis=0) if spec.batches else one
    return WarmupRun(repr(sample.name), feeds, max(sample.count, 1))


def read_raw_tensor(path: Path, datatype: Datatype, dims: list[int]) -> npt.NDArray[Any]:
    """A tensor stored raw and row-major (BYTES: 4-byte little-endian lengths), as Triton's data files are."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    count = math.prod(dims)
    if datatype.name == BYTES:
        try:
            return decode_bytes_tensor(data, count, str(path)).reshape(dims)
        except Exception as exc:  # InvalidArgument: a request error type, but here the file is at fault
            raise ValueError(str(exc)) from None
    if len(data) != count * datatype.itemsize:
        raise ValueError(f"{path}: {len(data)} bytes, expected {count * datatype.itemsize} for {datatype.name} {dims}")
    return np.frombuffer(data, dtype=datatype.numpy).reshape(dims)


def _check_fits(t: TensorSpec, datatype: Datatype, dims: list[int], spec: ModelSpec, where: str) -> None:
    if datatype.name != t.datatype.name:
        raise ValueError(f"{where}: data_type {datatype.triton}, the model takes {t.datatype.triton}")
    inner = t.shape[1:] if spec.batches else t.shape
    if len(inner) != len(dims) or any(e >= 0 and e != d for e, d in zip(inner, dims, strict=True)):
        raise ValueError(f"{where}: dims {dims}, the model takes {list(inner)} (-1: any)")


def _zeros(datatype: Datatype, dims: list[int]) -> npt.NDArray[Any]:
    if datatype.name == BYTES:
        return np.full(dims, BYTES_ZERO, dtype=object)
    return np.zeros(dims, dtype=datatype.numpy)


def _random(datatype: Datatype, dims: list[int], rng: np.random.Generator) -> npt.NDArray[Any]:
    kind = datatype.numpy.kind
    if datatype.name == BYTES:
        return _zeros(datatype, dims)
    if kind == "b":
        return rng.integers(0, 2, size=dims).astype(bool)
    if kind in "iu":
        return rng.integers(0, 100, size=dims).astype(datatype.numpy)  # small: safe for every integer width
    return rng.random(size=dims).astype(datatype.numpy)


def describe_feeds(feeds: Tensors) -> str:
    """``name DATATYPE [shape] = value`` for each input, short enough for an error message."""
    parts = []
    for name, array in feeds.items():
        values = array.reshape(-1)
        datatype = "BYTES" if array.dtype == object else _name_of(array.dtype)
        if values.size == 0:
            shown = "(empty)"
        elif bool(np.all(values == values[0])):
            shown = repr(values[0].item() if array.dtype != object else values[0])
            shown += f" in all {values.size} elements" if values.size > 1 else ""
        else:
            shown = "[" + ", ".join(repr(v.item() if array.dtype != object else v) for v in values[:3]) + ", ...]"
        parts.append(f"{name} {datatype} {list(array.shape)} = {shown}")
    return "; ".join(parts)


def _name_of(dtype: np.dtype[Any]) -> str:
    for d in DATATYPES.values():
        if d.numpy == dtype:
            return d.name
    return str(dtype)
