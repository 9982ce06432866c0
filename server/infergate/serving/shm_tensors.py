"""Tensors in system shared memory: the ``shared_memory_*`` parameters of a ModelInferRequest.

An input or requested output names a region registered with
SystemSharedMemoryRegister in its parameters (Triton's shared-memory extension):

* ``shared_memory_region`` (string): the region's name;
* ``shared_memory_byte_size`` (int64, required with a region): the tensor's bytes;
* ``shared_memory_offset`` (int64, default 0): where they start in the region.

An input read from a region has no ``contents`` and takes no entry of
``raw_input_contents`` (which then holds the other inputs' data, in order).
:func:`input_sources` hands the codec a :class:`RegionSlice` for it, whose
bytes the codec copies into the server's memory as it decodes the request
(once its size is checked): the client may change or shrink its file as soon
as the request is in, and what the batcher and onnxruntime see never moves.
An output written to a region comes back with the same parameters
(``shared_memory_byte_size`` being the bytes written), an empty
``raw_output_contents`` entry (positions stay aligned with ``outputs``, as in
Triton) and nothing else; :func:`output_targets` resolves the regions before
the model runs, :func:`write_output` writes them after.

With auth on, a request that names a region also needs the ``shared_memory``
permission (besides ``infer:<model>``): a region is the memory of whichever
client registered it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate import __version__
from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument, Unimplemented
from infergate.models.datatypes import BYTES, Datatype, encode_bytes_tensor
from infergate.security.auth import current_principal, require
from infergate.serving.shared_memory import RegionSlice, SystemSharedMemory

__all__ = [
    "BYTE_SIZE",
    "OFFSET",
    "REGION",
    "SHARED_MEMORY_PERMISSION",
    "OutputTarget",
    "SharedMemoryAccess",
    "Source",
    "TensorRegion",
    "input_bytes",
    "input_sources",
    "names_shared_memory",
    "output_targets",
    "tensor_region",
]

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
SHARED_MEMORY_PERMISSION = "shared_memory"

Buffer = bytes | memoryview
Source = Buffer | RegionSlice  # an input's bytes, or where in a region to read them


@dataclass(frozen=True, slots=True)
class TensorRegion:
    """Where one tensor's bytes are: ``byte_size`` bytes at ``offset`` into region ``name``."""

    name: str
    offset: int
    byte_size: int


def names_shared_memory(request: pb.ModelInferRequest) -> bool:
    """Does any input or requested output carry a ``shared_memory_*`` parameter? (Cheap: map look-ups.)"""
    for tensors in (request.inputs, request.outputs):
        for tensor in tensors:
            params = tensor.parameters
            if params and (REGION in params or BYTE_SIZE in params or OFFSET in params):
                return True
    return False


def tensor_region(tensor: Any) -> TensorRegion | None:
    """The region a tensor (input or requested output) names, or None; Triton's words for bad parameters."""
    params = tensor.parameters
    name = tensor.name
    if REGION not in params:
        for key in (OFFSET, BYTE_SIZE):
            if key in params:
                raise InvalidArgument(
                    f"'{key}' can not be specified without 'shared_memory_region' parameter for tensor '{name}'"
                )
        return None
    region = params[REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(
            f"invalid value type for 'shared_memory_region' parameter for tensor '{name}', expected string_param."
        )
    if BYTE_SIZE not in params:
        raise InvalidArgument(
            f"'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for "
            f"tensor '{name}'"
        )
    offset = _int64(params, OFFSET, name) if OFFSET in params else 0
    return TensorRegion(region.string_param, offset, _int64(params, BYTE_SIZE, name))


def _int64(params: Any, key: str, name: str) -> int:
    param = params[key]
    if param.WhichOneof("parameter_choice") != "int64_param":
        raise InvalidArgument(f"invalid value type for '{key}' parameter for tensor '{name}', expected int64_param.")
    if param.int64_param < 0:
        raise InvalidArgument(f"'{key}' for tensor '{name}' is {param.int64_param}; it must not be negative")
    return int(param.int64_param)


class SharedMemoryAccess:
    """How a request reaches the registry: refused when the extension is off, checked against the caller."""

    def __init__(self, registry: SystemSharedMemory | None):
        self.registry = registry

    def slice(self, where: TensorRegion, what: str) -> RegionSlice:
        """The bytes ``where`` names, for ``what`` ("input 'x' for model 'm'")."""
        if self.registry is None:
            raise Unimplemented(
                f"{what} names shared memory region '{where.name}', but the system_shared_memory extension is off "
                f"on this infergate {__version__} server (start it with --allow-client-shm, or set "
                "shared_memory.system.enabled in its config)"
            )
        principal = current_principal()
        if principal is not None:  # auth on: a region holds another client's memory
            require(principal, SHARED_MEMORY_PERMISSION, None, f"ModelInfer with shared memory ({what})")
        return self.registry.get(where.name).slice(where.offset, where.byte_size, what)


def input_bytes(request: pb.ModelInferRequest) -> int:
    """How many bytes the request's inputs name in regions (read from the parameters: nothing is looked up)."""
    total = 0
    for tensor in request.inputs:
        where = tensor_region(tensor)
        if where is not None:
            total += where.byte_size
    return total


def input_sources(request: pb.ModelInferRequest, model: str, access: SharedMemoryAccess) -> list[Source | None]:
    """Per input, in order: its bytes (its raw contents, or the slice of a region to read them from),
    or None when it comes as typed ``contents``. Checks that raw contents, typed contents and regions
    are not mixed up for any one input, and that every raw entry belongs to an input."""
    raw = request.raw_input_contents
    sources: list[Source | None] = []
    taken = 0
    for tensor in request.inputs:
        where = tensor_region(tensor)
        if where is not None:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"unexpected 'content' provided when using shared memory for input tensor '{tensor.name}' "
                    f"for model '{model}'"
                )
            what = f"input '{tensor.name}' for model '{model}'"
            sources.append(access.slice(where, what))
        elif tensor.HasField("contents"):
            if raw:
                raise InvalidArgument(
                    f"contents field must not be specified when using raw_input_contents for '{tensor.name}' "
                    f"for model '{model}' (send every input raw, in shared memory, or as typed contents)"
                )
            sources.append(None)
        elif taken < len(raw):
            sources.append(raw[taken])
            taken += 1
        else:
            raise InvalidArgument(
                f"unable to find data for input tensor '{tensor.name}' for model '{model}' in request."
            )
    if taken != len(raw):
        raise InvalidArgument(
            f"model {model}: {len(raw)} raw_input_contents for the {taken} inputs sent raw (inputs in shared "
            "memory take none)"
        )
    return sources


@dataclass(frozen=True, slots=True)
class OutputTarget:
    """Where one requested output goes: the slice of its region, and the parameters that named it."""

    where: TensorRegion
    slice: RegionSlice


def output_targets(
    outputs: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor], model: str, access: SharedMemoryAccess
) -> dict[str, OutputTarget]:
    """The requested outputs that go to shared memory, resolved before the model runs
    (so an unknown region or a bad offset costs no inference)."""
    targets: dict[str, OutputTarget] = {}
    for output in outputs:
        where = tensor_region(output)
        if where is None:
            continue
        if "classification" in output.parameters:
            raise InvalidArgument("output can't set both 'shared_memory_region' and 'classification'")
        what = f"output '{output.name}' for model '{model}'"
        targets[output.name] = OutputTarget(where, access.slice(where, what))
    return targets


def write_output(
    target: OutputTarget, tensor: pb.ModelInferResponse.InferOutputTensor, array: npt.NDArray[Any], datatype: Datatype
) -> None:
    """Write ``array`` into its region and describe it on ``tensor``; InvalidArgument (Triton's words)
    when the bytes the request set aside cannot hold it."""
    data = encode_bytes_tensor(array) if datatype.name == BYTES else None
    size = len(data) if data is not None else array.size * datatype.itemsize
    room = len(target.slice)
    if size > room:
        raise InvalidArgument(
            f"shared memory size specified with the request for output '{tensor.name}' ({room} bytes) "
            f"should be at least {size} bytes to hold the results"
        )
    if data is None:
        array = np.ascontiguousarray(array, dtype=datatype.numpy)  # no copy when it already is
    target.slice.write(memoryview(data) if data is not None else array.data.cast("B"))
    params = tensor.parameters
    params[REGION].string_param = target.where.name
    params[BYTE_SIZE].int64_param = size
    if target.where.offset:
        params[OFFSET].int64_param = target.where.offset
