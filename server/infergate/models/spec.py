"""What a loaded model accepts and returns: names, datatypes, shapes, batching.

A :class:`ModelSpec` is derived once at load from the ONNX graph (as
onnxruntime reports it) and the model's config. Shapes are the full tensor
shapes a request carries: for a batching model the first dimension is -1 and
stands for the request's rows; -1 elsewhere is a variable dimension.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from infergate.models.config import InputConfig, OutputConfig
from infergate.models.datatypes import Datatype, from_onnx_type

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "ModelSpec",
    "TensorSpec",
    "Tensors",
    "check_tensor_config",
    "dims_match",
    "spec_from_graph",
]

DEFAULT_MAX_BATCH_SIZE = 64

Tensors = dict[str, npt.NDArray[Any]]  # tensors by name: a request's inputs, a version's outputs


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: Datatype
    shape: tuple[int, ...]  # -1: variable (the first one is the batch when the model batches)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0: the model does not batch
    platform: str = "onnxruntime_onnx"
    input_by_name: dict[str, TensorSpec] = field(init=False, repr=False)
    output_by_name: dict[str, TensorSpec] = field(init=False, repr=False)
    # True when some non-batch input dimension is variable, so requests must be grouped by shape.
    variable_inner_dims: bool = field(init=False, repr=False)
    bytes_inputs: bool = field(init=False, repr=False)  # some input is BYTES (decoded element by element)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_by_name", {t.name: t for t in self.inputs})
        object.__setattr__(self, "output_by_name", {t.name: t for t in self.outputs})
        inner = (t.shape[1:] if self.max_batch_size else t.shape for t in self.inputs)
        object.__setattr__(self, "variable_inner_dims", any(-1 in s for s in inner))
        object.__setattr__(self, "bytes_inputs", any(t.datatype.name == "BYTES" for t in self.inputs))

    @property
    def batches(self) -> bool:
        return self.max_batch_size > 0

    def batch_group(self, inputs: Tensors) -> Hashable:
        """The group of a request's ``inputs``: requests may share a batch when their groups are equal.
        Their non-batch shapes, in the spec's input order (the request's own order must not matter);
        None, one group for all, when no input has a variable dimension besides the batch."""
        return tuple(inputs[t.name].shape[1:] for t in self.inputs) if self.variable_inner_dims else None


def _dims(shape: list[Any]) -> tuple[int, ...]:
    """onnxruntime reports a dim as an int, a symbolic name (str) or None."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _symbolic_first(shape: list[Any]) -> bool:
    return len(shape) > 0 and not (isinstance(shape[0], int) and shape[0] >= 0)


def _tensor(arg: Any, where: str) -> TensorSpec:
    try:
        datatype = from_onnx_type(arg.type)
    except ValueError as exc:
        raise ValueError(f"{where} {arg.name}: {exc}") from None
    return TensorSpec(arg.name, datatype, _dims(arg.shape))


def spec_from_graph(
    name: str, version: int, inputs: list[Any], outputs: list[Any], max_batch_size: int | None
) -> ModelSpec:
    """Build the spec from onnxruntime's ``NodeArg`` lists and the configured max_batch_size.

    With ``max_batch_size`` None the model batches (DEFAULT_MAX_BATCH_SIZE) when
    every input and output has a symbolic first dimension. Raises ValueError
    when the config asks for batching the graph cannot do.
    """
    args = [*inputs, *outputs]
    can_batch = bool(args) and all(_symbolic_first(a.shape) for a in args)
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if can_batch else 0
    elif max_batch_size > 0 and not can_batch:
        fixed = [a.name for a in args if not _symbolic_first(a.shape)]
        raise ValueError(
            f"max_batch_size is {max_batch_size} but tensors {fixed} have no symbolic first "
            "dimension to batch on; set max_batch_size: 0"
        )
    return ModelSpec(
        name=name,
        version=version,
        inputs=tuple(_tensor(a, "input") for a in inputs),
        outputs=tuple(_tensor(a, "output") for a in outputs),
        max_batch_size=max_batch_size,
    )


def check_tensor_config(spec: ModelSpec, inputs: list[InputConfig], outputs: list[OutputConfig]) -> None:
    """config.yaml's ``input``/``output`` entries must name the graph's tensors, with its types and dims if given.

    ``dims`` leave out the batch dimension, as in Triton; -1 on either side
    matches anything. Raises ValueError listing every mismatch.
    """
    problems: list[str] = []
    for kind, entries, tensors in (("input", inputs, spec.input_by_name), ("output", outputs, spec.output_by_name)):
        for entry in entries:
            tensor = tensors.get(entry.name)
            where = f"{kind} {entry.name!r}"
            if tensor is None:
                problems.append(f"{where}: the model has no {kind} of that name (it has {sorted(tensors)})")
                continue
            if entry.data_type is not None and entry.data_type != tensor.datatype.triton:
                problems.append(f"{where}: data_type {entry.data_type}, the model's is {tensor.datatype.triton}")
            inner = tensor.shape[1:] if spec.batches else tensor.shape
            if entry.dims is not None and not dims_match(entry.dims, inner):
                problems.append(f"{where}: dims {entry.dims}, the model's are {list(inner)}")
    if problems:
        raise ValueError("; ".join(problems))


def dims_match(configured: Sequence[int], actual: Sequence[int]) -> bool:
    """Same rank, and each dimension equal or -1 (variable) on either side."""
    return len(configured) == len(actual) and all(
        c == -1 or a == -1 or c == a for c, a in zip(configured, actual, strict=True)
    )
