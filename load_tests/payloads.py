"""Random inputs and the wire bytes of ModelInfer requests and replies.

Tensors always travel as raw contents (``raw_input_contents`` /
``raw_output_contents``): numbers little-endian, BYTES as 4-byte little-endian
length prefixes followed by the bytes, which is what tritonclient sends and reads.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate._proto import grpc_service_pb2 as pb
from infergate.models.datatypes import encode_bytes_tensor

from .signature import BYTES, NUMPY_DTYPES, ModelSignature, TensorSpec

__all__ = [
    "InvalidResponse",
    "build_infer_request",
    "build_infer_response",
    "load_inputs",
    "random_inputs",
    "tensor_bytes",
    "validate_response",
]

Array = npt.NDArray[Any]


class InvalidResponse(Exception):
    """A ModelInfer reply that does not match the model's signature."""


def _random_array(spec: TensorSpec, batch: int, rng: np.random.Generator) -> Array:
    shape = spec.concrete_shape(batch)
    dtype = NUMPY_DTYPES[spec.datatype]
    if spec.datatype == BYTES:
        words = [f"w{n}".encode() for n in rng.integers(0, 1000, size=math.prod(shape))]
        return np.array(words, dtype=object).reshape(shape)
    if spec.datatype == "BOOL":
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 64, size=shape).astype(dtype)


def random_inputs(signature: ModelSignature, batch: int, seed: int = 0) -> dict[str, Array]:
    """One random array per input, shaped by ``concrete_shape(batch)``; same seed, same data."""
    rng = np.random.default_rng(seed)
    return {spec.name: _random_array(spec, batch, rng) for spec in signature.inputs}


def load_inputs(signature: ModelSignature, batch: int, files: dict[str, str], seed: int = 0) -> dict[str, Array]:
    """Random inputs, except those named in ``files`` (input name -> ``.npy`` path), read as saved.

    Names in ``files`` that the model does not have are ignored (a mix of models may share one list).
    """
    arrays = random_inputs(signature, batch, seed)
    for spec in signature.inputs:
        if spec.name in files:
            arrays[spec.name] = np.load(files[spec.name], allow_pickle=spec.datatype == BYTES)
    return arrays


def tensor_bytes(datatype: str, array: Array) -> bytes:
    """The raw wire contents of ``array`` for ``datatype`` (row-major)."""
    if datatype == BYTES:
        return encode_bytes_tensor(array)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def build_infer_request(signature: ModelSignature, arrays: dict[str, Array]) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``arrays`` as raw contents; asks for every output."""
    request = pb.ModelInferRequest(model_name=signature.name)
    for spec in signature.inputs:
        array = arrays[spec.name]
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
        request.raw_input_contents.append(tensor_bytes(spec.datatype, array))
    return request


def _zero_contents(spec: TensorSpec, shape: tuple[int, ...]) -> bytes:
    count = math.prod(shape)
    if spec.datatype == BYTES:
        return struct.pack("<I", 0) * count  # empty strings
    return bytes(count * NUMPY_DTYPES[spec.datatype].itemsize)


def build_infer_response(signature: ModelSignature, batch: int) -> pb.ModelInferResponse:
    """A reply with every output of ``signature`` at batch ``batch``, filled with zeros."""
    response = pb.ModelInferResponse(model_name=signature.name, model_version=signature.version)
    for spec in signature.outputs:
        shape = spec.concrete_shape(batch)
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(shape))
        response.raw_output_contents.append(_zero_contents(spec, shape))
    return response


def _check_output(spec: TensorSpec | None, tensor: Any, raw: bytes, batch: int) -> None:
    name, shape = tensor.name, tuple(tensor.shape)
    if spec is not None and spec.datatype != tensor.datatype:
        raise InvalidResponse(f"output {name!r}: datatype {tensor.datatype}, want {spec.datatype}")
    if spec is not None and spec.shape[:1] == (-1,) and shape[:1] != (batch,):
        raise InvalidResponse(f"output {name!r}: shape {list(shape)}, want batch {batch} first")
    itemsize = NUMPY_DTYPES.get(tensor.datatype, np.dtype(object)).itemsize
    if tensor.datatype != BYTES and len(raw) != math.prod(shape) * itemsize:
        raise InvalidResponse(f"output {name!r}: {len(raw)} bytes for shape {list(shape)}")


def validate_response(response: pb.ModelInferResponse, signature: ModelSignature, batch: int) -> str:
    """Check a reply against ``signature``; returns a summary like ``y FP32 [1,16]``.

    Raises InvalidResponse when outputs are missing, not raw, or of the wrong
    datatype, batch size or byte length.
    """
    if not response.outputs:
        raise InvalidResponse("the reply has no outputs")
    if len(response.raw_output_contents) != len(response.outputs):
        raise InvalidResponse(f"{len(response.outputs)} outputs but {len(response.raw_output_contents)} raw contents")
    specs = {spec.name: spec for spec in signature.outputs}
    parts = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        _check_output(specs.get(tensor.name), tensor, raw, batch)
        parts.append(f"{tensor.name} {tensor.datatype} [{','.join(map(str, tensor.shape))}]")
    return "; ".join(parts)
