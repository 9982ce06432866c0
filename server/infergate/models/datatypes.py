"""Tensor datatypes: Open Inference Protocol names, numpy, onnxruntime and Triton.

One table (``DATATYPES``) maps each V2 datatype name to the numpy dtype that
carries it on the wire (little-endian), onnxruntime's type string, Triton's
``TYPE_*`` name and the ``InferTensorContents`` field used for typed contents.
BYTES travels as 4-byte little-endian length prefixes; onnxruntime holds it as
string tensors, so its elements must be UTF-8 text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.errors import InvalidArgument

__all__ = [
    "BYTES",
    "DATATYPES",
    "Datatype",
    "decode_bytes_tensor",
    "encode_bytes_tensor",
    "from_onnx_type",
    "from_triton_type",
]

BYTES = "BYTES"


@dataclass(frozen=True, slots=True)
class Datatype:
    """How one V2 datatype is carried by numpy, onnxruntime, Triton and typed contents."""

    name: str
    numpy: np.dtype[Any]
    onnx: str
    triton: str
    contents_field: str | None  # None: raw only (FP16)

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for BYTES (variable length)."""
        return 0 if self.name == BYTES else self.numpy.itemsize


def _dt(name: str, numpy: str, onnx: str, field: str | None) -> Datatype:
    return Datatype(name, np.dtype(numpy), f"tensor({onnx})", f"TYPE_{name}", field)


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", "?", "bool", "bool_contents"),
        _dt("UINT8", "<u1", "uint8", "uint_contents"),
        _dt("UINT16", "<u2", "uint16", "uint_contents"),
        _dt("UINT32", "<u4", "uint32", "uint_contents"),
        _dt("UINT64", "<u8", "uint64", "uint64_contents"),
        _dt("INT8", "<i1", "int8", "int_contents"),
        _dt("INT16", "<i2", "int16", "int_contents"),
        _dt("INT32", "<i4", "int32", "int_contents"),
        _dt("INT64", "<i8", "int64", "int64_contents"),
        _dt("FP16", "<f2", "float16", None),
        _dt("FP32", "<f4", "float", "fp32_contents"),
        _dt("FP64", "<f8", "double", "fp64_contents"),
        Datatype(BYTES, np.dtype(object), "tensor(string)", "TYPE_STRING", "bytes_contents"),
    )
}

_BY_ONNX = {d.onnx: d for d in DATATYPES.values()}
_BY_TRITON = {d.triton: d for d in DATATYPES.values()}


def from_onnx_type(onnx_type: str) -> Datatype:
    """Datatype for an onnxruntime type string such as ``tensor(float)``.

    Raises ValueError for types the protocol cannot carry (bfloat16, sequences, maps).
    """
    try:
        return _BY_ONNX[onnx_type]
    except KeyError:
        raise ValueError(f"onnxruntime type {onnx_type} has no Open Inference Protocol datatype") from None


def from_triton_type(triton_type: str) -> Datatype:
    """Datatype for a Triton model-config type name such as ``TYPE_FP32`` (config.py's ``TritonType``
    admits only names this knows)."""
    return _BY_TRITON[triton_type]


_LENGTH = struct.Struct("<I")


def decode_bytes_tensor(raw: bytes | memoryview, count: int, where: str) -> npt.NDArray[np.object_]:
    """Split ``count`` length-prefixed elements out of ``raw`` into an array of str.

    ``where`` names the model and tensor in error messages.
    """
    if count * 4 > len(raw):  # checked before allocating: every element needs its 4-byte length
        raise InvalidArgument(f"{where}: {len(raw)} bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidArgument(f"{where}: BYTES data ends after {i} of {count} elements")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidArgument(f"{where}: BYTES element {i} claims {length} bytes, past the end")
        out[i] = _utf8(bytes(view[offset : offset + length]), where, i)
        offset += length
    if offset != len(view):
        raise InvalidArgument(f"{where}: {len(view) - offset} bytes left after the {count} BYTES elements of the shape")
    return out


def _utf8(data: bytes, where: str, index: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"{where}: BYTES element {index} is not UTF-8 (onnxruntime string tensors hold text)"
        ) from None


def bytes_elements_to_array(items: Any, where: str) -> npt.NDArray[np.object_]:
    """Typed ``bytes_contents`` to an array of str."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = _utf8(item, where, i)
    return out


def encode_bytes_tensor(array: npt.NDArray[Any]) -> bytes:
    """Serialise an array of str or bytes as length-prefixed elements, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)
