"""``infergate check --smoke``: one inference per loaded version, through its batcher and runner.

Inputs come from ``DIR/NAME/V/sample.npz`` (arrays by input name, rows first)
when there is one, otherwise they are generated: one row, 1 for every variable
dimension, uniform [0, 1) for floating-point inputs and zeros (empty strings)
for the rest — values any model should take. Floating-point outputs must be
free of NaN and Inf.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from infergate.models.runner import zero_inputs
from infergate.models.spec import ModelSpec, Tensors
from infergate.models.version import ModelVersion

__all__ = ["SAMPLE_FILE", "SMOKE_TIMEOUT_S", "SmokeError", "non_finite", "read_sample", "smoke_inputs", "smoke_test"]

SAMPLE_FILE = "sample.npz"
SMOKE_TIMEOUT_S = 120.0  # a hang guard: a model that takes longer for one row is broken for serving anyway


class SmokeError(Exception):
    """The sample could not be used, or the model's answer was not finite; the message says which."""


def smoke_inputs(spec: ModelSpec, seed: int = 0) -> Tensors:
    """One generated row per input (see the module docstring)."""
    inputs = zero_inputs(spec, 1)
    rng = np.random.default_rng(seed)
    for name, array in inputs.items():
        if array.dtype.kind == "f":
            inputs[name] = rng.random(array.shape).astype(array.dtype)
    return inputs


def read_sample(path: Path, spec: ModelSpec) -> Tensors:
    """The arrays of ``sample.npz``, checked against the model's inputs. Raises SmokeError."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise SmokeError(f"{path}: cannot read: {exc}") from None
    wanted = set(spec.input_by_name)
    if set(arrays) != wanted:
        raise SmokeError(f"{path}: holds {sorted(arrays)}, the model's inputs are {sorted(wanted)}")
    for t in spec.inputs:
        array = arrays[t.name]
        if t.datatype.name == "BYTES":
            if array.dtype.kind not in "US":
                raise SmokeError(f"{path}: {t.name} is {array.dtype}, the model takes BYTES (text)")
            arrays[t.name] = array.astype(object)
        elif array.dtype != t.datatype.numpy:
            raise SmokeError(f"{path}: {t.name} is {array.dtype}, the model takes {t.datatype.name}")
        fits = len(array.shape) == len(t.shape) and all(d in (-1, a) for d, a in zip(t.shape, array.shape, strict=True))
        if not fits:
            raise SmokeError(f"{path}: {t.name} has shape {list(array.shape)}, the model takes {list(t.shape)}")
    return arrays


def _rows_and_group(spec: ModelSpec, inputs: Tensors, where: str) -> tuple[int, Hashable]:
    """Rows and shape group as the server's codec derives them for a request."""
    if not spec.batches:
        return 1, None
    counts = {array.shape[0] for array in inputs.values()}
    if len(counts) != 1:
        raise SmokeError(f"{where}: inputs disagree on the number of rows ({sorted(counts)})")
    rows = counts.pop()
    if not 1 <= rows <= spec.max_batch_size:
        raise SmokeError(f"{where}: {rows} rows; the model takes 1 to {spec.max_batch_size}")
    return rows, spec.batch_group(inputs)


def non_finite(outputs: Tensors) -> list[str]:
    """``name: n NaN, m Inf of k values`` for each floating-point output that is not all finite."""
    problems = []
    for name, array in outputs.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            problems.append(f"{name}: {nan} NaN, {inf} Inf of {array.size} values")
    return problems


async def smoke_test(model: ModelVersion, version_dir: Path) -> str:
    """Run one request through ``model`` (started here, closed by the caller); a one-line summary.

    Raises SmokeError when the sample is unusable or an output is not finite;
    whatever the model raises (an execution error) passes through.
    """
    sample = version_dir / SAMPLE_FILE
    if sample.is_file():
        inputs, source = await asyncio.to_thread(read_sample, sample, model.spec), str(sample)
    else:
        inputs, source = smoke_inputs(model.spec), "generated inputs"
    rows, group = _rows_and_group(model.spec, inputs, source)
    deadline = asyncio.get_running_loop().time() + SMOKE_TIMEOUT_S
    outputs = await model.infer(inputs, rows, group, deadline=deadline)
    problems = non_finite(outputs)
    if problems:
        raise SmokeError(f"on {source}: " + "; ".join(problems))
    return f"{rows} row(s) of {source}: outputs {', '.join(sorted(outputs))} finite"
