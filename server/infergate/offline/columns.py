"""How the columns of a table (Parquet, CSV, JSON lines) become a model's input tensors.

For each model input ``NAME`` whose per-row shape is ``S`` (its shape without the
batch dimension; ``k`` elements a row), the first rule that applies wins:

1. **One column named NAME** holds the whole row: a scalar when ``k == 1``,
   otherwise a list of ``k`` values (flat in row-major order, or nested as ``S``).
2. **Columns NAME_0 … NAME_{k-1}**, one per element, row-major.
3. **A model with a single input**: every column except the id column, in file
   order, must number ``k`` (a plain wide table of features).

Inputs with variable non-batch dimensions cannot come from a table (use
``.npy``/``.npz``). A row whose value is missing, of the wrong width, or cannot
be read as the input's datatype is a *bad row*: it is left out of the chunk and
reported with its row number and what was wrong; the rest of the chunk goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.models.spec import ModelSpec

__all__ = ["ColumnError", "InputPlan", "arrow_to_tensors", "plan_inputs", "records_to_tensors", "row_shape"]

Array = npt.NDArray[Any]
BadRows = dict[int, str]  # index within the batch -> what was wrong


class ColumnError(ValueError):
    """The table cannot feed the model at all (a missing input, a variable shape); nothing to do per row."""


@dataclass(frozen=True)
class InputPlan:
    """Where one input's values come from in a table."""

    name: str
    dtype: np.dtype[Any]  # object for BYTES
    shape: tuple[int, ...]  # per row
    columns: tuple[str, ...]  # one column (whole rows) or one per element
    whole: bool  # one column holds the whole row

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def row_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """An input's or output's shape without the batch dimension."""
    tensor = spec.input_by_name.get(name) or spec.output_by_name[name]
    return tensor.shape[1:]


def plan_inputs(spec: ModelSpec, columns: Sequence[str], id_column: str | None) -> list[InputPlan]:
    """Apply the module's rules to ``columns`` (a table's column names, in order). Raises ColumnError."""
    present = set(columns)
    plans = []
    for tensor in spec.inputs:
        shape = tensor.shape[1:]
        if -1 in shape:
            raise ColumnError(
                f"input {tensor.name} has variable dimensions {list(tensor.shape)}: read it from .npy or .npz"
            )
        dtype = np.dtype(object) if tensor.datatype.name == "BYTES" else tensor.datatype.numpy
        size = math.prod(shape)
        elements = tuple(f"{tensor.name}_{i}" for i in range(size))
        if tensor.name in present:
            plans.append(InputPlan(tensor.name, dtype, shape, (tensor.name,), True))
        elif elements and present.issuperset(elements):
            plans.append(InputPlan(tensor.name, dtype, shape, elements, False))
        elif len(spec.inputs) == 1:
            rest = tuple(c for c in columns if c != id_column)
            if len(rest) != size:
                raise ColumnError(
                    f"no column {tensor.name} or {tensor.name}_0..{tensor.name}_{size - 1}, and the {len(rest)} "
                    f"other column(s) do not make the {size} value(s) a row of input {tensor.name} needs"
                )
            plans.append(InputPlan(tensor.name, dtype, shape, rest, size == 1 and len(rest) == 1))
        else:
            raise ColumnError(
                f"no column {tensor.name} (or {tensor.name}_0..{tensor.name}_{size - 1}) for input {tensor.name}; "
                f"the table has {sorted(present)}"
            )
    return plans


# --------------------------------------------------------------------------- Arrow (Parquet, CSV)


def _arrow_type(dtype: np.dtype[Any]) -> Any:
    import pyarrow as pa

    if dtype == np.dtype(object):
        return pa.string()
    if dtype == np.dtype(np.float16):  # Arrow cannot parse text as half floats: read float32, narrow after
        return pa.float32()
    return pa.from_numpy_dtype(dtype)


def _scalar_column(column: Any, plan: InputPlan, label: str) -> tuple[Array, BadRows]:
    """One value per row, as ``plan.dtype``; values that cannot be read are bad rows (the slow path)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    target = _arrow_type(plan.dtype)
    try:
        if column.null_count:
            raise ValueError("nulls")
        values = pc.cast(column, target, safe=True).to_numpy(zero_copy_only=False)
        return values.astype(plan.dtype, copy=False), {}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
        pass
    out = np.zeros(len(column), dtype=plan.dtype) if plan.dtype != object else np.full(len(column), "", dtype=object)
    bad: BadRows = {}
    for i, value in enumerate(column.to_pylist()):
        if value is None or value == "":
            bad[i] = f"{label}: no value"
            continue
        try:
            out[i] = pc.cast(pa.array([value]), target, safe=True).to_numpy(zero_copy_only=False)[0]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError, OverflowError):
            bad[i] = f"{label}: cannot read {value!r} as {_type_name(plan)}"
    return out, bad


def _type_name(plan: InputPlan) -> str:
    return "text" if plan.dtype == object else str(plan.dtype)


def _list_column(column: Any, plan: InputPlan) -> tuple[Array, BadRows]:
    """A list of ``k`` values per row (flat, or nested as the row's shape)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = len(column)
    out = np.zeros((rows, plan.size), dtype=plan.dtype)
    bad: BadRows = {}
    is_list = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    if (is_list or pa.types.is_fixed_size_list(column.type)) and not pa.types.is_nested(column.type.value_type):
        lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
        good = lengths == plan.size
        if good.all() and column.null_count == 0:
            try:
                flat = pc.cast(pc.list_flatten(column), _arrow_type(plan.dtype), safe=True)
                values = flat.to_numpy(zero_copy_only=False).astype(plan.dtype, copy=False)
                return values.reshape(rows, *plan.shape), {}
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
                pass
    for i, value in enumerate(column.to_pylist()):  # the slow path: find which rows are bad, and why
        try:
            out[i] = _one_row(value, plan)
        except ValueError as exc:
            bad[i] = str(exc)
    return out.reshape(rows, *plan.shape), bad


def _one_row(value: Any, plan: InputPlan) -> Array:
    """One row's value (a scalar or a possibly nested list) as ``k`` elements. Raises ValueError."""
    if value is None:
        raise ValueError(f"{plan.name}: no value")
    try:
        array = np.asarray(value, dtype=plan.dtype)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"{plan.name}: cannot read {_short(value)} as {_type_name(plan)}") from None
    if plan.dtype == object and not all(isinstance(v, str) for v in array.reshape(-1)):
        raise ValueError(f"{plan.name}: {_short(value)} is not text")
    if array.size != plan.size or (array.ndim > 1 and array.shape != plan.shape):
        got = f"{array.size} value(s) of shape {list(array.shape)}"
        raise ValueError(f"{plan.name}: {got}; expected {list(plan.shape)}")
    return array.reshape(-1)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def arrow_to_tensors(batch: Any, plans: Sequence[InputPlan]) -> tuple[dict[str, Array], BadRows]:
    """A RecordBatch as full-length input arrays and the bad rows (index -> reason); callers drop the bad rows."""
    tensors: dict[str, Array] = {}
    bad: BadRows = {}
    for plan in plans:
        if plan.whole:
            column = batch.column(plan.columns[0])
            if plan.size == 1 and not _is_list(column):
                values, problems = _scalar_column(column, plan, plan.columns[0])
                tensors[plan.name] = values.reshape(len(values), *plan.shape)
            else:
                tensors[plan.name], problems = _list_column(column, plan)
        else:
            parts = [_scalar_column(batch.column(c), plan, c) for c in plan.columns]
            problems = {}
            for _, part_bad in parts:
                for row, reason in part_bad.items():
                    problems.setdefault(row, reason)
            stacked = np.stack([values for values, _ in parts], axis=1) if parts else np.zeros((batch.num_rows, 0))
            tensors[plan.name] = stacked.reshape(batch.num_rows, *plan.shape)
        for row, reason in problems.items():
            bad.setdefault(row, reason)
    return tensors, bad


def _is_list(column: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or bool(
        pa.types.is_fixed_size_list(column.type)
    )


# --------------------------------------------------------------------------- JSON lines


def records_to_tensors(
    records: Sequence[Mapping[str, Any]], plans: Sequence[InputPlan], id_column: str | None
) -> tuple[dict[str, Array], BadRows]:
    """Parsed JSON objects as full-length input arrays and the bad rows (index -> reason)."""
    tensors = {p.name: np.zeros((len(records), p.size), dtype=p.dtype) for p in plans}
    bad: BadRows = {}
    for i, record in enumerate(records):
        try:
            for plan in plans:
                tensors[plan.name][i] = _one_row(_record_value(record, plan, id_column), plan)
        except ValueError as exc:
            bad[i] = str(exc)
    return {p.name: tensors[p.name].reshape(len(records), *p.shape) for p in plans}, bad


def _record_value(record: Mapping[str, Any], plan: InputPlan, id_column: str | None) -> Any:
    if plan.whole and len(plan.columns) == 1 and plan.columns[0] == plan.name:
        if plan.name not in record:
            raise ValueError(f"{plan.name}: missing")
        return record[plan.name]
    if plan.columns and plan.columns[0] == f"{plan.name}_0":
        missing = [c for c in plan.columns if c not in record]
        if missing:
            raise ValueError(f"{plan.name}: missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        return [record[c] for c in plan.columns]
    return [value for key, value in record.items() if key != id_column]  # rule 3: this record's own keys
