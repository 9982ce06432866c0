"""Triton's classification extension: an output returned as its top-k classes instead of raw scores.

A requested output with the parameter ``classification`` (int64, tritonclient's
``InferRequestedOutput(name, class_count=k)``) comes back as a BYTES tensor of
``"<score>:<index>[:<label>]"`` strings, highest score first, shape
``[batch, min(k, n)]`` for a batching model (``[min(k, n)]`` otherwise), where
``n`` is the number of scores per row. Labels are the lines of the output's
``label_filename`` (config.yaml ``output`` entry), line ``i`` for index ``i``;
an index without a label (or with an empty line) gets none.

Formatting follows Triton's server (``src/classification.cc``), not its
protocol document: the score is C++'s ``std::to_string`` of the element, so
floats print with six decimals (``"3.300000:1"``) and integers as integers.
Ties keep the lower index first.

The decoder reads ``classification_counts(request.outputs, spec)`` with the
other request checks; the version loads its labels once
(``models.labels.output_labels``); after inference the handler replaces the
outputs with ``classify_outputs(outputs, counts, spec, labels)`` and the
encoder writes those arrays as BYTES (their dtype is object).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.errors import InvalidArgument
from infergate.models.spec import ModelSpec, Tensors

__all__ = ["check_classifiable", "classification_counts", "classify", "classify_outputs"]

# Triton's bound on the scores of one row, against pathological memory and CPU use.
MAX_CLASSIFICATION_ELEMENTS = 1_000_000
_SCORED_KINDS = "iuf"  # integers and floats; Triton has no classification of BOOL, FP16 or BYTES


def classification_counts(outputs: Iterable[Any]) -> dict[str, int]:
    """Output name -> class count, for requested outputs (``InferRequestedOutputTensor``) that ask for one."""
    counts: dict[str, int] = {}
    for output in outputs:
        if "classification" not in output.parameters:
            continue
        param = output.parameters["classification"]
        if param.WhichOneof("parameter_choice") != "int64_param":
            raise InvalidArgument("invalid value type for 'classification' parameter, expected int64_param")
        if param.int64_param <= 0:
            raise InvalidArgument(
                "invalid value for 'classification' parameter, expected >= 0 "
                f"(output {output.name!r} asks for {param.int64_param}; ask for at least 1 class)"
            )
        counts[output.name] = int(param.int64_param)
    return counts


def check_classifiable(counts: Mapping[str, int], spec: ModelSpec) -> None:
    """Refuse, before anything runs, classification of an output whose type has no scores."""
    for name in counts:
        tensor = spec.output_by_name.get(name)
        if tensor is not None and not _scored(tensor.datatype.numpy):
            raise InvalidArgument(
                f"class result not available for output due to unsupported type '{tensor.datatype.name}' "
                f"(output '{name}' of model '{spec.name}')"
            )


def _scored(dtype: np.dtype[Any]) -> bool:
    """Integers and floats of 32 bits or more (Triton has no classification of BOOL, FP16 or BYTES)."""
    return dtype.kind in _SCORED_KINDS and not (dtype.kind == "f" and dtype.itemsize < 4)


def classify(scores: npt.NDArray[Any], count: int, labels: tuple[str, ...], batches: bool) -> npt.NDArray[np.object_]:
    """The top ``count`` classes of each row of ``scores`` as Triton's strings (see the module docstring)."""
    if not _scored(scores.dtype):
        raise InvalidArgument(
            f"class result not available for output due to unsupported type '{_type_name(scores.dtype)}'"
        )
    rows = scores.reshape(scores.shape[0], -1) if batches and scores.ndim > 0 else scores.reshape(1, -1)
    if rows.shape[1] > MAX_CLASSIFICATION_ELEMENTS:
        raise InvalidArgument(
            f"classification output tensor too large ({rows.shape[1]} scores per row, "
            f"the limit is {MAX_CLASSIFICATION_ELEMENTS})"
        )
    k = min(count, rows.shape[1])
    result = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        for j, index in enumerate(_top(row, k)):
            text = f"{_score(row[index])}:{index}"
            if index < len(labels) and labels[index]:
                text += f":{labels[index]}"
            result[r, j] = text
    return result if batches else result[0]


def _top(row: npt.NDArray[Any], k: int) -> list[int]:
    """Indices of the ``k`` highest values, ties by lower index, NaN last."""
    values = np.where(np.isnan(row), -np.inf, row) if row.dtype.kind == "f" else row
    n = len(values)
    # A stable ascending sort of the reversed row, read backwards: descending, ties by ascending index.
    ascending = np.argsort(values[::-1], kind="stable")
    return [int(n - 1 - i) for i in ascending[::-1][:k]]


def _score(value: Any) -> str:
    """C++ ``std::to_string``: ``%f`` for floats, plain digits for integers."""
    if isinstance(value, np.floating):
        return f"{float(value):f}"
    return str(int(value))


def _type_name(dtype: np.dtype[Any]) -> str:
    return {"O": "BYTES", "b": "BOOL", "f": "FP16"}.get(dtype.kind, str(dtype))


def classify_outputs(
    outputs: Tensors, counts: Mapping[str, int], spec: ModelSpec, labels: Mapping[str, tuple[str, ...]]
) -> Tensors:
    """``outputs`` with each output named in ``counts`` replaced by its classification strings."""
    if not counts:
        return outputs
    replaced = dict(outputs)
    for name, count in counts.items():
        replaced[name] = classify(outputs[name], count, labels.get(name, ()), spec.batches)
    return replaced
