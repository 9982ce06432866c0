"""Open Inference Protocol messages to numpy and back, with the request checks.

:class:`WireRequest` reads a ModelInferRequest once: model, version, id and
the ``timeout`` parameter at once, the sticky routing key when the router asks
for it, and the tensors (:func:`decode_request`) for the version that serves
it, with the parameters that shape the answer (``sequence_id``/``sequence_start``/
``sequence_end``, each requested output's ``classification``). Inputs come from
``raw_input_contents`` (read in place with ``np.frombuffer``), typed
``contents``, or a system shared-memory region (copied into the server's
memory once its size is checked; see ``shm_tensors.py``); every refusal is
an InvalidArgument whose message names the model and the tensor, in Triton's
words where its clients match on them (then infergate's detail follows).
:func:`encode_response` answers with ``raw_output_contents``, or writes an
output into the region the request named for it, and says how the request
was routed.

A request that names shared memory is read by :class:`SharedMemoryWireRequest`
(:func:`wire_request` picks the class); every other request takes the plain
path, untouched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument
from infergate.models.datatypes import (
    BYTES,
    DATATYPES,
    Datatype,
    bytes_elements_to_array,
    decode_bytes_tensor,
    encode_bytes_tensor,
)
from infergate.models.sequence import sequence_params
from infergate.models.spec import ModelSpec, Tensors, TensorSpec
from infergate.serving.classification import check_classifiable, classification_counts
from infergate.serving.offload import COPY_BYTES_PER_ELEMENT
from infergate.serving.request import DecodedRequest, InferenceResult, RequestLimits
from infergate.serving.shared_memory import RegionSlice
from infergate.serving.shm_tensors import (
    OutputTarget,
    SharedMemoryAccess,
    Source,
    input_bytes,
    input_sources,
    names_shared_memory,
    output_targets,
    write_output,
)

__all__ = [
    "ROUTE_PARAMETER",
    "SHADOWED_PARAMETER",
    "SharedMemoryWireRequest",
    "WireRequest",
    "decode_request",
    "encode_answer",
    "encode_response",
    "request_timeout_us",
    "wire_request",
]

# Response parameters that tell the caller how its request was routed.
ROUTE_PARAMETER = "infergate_route"
SHADOWED_PARAMETER = "infergate_shadowed"

Metadata = Callable[[], Sequence[tuple[str, str | bytes]] | None]  # a call's invocation_metadata


class WireRequest:
    """A ModelInferRequest as the handler's :class:`~infergate.serving.request.InferenceRequest`."""

    __slots__ = ("_metadata", "id", "message", "model", "priority", "timeout_us", "version")

    def __init__(self, message: pb.ModelInferRequest, metadata: Metadata):
        self.message = message
        self.model: str = message.model_name
        self.version: str = message.model_version
        self.id: str = message.id
        has_parameters = bool(message.parameters)  # most requests have none: skip both look-ups
        self.timeout_us = request_timeout_us(message) if has_parameters else None
        self.priority = request_priority(message) if has_parameters else 0
        self._metadata = metadata  # read only when a sticky header is configured

    def routing_key(self, header: str | None, parameter: str | None) -> str | None:
        if header is not None:
            for key, value in self._metadata() or ():
                if key == header:
                    return value if isinstance(value, str) else value.decode("utf-8", "replace")
            return None
        if parameter is not None and parameter in self.message.parameters:
            given = self.message.parameters[parameter]
            choice = given.WhichOneof("parameter_choice")
            return str(getattr(given, choice)) if choice else None
        return None

    def decode(self, spec: ModelSpec, limits: RequestLimits) -> DecodedRequest:
        return decode_request(
            self.message, spec, limits.max_elements, max_rows=limits.max_rows, max_inputs=limits.max_inputs
        )

    def attach(self, spec: ModelSpec, limits: RequestLimits) -> None:
        """Nothing to take hold of: the message holds every tensor."""

    def decode_elements(self, spec: ModelSpec) -> int:
        if not spec.bytes_inputs:
            return 0  # the common case, answered without reading the message
        total = 0
        for tensor in self.message.inputs:
            if tensor.datatype == BYTES:
                total += math.prod(max(d, 0) for d in tensor.shape)
        return total


class SharedMemoryWireRequest(WireRequest):
    """A ModelInferRequest that names system shared memory for an input or an output.

    :meth:`attach` takes slices of the regions its inputs are read from and of
    those its outputs go to (``targets``, which :func:`encode_answer` fills).
    The registry belongs to the event loop (it is not locked): attach there;
    :meth:`decode` then copies the inputs out of their regions anywhere, a
    thread included (``decode_elements`` counts the copy: a large one runs on
    a thread, where it leaves the event loop free).
    """

    __slots__ = ("_access", "_sources", "targets")

    def __init__(self, message: pb.ModelInferRequest, metadata: Metadata, access: SharedMemoryAccess):
        super().__init__(message, metadata)
        self._access = access
        self._sources: Sequence[Source | None] | None = None
        self.targets: Mapping[str, OutputTarget] = {}

    def decode_elements(self, spec: ModelSpec) -> int:
        return super().decode_elements(spec) + input_bytes(self.message) // COPY_BYTES_PER_ELEMENT

    def attach(self, spec: ModelSpec, limits: RequestLimits) -> None:
        check_input_count(self.message, spec, limits.max_inputs)  # before a slice is taken for each
        self._sources = input_sources(self.message, spec.name, self._access)
        self.targets = output_targets(self.message.outputs, spec.name, self._access)

    def decode(self, spec: ModelSpec, limits: RequestLimits) -> DecodedRequest:
        if self._sources is None:
            self.attach(spec, limits)
        sources, self._sources = self._sources, None  # read once: the regions need not stay open for the inputs
        return decode_request(
            self.message,
            spec,
            limits.max_elements,
            max_rows=limits.max_rows,
            max_inputs=limits.max_inputs,
            sources=sources,
        )


def wire_request(message: pb.ModelInferRequest, metadata: Metadata, access: SharedMemoryAccess) -> WireRequest:
    """The request as the handler takes it: :class:`SharedMemoryWireRequest` when it names shared memory."""
    if names_shared_memory(message):
        return SharedMemoryWireRequest(message, metadata, access)
    return WireRequest(message, metadata)


def encode_answer(result: InferenceResult, request: WireRequest) -> pb.ModelInferResponse:
    """The response to ``request`` (:func:`encode_response`), its outputs in shared memory where it asked."""
    if isinstance(request, SharedMemoryWireRequest):
        return _encode(result, request.targets)
    return _encode(result, None)


def decode_request(
    request: pb.ModelInferRequest,
    spec: ModelSpec,
    max_elements: int,
    *,
    max_rows: int | None = None,
    max_inputs: int | None = None,
    sources: Sequence[Source | None] | None = None,
) -> DecodedRequest:
    """Validate ``request`` against ``spec`` and decode its tensors.

    ``max_elements`` bounds the elements of any one tensor, ``max_rows`` the
    batch dimension (besides the model's own ``max_batch_size``) and
    ``max_inputs`` the number of input tensors. ``sources``: each input's bytes
    when the request names shared memory (``input_sources``); otherwise they
    come from ``raw_input_contents``.
    """
    tensors = request.inputs
    check_input_count(request, spec, max_inputs)
    if sources is None:
        sources = _raw_sources(request, spec.name)
    inputs: Tensors = {}
    rows = -1
    for index, tensor in enumerate(tensors):
        name = tensor.name  # protobuf makes a new str at each read of a field
        ts = spec.input_by_name.get(name)
        if ts is None:
            raise InvalidArgument(
                f"unexpected inference input '{name}' for model '{spec.name}' (inputs: {_names(spec.inputs)})"
            )
        if name in inputs:
            raise InvalidArgument(f"{_where(spec, name)} appears twice")
        datatype = tensor.datatype
        if datatype != ts.datatype.name:
            raise InvalidArgument(
                f"inference input '{name}' data-type is '{datatype}', but model '{spec.name}' "
                f"expects '{ts.datatype.name}'"
            )
        shape = tuple(tensor.shape)
        count = _check_shape(shape, ts, spec, name, max_elements, max_rows)
        if spec.batches:
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidArgument(
                    f"{_where(spec, name)}: batch dimension {shape[0]} differs from the other inputs' {rows}"
                )
        data = sources[index] if sources else None
        if data is not None:
            array = _from_raw(data, ts.datatype, shape, count, spec, name)
        else:
            array = _from_contents(tensor, ts.datatype, shape, count, _where(spec, name))
        inputs[name] = array
    if len(inputs) != len(spec.inputs):
        raise InvalidArgument(_missing_inputs(spec, inputs))
    requested = request.outputs
    outputs = tuple(o.name for o in requested) if requested else ()
    for output in outputs:
        if output not in spec.output_by_name:
            raise InvalidArgument(
                f"unexpected inference output '{output}' for model '{spec.name}' (outputs: {_names(spec.outputs)})"
            )
    if len(outputs) > 1 and len(set(outputs)) != len(outputs):
        twice = next(name for i, name in enumerate(outputs) if name in outputs[:i])
        raise InvalidArgument(f"output '{twice}' already exists in request (model '{spec.name}')")
    classes = classification_counts(requested) if requested else {}
    check_classifiable(classes, spec)
    parameters = request.parameters
    sequence = sequence_params(parameters) if parameters else None
    return DecodedRequest(inputs, rows if spec.batches else 1, spec.batch_group(inputs), outputs, sequence, classes)


def check_input_count(request: pb.ModelInferRequest, spec: ModelSpec, max_inputs: int | None) -> None:
    if max_inputs is not None and len(request.inputs) > max_inputs:
        raise InvalidArgument(f"model {spec.name}: {len(request.inputs)} inputs, more than the limit of {max_inputs}")


def _where(spec: ModelSpec, name: str) -> str:
    """How an error names an input (built only when there is an error to name it in)."""
    return f"model {spec.name} input {name!r}"


def _raw_sources(request: pb.ModelInferRequest, model: str) -> Sequence[bytes]:
    """Every input's raw contents, or none (all typed); refuses a mix of the two."""
    raw = request.raw_input_contents
    if not raw:
        return ()
    tensors = request.inputs
    for tensor in tensors:
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"contents field must not be specified when using raw_input_contents for '{tensor.name}' "
                f"for model '{model}' (send every input raw, or every input as typed contents)"
            )
    if len(raw) != len(tensors):
        raise InvalidArgument(
            f"model {model}: {len(raw)} raw_input_contents for {len(tensors)} inputs; send raw data "
            "for every input or for none"
        )
    return raw


def _missing_inputs(spec: ModelSpec, given: Tensors) -> str:
    """Triton's words for missing inputs."""
    missing = [t.name for t in spec.inputs if t.name not in given]
    return (
        f"expected {len(spec.inputs)} inputs but got {len(given)} inputs for model '{spec.name}'. "
        f"Got input(s) {list(given)}, but missing required input(s) {missing}. Please provide all required input(s)."
    )


def _names(tensors: Sequence[TensorSpec]) -> list[str]:
    return [t.name for t in tensors]


def _check_shape(
    shape: tuple[int, ...], ts: TensorSpec, spec: ModelSpec, name: str, max_elements: int, max_rows: int | None
) -> int:
    """Check rank and dims against the spec; return the element count."""
    expected = ts.shape
    for d in shape:  # loops, not any(): no generator per request
        if d < 0:
            raise InvalidArgument(f"{_where(spec, name)}: shape {list(shape)} has a negative dimension")
    if len(shape) != len(expected):
        raise InvalidArgument(f"{_where(spec, name)}: shape {list(shape)}, expected {_pretty(expected)}")
    for d, e in zip(shape, expected, strict=True):
        if e >= 0 and d != e:
            raise InvalidArgument(f"{_where(spec, name)}: shape {list(shape)}, expected {_pretty(expected)}")
    if spec.batches:
        if not 1 <= shape[0] <= spec.max_batch_size:
            raise InvalidArgument(
                f"{_where(spec, name)}: batch of {shape[0]} rows; this model takes 1 to {spec.max_batch_size}"
            )
        if max_rows is not None and shape[0] > max_rows:
            raise InvalidArgument(
                f"{_where(spec, name)}: batch of {shape[0]} rows, more than the server's limit of {max_rows}"
            )
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidArgument(f"{_where(spec, name)}: {count} elements, more than the limit of {max_elements}")
    if count == 0 and max(shape, default=0) > max_elements:  # no elements, but no array has such a shape
        raise InvalidArgument(
            f"{_where(spec, name)}: shape {list(shape)} has a dimension over the limit of {max_elements} elements"
        )
    return count


def _pretty(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("-1" if d < 0 else str(d) for d in shape) + "]"


def _from_raw(
    data: Source, datatype: Datatype, shape: tuple[int, ...], count: int, spec: ModelSpec, name: str
) -> npt.NDArray[Any]:
    if datatype.name == BYTES:
        raw = data.read().data if isinstance(data, RegionSlice) else data
        return decode_bytes_tensor(raw, count, f"input '{name}' for model '{spec.name}'").reshape(shape)
    expected = count * datatype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input byte size mismatch for input '{name}' for model '{spec.name}'. Expected {expected}, "
            f"got {len(data)} (shape {list(shape)} of {datatype.name})"
        )
    if isinstance(data, RegionSlice):  # copied only now that its size is known to be right
        return data.read().view(datatype.numpy).reshape(shape)
    return np.frombuffer(data, dtype=datatype.numpy).reshape(shape)


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor,
    datatype: Datatype,
    shape: tuple[int, ...],
    count: int,
    where: str,
) -> npt.NDArray[Any]:
    field = datatype.contents_field
    if field is None:
        raise InvalidArgument(f"{where}: {datatype.name} has no typed contents field; send it raw")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{where}: {len(values)} values in contents.{field}, expected {count} for shape {list(shape)}"
        )
    if datatype.name == BYTES:
        return bytes_elements_to_array(values, where).reshape(shape)
    try:
        # Typed fields are wider than small ints (int_contents is int32 for INT8); refuse what overflows.
        wide = np.asarray(values, dtype=_CONTENTS_DTYPES[field])
        array = wide.astype(datatype.numpy)
        if datatype.numpy.kind in "iu" and not np.array_equal(wide, array):
            raise OverflowError
    except OverflowError:
        raise InvalidArgument(f"{where}: contents.{field} holds values outside {datatype.name}") from None
    return array.reshape(shape)


# The wire type of each typed contents field (int_contents carries INT8 and INT16 too).
_CONTENTS_DTYPES: dict[str, Any] = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


def request_timeout_us(request: pb.ModelInferRequest) -> int | None:
    """The ``timeout`` request parameter (microseconds), if any."""
    if "timeout" not in request.parameters:
        return None
    param = request.parameters["timeout"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or (value := getattr(param, kind)) < 0:
        raise InvalidArgument("parameter 'timeout' must be a non-negative integer of microseconds")
    return int(value)


def request_priority(request: pb.ModelInferRequest) -> int:
    """The ``priority`` request parameter (Triton's: 1 is the highest; 0 or none: the model's default)."""
    if "priority" not in request.parameters:
        return 0
    param = request.parameters["priority"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or (value := getattr(param, kind)) < 0:
        raise InvalidArgument("parameter 'priority' must be a non-negative integer (1 is the highest)")
    return int(value)


def encode_response(result: InferenceResult) -> pb.ModelInferResponse:
    """Build the response: the requested outputs (all when none named), raw little-endian,
    and how the request was routed as the ``infergate_route``/``infergate_shadowed`` parameters.

    An output held as Python objects is BYTES whatever the model's type: a BYTES
    output, or the classification strings that replaced a score tensor.
    """
    return _encode(result, None)


def _encode(result: InferenceResult, targets: Mapping[str, OutputTarget] | None) -> pb.ModelInferResponse:
    """:func:`encode_response`, with the outputs in ``targets`` written into their regions
    (their ``raw_output_contents`` entries are empty)."""
    spec, outputs = result.spec, result.outputs
    response = pb.ModelInferResponse()
    response.CopyFrom(_heading(spec.name, spec.version, result.decision.arm, result.shadowed))
    if result.id:
        response.id = result.id
    tensors, raw = response.outputs, response.raw_output_contents
    for name in result.requested or tuple(outputs):
        array = outputs[name]
        datatype = _BYTES if array.dtype == object else spec.output_by_name[name].datatype
        tensor = tensors.add(name=name, datatype=datatype.name, shape=array.shape)
        target = targets.get(name) if targets else None
        if target is not None:
            write_output(target, tensor, array, datatype)
            raw.append(b"")
        else:
            raw.append(encode_bytes_tensor(array) if datatype.name == BYTES else _raw_bytes(array, datatype))
    return response


@functools.lru_cache(maxsize=1024)
def _heading(model: str, version: int, arm: str, shadowed: bool) -> pb.ModelInferResponse:
    """What every response of one version and routing decision starts with: its name, version and
    the routing parameters. Copying it is about half the cost of setting them one by one (protobuf
    builds the two parameter messages each time), so each is built once; never modify one."""
    heading = pb.ModelInferResponse(model_name=model, model_version=str(version))
    heading.parameters[ROUTE_PARAMETER].string_param = arm
    heading.parameters[SHADOWED_PARAMETER].bool_param = shadowed
    return heading


_BYTES = DATATYPES[BYTES]


def _raw_bytes(array: npt.NDArray[Any], datatype: Datatype) -> bytes:
    if array.dtype != datatype.numpy:  # e.g. a big-endian machine; onnxruntime types match otherwise
        array = array.astype(datatype.numpy)
    return array.tobytes()
