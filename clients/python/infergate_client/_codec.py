"""Pure conversions between numpy and the protocol's messages: no I/O, no gRPC.

Tensors always travel as raw contents (``raw_input_contents`` and
``raw_output_contents``): numbers little-endian and row-major, BYTES as a 4-byte
little-endian length before each element. That is what infergate and Triton
send and read. Typed ``contents`` in a reply are decoded too, for other servers.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ._proto import grpc_service_pb2 as pb
from .errors import InferenceFailed, InvalidArgument

__all__ = [
    "BYTES",
    "DATATYPES",
    "Array",
    "InferRequest",
    "InferResult",
    "ParameterValue",
    "build_infer_request",
    "datatype_of",
    "decode_infer_response",
    "decode_parameters",
    "decode_stream_reply",
    "encode_parameters",
]

Array = npt.NDArray[Any]
ParameterValue = bool | int | float | str
BYTES = "BYTES"

# V2 datatype -> numpy dtype carrying it on the wire.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    BYTES: np.dtype(object),
}
_BY_KIND_AND_SIZE = {(d.kind, d.itemsize): name for name, d in DATATYPES.items() if name != BYTES}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InferRequest:
    """One inference request, as ``Client.infer`` takes it (and as streams carry them)."""

    model: str
    inputs: Mapping[str, Array]
    outputs: Sequence[str] = ()
    request_id: str = ""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    model_version: str | int | None = None


class InferResult(dict[str, Array]):
    """The outputs of one inference by name, plus the reply's model, version, id and parameters."""

    def __init__(
        self,
        outputs: Mapping[str, Array],
        model_name: str = "",
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, ParameterValue] | None = None,
    ) -> None:
        super().__init__(outputs)
        self.model_name = model_name
        self.model_version = model_version
        self.request_id = request_id
        self.parameters: dict[str, ParameterValue] = dict(parameters or {})


def datatype_of(array: Array) -> str:
    """The V2 datatype that carries ``array``: str, bytes and object arrays are BYTES.

    Raises TypeError for dtypes the protocol has no name for (complex, datetime...).
    """
    kind = array.dtype.kind
    if kind in "OSU":
        return BYTES
    try:
        return _BY_KIND_AND_SIZE[(kind, array.dtype.itemsize)]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def _element_bytes(item: object) -> bytes:
    """One BYTES element as sent: bytes as they are, str in UTF-8, any other object (an int, a float...)
    as the UTF-8 of ``str(item)``, as Triton's client sends it (``bytes(3)`` would be three NUL bytes)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    return str(item).encode("utf-8")


def _encode_bytes(array: Array) -> bytes:
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = _element_bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _tensor_bytes(datatype: str, array: Array) -> bytes:
    if datatype == BYTES:
        return _encode_bytes(array)
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def encode_parameters(parameters: Mapping[str, ParameterValue], target: Any) -> None:
    """Write ``parameters`` into a protobuf map of InferParameter (bool before int: bool is an int)."""
    for key, value in parameters.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise TypeError(f"parameter {key!r}: {type(value).__name__} is not bool, int, float or str")


def decode_parameters(source: Any) -> dict[str, ParameterValue]:
    """A protobuf map of InferParameter as plain Python values."""
    out: dict[str, ParameterValue] = {}
    for key, parameter in source.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(parameter, choice)
    return out


def build_infer_request(request: InferRequest) -> pb.ModelInferRequest:
    """The ModelInferRequest for ``request``, every input as raw contents.

    Raises ``InvalidArgument`` with ``code`` None (nothing was sent) for a request
    that cannot be encoded: no inputs, an array with no V2 datatype (complex...),
    a parameter that is not bool, int, float or str; ``__cause__`` is the original error.
    """
    where = f"infer({request.model!r})"
    if not request.inputs:
        empty = ValueError(f"{where} needs at least one input")
        raise InvalidArgument(str(empty)) from empty
    try:
        version = "" if request.model_version is None else str(request.model_version)
        message = pb.ModelInferRequest(model_name=request.model, model_version=version, id=request.request_id)
        encode_parameters(request.parameters, message.parameters)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{where}: {exc}") from exc
    for name, value in request.inputs.items():
        try:
            array = np.asarray(value)
            datatype = datatype_of(array)
            message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            message.raw_input_contents.append(_tensor_bytes(datatype, array))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{where}: input {name!r}: {exc}") from exc
    try:
        for name in request.outputs:
            message.outputs.add(name=name)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{where}: outputs: {exc}") from exc
    return message


def _decode_bytes(raw: bytes, shape: tuple[int, ...], name: str) -> Array:
    """The ``prod(shape)`` elements of a BYTES output, each after its 4-byte length; raises ValueError
    when an element runs past the data or bytes are left over after the last."""
    count = int(np.prod(shape, dtype=np.int64))
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise ValueError(f"output {name!r}: BYTES data ends after {i} of {count} elements")
        (length,) = _LENGTH.unpack_from(raw, offset)
        start = offset + 4
        if start + length > len(raw):
            raise ValueError(
                f"output {name!r}: BYTES element {i} of {count} says {length} bytes but {len(raw) - start} follow"
                " its length"
            )
        out[i] = raw[start : start + length]
        offset = start + length
    if offset != len(raw):
        raise ValueError(
            f"output {name!r}: {len(raw) - offset} bytes left over after the {count} BYTES element(s)"
            f" of shape {list(shape)}"
        )
    return out


def _typed_contents(tensor: Any, datatype: str) -> Array:
    contents = tensor.contents
    for field_name in ("bool", "int", "int64", "uint", "uint64", "fp32", "fp64", "bytes"):
        values = getattr(contents, f"{field_name}_contents")
        if len(values):
            if datatype == BYTES:
                return np.array(list(values), dtype=object)
            return np.asarray(list(values), dtype=DATATYPES[datatype])
    return np.empty(0, dtype=DATATYPES.get(datatype, np.dtype(object)))


def _decode_output(tensor: Any, raw: bytes | None) -> Array:
    shape = tuple(int(d) for d in tensor.shape)
    count = int(np.prod(shape, dtype=np.int64))
    if tensor.datatype not in DATATYPES:
        raise ValueError(f"output {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    if raw is None:
        flat = _typed_contents(tensor, tensor.datatype)
    elif tensor.datatype == BYTES:
        flat = _decode_bytes(raw, shape, tensor.name)
    else:
        flat = np.frombuffer(raw, dtype=DATATYPES[tensor.datatype])
    if flat.size != count:
        raise ValueError(f"output {tensor.name!r}: {flat.size} elements for shape {list(shape)}")
    return flat.reshape(shape)


def decode_infer_response(response: pb.ModelInferResponse) -> InferResult:
    """The reply's outputs as numpy arrays (read-only views of the reply's bytes for numbers).

    BYTES outputs become object arrays of ``bytes``. Raises ValueError when the
    reply's contents do not fit its shapes.
    """
    raw: Sequence[bytes | None] = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise ValueError(f"{len(response.outputs)} outputs but {len(raw)} raw contents")
    if not raw:
        raw = [None] * len(response.outputs)
    outputs = {tensor.name: _decode_output(tensor, data) for tensor, data in zip(response.outputs, raw, strict=True)}
    return InferResult(
        outputs,
        model_name=response.model_name,
        model_version=response.model_version,
        request_id=response.id,
        parameters=decode_parameters(response.parameters),
    )


def decode_stream_reply(reply: pb.ModelStreamInferResponse) -> InferResult:
    """One ModelStreamInfer reply as a result; raises InferenceFailed for a failed request."""
    if reply.error_message:
        raise InferenceFailed(reply.error_message, reply.infer_response.id)
    return decode_infer_response(reply.infer_response)
