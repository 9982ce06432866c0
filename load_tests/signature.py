"""Model signatures: the tensor names, V2 datatypes and shapes a load run needs.

A shape dimension of ``-1`` is variable. By the convention infergate and Triton
share, a model whose inputs all start with ``-1`` batches along axis 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from infergate._proto import grpc_service_pb2 as pb
from infergate.models.datatypes import BYTES, DATATYPES

__all__ = [
    "BYTES",
    "NUMPY_DTYPES",
    "ModelSignature",
    "TensorSpec",
    "metadata_from_signature",
    "signature_from_metadata",
]

# V2 datatype -> numpy dtype carrying it on the wire: the server's own table, so the two never drift.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {name: d.numpy for name, d in DATATYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: name, V2 datatype and shape (``-1`` = variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in NUMPY_DTYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported datatype {self.datatype!r}")

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape to send: ``-1`` becomes ``batch`` in dimension 0 and 1 elsewhere."""
        return tuple((batch if axis == 0 else 1) if dim < 0 else dim for axis, dim in enumerate(self.shape))


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """What a model takes and returns; ``max_batch_size`` is 0 when unknown."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    version: str = "1"
    max_batch_size: int = 0

    @property
    def batched(self) -> bool:
        """True when every input and output has a variable dimension 0."""
        tensors = (*self.inputs, *self.outputs)
        return bool(tensors) and all(t.shape[:1] == (-1,) for t in tensors)


def _spec(tensor: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(tensor.name, tensor.datatype, tuple(int(d) for d in tensor.shape))


def signature_from_metadata(response: pb.ModelMetadataResponse) -> ModelSignature:
    """Signature of a ModelMetadata reply; raises ValueError on an unusable one."""
    if not response.inputs:
        raise ValueError(f"model {response.name!r} reports no inputs")
    return ModelSignature(
        name=response.name,
        inputs=tuple(_spec(t) for t in response.inputs),
        outputs=tuple(_spec(t) for t in response.outputs),
        version=response.versions[0] if response.versions else "",
    )


def metadata_from_signature(signature: ModelSignature) -> pb.ModelMetadataResponse:
    """The ModelMetadata reply describing ``signature`` (platform ``onnxruntime_onnx``)."""

    def tensors(specs: tuple[TensorSpec, ...]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
            for s in specs
        ]

    return pb.ModelMetadataResponse(
        name=signature.name,
        versions=[signature.version],
        platform="onnxruntime_onnx",
        inputs=tensors(signature.inputs),
        outputs=tensors(signature.outputs),
    )
