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

One rule reads a value as a datatype, whatever the file (:func:`_read_value`):

==========  ====================================================================
numbers     taken when the datatype holds them: a whole number in range for an
            integer (2.0 is 2; 2.5, NaN, 1e30 for int64 are not), 0 or 1 for
            BOOL, any number for a float (the nearest value; beyond its range,
            an infinity); never for BYTES
true/false  BOOL only
text        read as CSV reads its fields, with Arrow's parser: ``12`` (not
            ``2.0``) for an integer, ``1.5``/``nan``/``inf`` for a float,
            ``true``/``false``/``1``/``0`` in any case for BOOL; any text for
            BYTES; empty text is no value (except for BYTES)
==========  ====================================================================

A chunk's column is converted at once (Arrow's cast; numpy's for JSON values)
when every value fits; a block holding one that does not is halved until small
blocks are read value by value, so a bad row costs its neighbours little.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
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


# --------------------------------------------------------------------------- one value


def _read_value(value: Any, plan: InputPlan) -> Any:
    """``value`` (a Python value from JSON or Arrow) as ``plan.dtype`` by the module's rule.

    Raises ValueError saying why (the caller names the column)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):  # an Arrow binary column: text when it is UTF-8
        value = value.decode("utf-8", "surrogateescape")
    if value is None or (value == "" and plan.dtype != object):
        raise ValueError("no value")
    result = _fit(value, plan)
    if result is None:
        raise ValueError(f"cannot read {_short(value)} as {_type_name(plan)}")
    return result


def _fit(value: Any, plan: InputPlan) -> Any:
    """``value`` as ``plan.dtype``, or None when the rule refuses it."""
    kind = plan.dtype.kind
    if isinstance(value, str):
        return value if kind == "O" else _parse_text(value, plan)
    if kind == "O":
        return None
    if isinstance(value, bool):
        return value if kind == "b" else None
    if not isinstance(value, int | float | Decimal):
        return None
    if kind == "f":
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf if value > 0 else -math.inf
        with np.errstate(over="ignore"):  # beyond the datatype's range: an infinity, as for text
            return plan.dtype.type(number)
    try:
        whole = int(value)
    except (ValueError, OverflowError):  # NaN, infinities
        return None
    if whole != value:
        return None
    if kind == "b":
        return bool(whole) if whole in (0, 1) else None
    info = np.iinfo(plan.dtype)
    return whole if info.min <= whole <= info.max else None


def _parse_text(text: str, plan: InputPlan) -> Any:
    """Text as CSV reads it: the same Arrow conversion a CSV column goes through."""
    try:
        import pyarrow as pa
    except ImportError:
        raise ValueError(
            f"reading {_short(text)} as {_type_name(plan)} needs pyarrow: pip install 'infergate[offline]'"
        ) from None
    values = _arrow_values(pa.array([text], pa.string()), plan)
    return None if values is None else values[0]


def _type_name(plan: InputPlan) -> str:
    return "text" if plan.dtype == object else str(plan.dtype)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_row(value: Any, plan: InputPlan, labels: Sequence[str] | None = None) -> Array:
    """One row's value (a scalar or a possibly nested list) as ``k`` elements; ``labels`` name the elements
    (default: the column, indexed). Raises ValueError."""
    column = plan.columns[0] if plan.whole else plan.name
    if value is None:
        raise ValueError(f"{column}: no value")
    grid = np.array(value, dtype=object)  # a list's shape; ragged lists stay lists, and do not fit
    if grid.size != plan.size or (grid.ndim > 1 and grid.shape != plan.shape):
        got = f"{grid.size} value(s) of shape {list(grid.shape)}"
        raise ValueError(f"{column}: {got}; expected {list(plan.shape)}")
    out = _blank(plan.size, plan)
    for j, item in enumerate(grid.reshape(-1)):
        try:
            out[j] = _read_value(item, plan)
        except ValueError as exc:
            label = labels[j] if labels is not None else _element(column, j, grid.shape, plan.size)
            raise ValueError(f"{label}: {exc}") from None
    return out


def _element(column: str, index: int, shape: tuple[int, ...], size: int) -> str:
    """``x``, ``x[2]`` or ``x[1][0]``: the ``index``-th value of a list of ``shape`` in a column."""
    if size == 1:
        return column
    position = np.unravel_index(index, shape) if len(shape) > 1 else (index,)
    return column + "".join(f"[{int(i)}]" for i in position)


def _blank(shape: int | tuple[int, ...], plan: InputPlan) -> Array:
    return np.full(shape, "", dtype=object) if plan.dtype == object else np.zeros(shape, dtype=plan.dtype)


_ROW_BY_ROW = 32  # rows a block has when it is read row by row rather than halved again


def _convert(
    shape: tuple[int, ...], plan: InputPlan, at_once: Callable[[int, int], Array | None], one: Callable[[int], Any]
) -> tuple[Array, BadRows]:
    """Rows ``0..shape[0]`` as an array of ``shape``: ``at_once(start, stop)`` converts a block of rows, or gives
    None when some value in it does not fit; such a block is halved, down to blocks read row by row with ``one``
    (which raises ValueError for a bad row). So one bad row costs a few more block conversions, not the chunk."""
    out = _blank(shape, plan)
    bad: BadRows = {}
    blocks = [(0, shape[0])]
    while blocks:
        start, stop = blocks.pop()
        values = at_once(start, stop)
        if values is not None:
            out[start:stop] = values
        elif stop - start > _ROW_BY_ROW:
            middle = (start + stop) // 2
            blocks += [(middle, stop), (start, middle)]
        else:
            for row in range(start, stop):
                try:
                    out[row] = one(row)
                except ValueError as exc:
                    bad[row] = str(exc)
    return out, dict(sorted(bad.items()))


# --------------------------------------------------------------------------- Arrow (Parquet, CSV)


def _arrow_type(dtype: np.dtype[Any]) -> Any:
    import pyarrow as pa

    if dtype == np.dtype(object):
        return pa.string()
    if dtype == np.dtype(np.float16):  # Arrow cannot parse text as half floats: read float32, narrow after
        return pa.float32()
    return pa.from_numpy_dtype(dtype)


def _arrow_kind(kind: Any) -> str | None:
    """An Arrow type as the rule sees it: bool, int, number (a float or decimal) or text; None for the rest."""
    import pyarrow as pa

    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        return "text"
    return "text" if pa.types.is_large_binary(kind) else None


# The kinds of Arrow column each kind of datatype may read (bool, int and float columns as numbers).
_ARROW_TAKES: dict[str, set[str | None]] = {
    "b": {"bool", "int", "number", "text"},  # numbers: 0 and 1
    "i": {"int", "number", "text"},
    "u": {"int", "number", "text"},
    "f": {"int", "number", "text"},
    "O": {"text"},
}


def _arrow_values(array: Any, plan: InputPlan) -> Array | None:
    """A flat Arrow array as ``plan.dtype`` when all its values fit by the module's rule; None when some
    value does not (or is null): the caller then reads the values one by one to find which."""
    import pyarrow as pa
    import pyarrow.compute as pc

    source, target = _arrow_kind(array.type), plan.dtype.kind
    if array.null_count or source not in _ARROW_TAKES[target]:
        return None
    try:
        if target == "b" and source in ("int", "number"):
            numbers: Array = array.to_numpy(zero_copy_only=False)
            return numbers.astype(bool) if np.isin(numbers, (0, 1)).all() else None
        # Arrow's safe cast refuses integers a float cannot hold exactly; the rule takes the nearest value.
        values = pc.cast(array, _arrow_type(plan.dtype), safe=not (source == "int" and target == "f"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    read: Array = values.to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore"):  # FP16 is read as float32 and narrowed: beyond its range, an infinity
        return read.astype(plan.dtype, copy=False)


def _scalar_column(column: Any, plan: InputPlan, label: str) -> tuple[Array, BadRows]:
    """One value per row, as ``plan.dtype``; values that cannot be read are bad rows."""

    def one(row: int) -> Any:
        try:
            return _read_value(column[row].as_py(), plan)
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None

    return _convert((len(column),), plan, lambda start, stop: _arrow_values(column[start:stop], plan), one)


def _list_column(column: Any, plan: InputPlan) -> tuple[Array, BadRows]:
    """A list of ``k`` values per row (flat, or nested as the row's shape)."""

    def at_once(start: int, stop: int) -> Array | None:
        leaves = _leaves(column[start:stop], plan)
        values = None if leaves is None else _arrow_values(leaves, plan)
        return None if values is None else values.reshape(stop - start, plan.size)

    out, bad = _convert((len(column), plan.size), plan, at_once, lambda row: _one_row(column[row].as_py(), plan))
    return out.reshape(len(column), *plan.shape), bad


def _leaves(column: Any, plan: InputPlan) -> Any:
    """The values of a list column in row-major order, when every row is a list of ``k`` values (or nested as
    the row's shape) without nulls; else None."""
    import pyarrow.compute as pc

    depth, kind = 0, column.type
    while _is_list(kind):
        depth, kind = depth + 1, kind.value_type
    if depth != 1 and depth != len(plan.shape):
        return None
    array = column
    for size in (plan.size,) if depth == 1 else plan.shape:
        if array.null_count or (pc.list_value_length(array).to_numpy(zero_copy_only=False) != size).any():
            return None
        array = pc.list_flatten(array)
    return array


def arrow_to_tensors(batch: Any, plans: Sequence[InputPlan]) -> tuple[dict[str, Array], BadRows]:
    """A RecordBatch as full-length input arrays and the bad rows (index -> reason); callers drop the bad rows."""
    tensors: dict[str, Array] = {}
    bad: BadRows = {}
    for plan in plans:
        if plan.whole:
            column = batch.column(plan.columns[0])
            if plan.size == 1 and not _is_list(column.type):
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


def _is_list(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


# --------------------------------------------------------------------------- JSON lines

# Python types that convert to a datatype by numpy's own cast without a check: all of a block's values of
# one of them, and the block is converted at once.
_AT_ONCE: dict[str, set[type]] = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}, "O": {str}}


def records_to_tensors(
    records: Sequence[Mapping[str, Any]], plans: Sequence[InputPlan], id_column: str | None
) -> tuple[dict[str, Array], BadRows]:
    """Parsed JSON objects as full-length input arrays and the bad rows (index -> reason)."""
    tensors: dict[str, Array] = {}
    bad: BadRows = {}
    for plan in plans:
        values: list[Any] = []
        labels: list[Sequence[str] | None] = []
        missing: BadRows = {}
        for i, record in enumerate(records):
            try:
                value, names = _record_value(record, plan, id_column)
            except ValueError as exc:
                missing[i], value, names = str(exc), None, None
            values.append(value)
            labels.append(names)
        array, problems = _json_column(values, labels, plan, missing)
        tensors[plan.name] = array.reshape(len(records), *plan.shape)
        for row, reason in problems.items():
            bad.setdefault(row, reason)
    return tensors, dict(sorted(bad.items()))


def _json_column(
    values: list[Any], labels: list[Sequence[str] | None], plan: InputPlan, missing: BadRows
) -> tuple[Array, BadRows]:
    """One input's values of a chunk's records as ``(rows, k)``; the rows whose values do not fit are bad."""

    def at_once(start: int, stop: int) -> Array | None:
        rows = stop - start
        grid = np.array(values[start:stop], dtype=object)  # a missing value is None, which never fits at once
        if grid.shape not in ((rows, *plan.shape), (rows, plan.size)) and not (plan.size == 1 and grid.ndim == 1):
            return None
        block = _json_block(grid.reshape(-1), plan)
        return None if block is None else block.reshape(rows, plan.size)

    def one(row: int) -> Array:
        if row in missing:
            raise ValueError(missing[row])
        return _one_row(values[row], plan, labels[row])

    return _convert((len(values), plan.size), plan, at_once, one)


def _json_block(values: Array, plan: InputPlan) -> Array | None:
    """JSON values (an object array) as ``plan.dtype`` when all fit and are the usual kind: the rule of
    :func:`_fit` for numbers, on the whole block. None otherwise (text, lists, a value that does not fit)."""
    kind = plan.dtype.kind
    types = set(map(type, values))
    try:
        with np.errstate(over="ignore"):  # a float beyond the datatype's range: an infinity
            if types <= _AT_ONCE[kind]:
                return values.astype(plan.dtype)  # OverflowError: an integer out of range
            if kind not in "biu" or not types <= {bool, int, float} or (bool in types and kind != "b"):
                return None
            numbers = values.astype(np.float64)  # to check 2.0 for an integer, 0 and 1 for BOOL
            if kind == "b":
                fits = np.isin(numbers, (0, 1)).all()
            else:
                info = np.iinfo(plan.dtype)
                whole = (numbers == np.trunc(numbers)).all()
                fits = whole and numbers.min() >= info.min and numbers.max() < 2.0 ** (info.bits - (info.min < 0))
            return values.astype(plan.dtype) if fits else None
    except OverflowError:
        return None


def _record_value(
    record: Mapping[str, Any], plan: InputPlan, id_column: str | None
) -> tuple[Any, Sequence[str] | None]:
    """An input's value in one record, and the names of its elements when they come from several keys."""
    if plan.whole and len(plan.columns) == 1 and plan.columns[0] == plan.name:
        if plan.name not in record:
            raise ValueError(f"{plan.name}: missing")
        return record[plan.name], None
    if plan.columns and plan.columns[0] == f"{plan.name}_0":
        missing = [c for c in plan.columns if c not in record]
        if missing:
            raise ValueError(f"{plan.name}: missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        return [record[c] for c in plan.columns], plan.columns
    keys = [key for key in record if key != id_column]  # rule 3: this record's own keys
    return [record[key] for key in keys], keys
