"""Open Inference Protocol messages to numpy and back, through the public codec functions.

The specs are built by hand (no ONNX file):

* ``classifier`` batches (max_batch_size 8): FP32 ``image`` [-1, 3], INT64 ``scale`` [-1, 2];
* ``fixed`` does not batch: FP32 ``image`` [2, 3];
* ``grid`` does not batch and has free dims: FP32 ``cells`` [-1, -1];
* ``sequences`` batches with variable inner dims: INT64 ``tokens`` and ``mask`` [-1, -1];
* ``typed`` has one input ``value`` [-1, 2] (or [2], not batching) of each datatype in turn.

Every refusal must be an InvalidArgument whose message names the model and the
tensor, so a client can tell what to fix.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import pytest

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument, Status
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.routing.router import Decision
from infergate.serving.codec import decode_request, encode_response, request_timeout_us
from infergate.serving.request import DecodedRequest, InferenceResult

MAX_ELEMENTS = 1_000_000

InputTensor: TypeAlias = pb.ModelInferRequest.InferInputTensor


def tensor_spec(name: str, datatype: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, DATATYPES[datatype], shape)


CLASSIFIER = ModelSpec(
    name="classifier",
    version=3,
    inputs=(tensor_spec("image", "FP32", (-1, 3)), tensor_spec("scale", "INT64", (-1, 2))),
    outputs=(
        tensor_spec("score", "FP32", (-1, 2)),
        tensor_spec("label", "BYTES", (-1,)),
        tensor_spec("count", "INT64", (-1,)),
    ),
    max_batch_size=8,
)

FIXED = ModelSpec(
    name="fixed",
    version=1,
    inputs=(tensor_spec("image", "FP32", (2, 3)),),
    outputs=(tensor_spec("score", "FP32", (2,)),),
    max_batch_size=0,
)

SEQUENCES = ModelSpec(
    name="sequences",
    version=1,
    inputs=(tensor_spec("tokens", "INT64", (-1, -1)), tensor_spec("mask", "INT64", (-1, -1))),
    outputs=(tensor_spec("logits", "FP32", (-1, -1)),),
    max_batch_size=8,
)


# A non-batching model whose every dimension is free.
GRID = ModelSpec(
    name="grid",
    version=1,
    inputs=(tensor_spec("cells", "FP32", (-1, -1)),),
    outputs=(tensor_spec("total", "FP32", (1,)),),
    max_batch_size=0,
)


def typed_spec(datatype: str, batching: bool = True) -> ModelSpec:
    """A model ``typed`` with one input ``value`` of ``datatype``: [-1, 2] or, not batching, [2]."""
    shape = (-1, 2) if batching else (2,)
    return ModelSpec(
        name="typed",
        version=1,
        inputs=(tensor_spec("value", datatype, shape),),
        outputs=(tensor_spec("out", datatype, shape),),
        max_batch_size=8 if batching else 0,
    )


# --------------------------------------------------------------------------- building requests


def length_prefixed(items: Sequence[bytes]) -> bytes:
    """BYTES on the wire: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def raw_bytes(datatype: str, values: Sequence[Any]) -> bytes:
    if datatype == "BYTES":
        return length_prefixed([v.encode() if isinstance(v, str) else v for v in values])
    return np.array(values, dtype=DATATYPES[datatype].numpy).tobytes()


def raw_input(name: str, datatype: str, shape: Sequence[int]) -> InputTensor:
    return InputTensor(name=name, datatype=datatype, shape=shape)


def typed_input(name: str, datatype: str, shape: Sequence[int], values: Sequence[Any]) -> InputTensor:
    tensor = InputTensor(name=name, datatype=datatype, shape=shape)
    field = DATATYPES[datatype].contents_field
    assert field is not None, f"{datatype} has no typed contents"
    if datatype == "BYTES":
        values = [v.encode() if isinstance(v, str) else v for v in values]
    getattr(tensor.contents, field).extend(values)
    return tensor


def request(
    *inputs: InputTensor, raw: Sequence[bytes] = (), outputs: Sequence[str] = (), id: str = ""
) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="ignored-by-the-codec",
        id=id,
        inputs=inputs,
        raw_input_contents=raw,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )


def image(rows: int = 2) -> InputTensor:
    return typed_input("image", "FP32", [rows, 3], [0.5] * (rows * 3))


def scale(rows: int = 2) -> InputTensor:
    return typed_input("scale", "INT64", [rows, 2], [1] * (rows * 2))


def encode(
    req: pb.ModelInferRequest, spec: ModelSpec, outputs: dict[str, Any], requested: tuple[str, ...]
) -> pb.ModelInferResponse:
    return encode_response(InferenceResult(spec, outputs, requested, Decision(spec.version, "default"), req.id))


def decode(req: pb.ModelInferRequest, spec: ModelSpec = CLASSIFIER) -> DecodedRequest:
    return decode_request(req, spec, MAX_ELEMENTS)


# --------------------------------------------------------------------------- valid inputs

# Each datatype with two values that probe its range (BOOL..FP64 and BYTES).
VALUES: dict[str, list[Any]] = {
    "BOOL": [True, False],
    "UINT8": [0, 255],
    "UINT16": [0, 65535],
    "UINT32": [0, 2**32 - 1],
    "UINT64": [0, 2**64 - 1],
    "INT8": [-128, 127],
    "INT16": [-32768, 32767],
    "INT32": [-(2**31), 2**31 - 1],
    "INT64": [-(2**63), 2**63 - 1],
    "FP16": [1.5, -65504.0],
    "FP32": [1.5, -3.25e38],
    "FP64": [1.5, -1.7e308],
    "BYTES": ["plain", "ünïcødé ✓"],
}
TYPED = [d for d in VALUES if DATATYPES[d].contents_field is not None]


def expected_array(datatype: str, values: list[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return np.array(values, dtype=object).reshape(shape)
    return np.array(values, dtype=DATATYPES[datatype].numpy).reshape(shape)


def assert_same_array(actual: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("datatype", list(VALUES))
@pytest.mark.parametrize("batching", [True, False], ids=["batching", "not batching"])
def test_raw_input_of_every_datatype_decodes_to_the_right_array(datatype: str, batching: bool) -> None:
    values = VALUES[datatype]
    shape = (1, 2) if batching else (2,)
    decoded = decode(
        request(raw_input("value", datatype, shape), raw=[raw_bytes(datatype, values)]),
        typed_spec(datatype, batching),
    )
    assert_same_array(decoded.inputs["value"], expected_array(datatype, values, shape))
    assert decoded.rows == 1


@pytest.mark.parametrize("datatype", TYPED)
@pytest.mark.parametrize("batching", [True, False], ids=["batching", "not batching"])
def test_typed_contents_of_every_datatype_but_fp16_decode_to_the_right_array(datatype: str, batching: bool) -> None:
    values = VALUES[datatype]
    shape = (1, 2) if batching else (2,)
    decoded = decode(request(typed_input("value", datatype, shape, values)), typed_spec(datatype, batching))
    assert_same_array(decoded.inputs["value"], expected_array(datatype, values, shape))


@pytest.mark.parametrize(
    "values", [[1, 2**63 + 1], [2**63, 2**64 - 1], [0, 2**64 - 1]], ids=["2^63+1", "2^63", "2^64-1"]
)
def test_uint64_typed_contents_keep_all_64_bits(values: list[int]) -> None:
    decoded = decode(request(typed_input("value", "UINT64", [1, 2], values)), typed_spec("UINT64"))
    assert decoded.inputs["value"].dtype == np.uint64
    assert decoded.inputs["value"].tolist() == [values]


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_a_batching_request_reports_its_batch_dimension_as_rows(rows: int) -> None:
    decoded = decode(request(image(rows), scale(rows)))
    assert decoded.rows == rows
    assert decoded.inputs["image"].shape == (rows, 3)
    assert decoded.inputs["scale"].shape == (rows, 2)
    assert decoded.outputs == ()


def test_a_non_batching_request_is_one_row_whatever_its_first_dimension() -> None:
    decoded = decode(request(typed_input("image", "FP32", [2, 3], range(6))), FIXED)
    assert decoded.rows == 1
    assert decoded.inputs["image"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_inputs_may_come_in_any_order_and_requested_outputs_are_kept() -> None:
    decoded = decode(request(scale(1), image(1), outputs=["label", "score"]))
    assert set(decoded.inputs) == {"image", "scale"}
    assert decoded.outputs == ("label", "score")


# --------------------------------------------------------------------------- refusals

Case = Callable[[], tuple[pb.ModelInferRequest, ModelSpec, int]]


def on_classifier(*inputs: InputTensor, raw: Sequence[bytes] = (), outputs: Sequence[str] = ()) -> Case:
    return lambda: (request(*inputs, raw=raw, outputs=outputs), CLASSIFIER, MAX_ELEMENTS)


def on_typed(datatype: str, tensor: InputTensor, raw: Sequence[bytes] = ()) -> Case:
    return lambda: (request(tensor, raw=raw), typed_spec(datatype), MAX_ELEMENTS)


def refusal(what: str, model: str, tensor: str | None, case: Case) -> Any:
    """A row: what is wrong, the model and tensor its message must name, the request."""
    return pytest.param(case, model, tensor, id=what)


BYTES_2 = raw_input("value", "BYTES", [1, 2])  # a BYTES input that should carry 2 elements

# fmt: off
REFUSALS = [
    refusal("unknown input", "classifier", "extra",
            on_classifier(image(), scale(), typed_input("extra", "FP32", [2], [1, 2]))),
    refusal("duplicate input", "classifier", "image", on_classifier(image(), image(), scale())),
    refusal("missing input", "classifier", "scale", on_classifier(image())),
    refusal("wrong datatype", "classifier", "image",
            on_classifier(typed_input("image", "FP64", [2, 3], [0] * 6), scale())),
    refusal("rank too low", "classifier", "image", on_classifier(typed_input("image", "FP32", [6], [0] * 6), scale())),
    refusal("rank too high", "classifier", "image",
            on_classifier(typed_input("image", "FP32", [2, 3, 1], [0] * 6), scale())),
    refusal("wrong fixed dim", "classifier", "image",
            on_classifier(typed_input("image", "FP32", [2, 4], [0] * 8), scale())),
    refusal("wrong first dim, not batching", "fixed", "image",
            lambda: (request(typed_input("image", "FP32", [3, 3], [0] * 9)), FIXED, MAX_ELEMENTS)),
    refusal("negative dim", "classifier", "scale",
            on_classifier(raw_input("image", "FP32", [2, 3]), raw_input("scale", "INT64", [2, -2]),
                          raw=[raw_bytes("FP32", [0] * 6), b""])),
    refusal("typed contents beside raw contents", "classifier", "image",
            on_classifier(image(), raw_input("scale", "INT64", [2, 2]),
                          raw=[raw_bytes("FP32", [0] * 6), raw_bytes("INT64", [1] * 4)])),
    refusal("negative dims whose product is positive", "grid", "cells",
            lambda: (request(typed_input("cells", "FP32", [-2, -3], [0] * 6)), GRID, MAX_ELEMENTS)),
    refusal("batch of 0", "classifier", "image", on_classifier(typed_input("image", "FP32", [0, 3], []), scale())),
    refusal("batch above max_batch_size", "classifier", "image", on_classifier(image(9), scale(9))),
    refusal("batch dims differ", "classifier", "scale", on_classifier(image(2), scale(3))),
    refusal("raw byte size mismatch", "classifier", "image",
            on_classifier(raw_input("image", "FP32", [2, 3]), raw_input("scale", "INT64", [2, 2]),
                          raw=[raw_bytes("FP32", [0] * 6)[:-1], raw_bytes("INT64", [0] * 4)])),
    # The count of raw contents is wrong for the request as a whole: no one tensor is at fault.
    refusal("fewer raw contents than inputs", "classifier", None,
            on_classifier(raw_input("image", "FP32", [2, 3]), raw_input("scale", "INT64", [2, 2]),
                          raw=[raw_bytes("FP32", [0] * 6)])),
    refusal("typed contents count mismatch", "classifier", "image",
            on_classifier(typed_input("image", "FP32", [2, 3], [0] * 5), scale())),
    refusal("INT8 value 300 overflows", "typed", "value",
            on_typed("INT8", typed_input("value", "INT8", [1, 2], [300, 1]))),
    refusal("INT8 value -129 overflows", "typed", "value",
            on_typed("INT8", typed_input("value", "INT8", [1, 2], [-129, 1]))),
    refusal("UINT16 value 65536 overflows", "typed", "value",
            on_typed("UINT16", typed_input("value", "UINT16", [1, 2], [65536, 1]))),
    refusal("FP16 via typed contents", "typed", "value", on_typed("FP16", raw_input("value", "FP16", [1, 2]))),
    refusal("BYTES truncated: fewer elements than the shape", "typed", "value",
            on_typed("BYTES", BYTES_2, raw=[length_prefixed([b"ab"])])),
    refusal("BYTES truncated: an element longer than the data", "typed", "value",
            on_typed("BYTES", BYTES_2, raw=[length_prefixed([b"ab"]) + struct.pack("<I", 9) + b"cd"])),
    refusal("BYTES overlong: data left after the shape", "typed", "value",
            on_typed("BYTES", BYTES_2, raw=[length_prefixed([b"ab", b"cd"]) + b"\x00"])),
    refusal("BYTES raw not UTF-8", "typed", "value",
            on_typed("BYTES", BYTES_2, raw=[length_prefixed([b"ab", b"\xff\xfe"])])),
    refusal("BYTES typed not UTF-8", "typed", "value",
            on_typed("BYTES", typed_input("value", "BYTES", [1, 2], [b"ab", b"\xc3("]))),
    refusal("more elements than max_elements", "classifier", "image",
            lambda: (request(image(2), scale(2)), CLASSIFIER, 5)),
    # No elements at all, yet numpy cannot make an array of that shape (its size overflows).
    refusal("a zero dim beside a huge one", "grid", "cells",
            lambda: (request(typed_input("cells", "FP32", [0, 2**62], [])), GRID, MAX_ELEMENTS)),
    refusal("a zero dim beside a huge one, raw", "grid", "cells",
            lambda: (request(raw_input("cells", "FP32", [0, 2**62]), raw=[b""]), GRID, MAX_ELEMENTS)),
    refusal("unknown requested output", "classifier", "heatmap",
            on_classifier(image(), scale(), outputs=["score", "heatmap"])),
    refusal("an output requested twice", "classifier", "score",
            on_classifier(image(), scale(), outputs=["score", "label", "score"])),
]
# fmt: on


@pytest.mark.parametrize(("case", "model", "tensor"), REFUSALS)
def test_a_bad_request_is_an_invalid_argument_naming_the_model_and_the_tensor(
    case: Case, model: str, tensor: str | None
) -> None:
    req, spec, max_elements = case()
    with pytest.raises(InvalidArgument) as refused:
        decode_request(req, spec, max_elements)
    assert refused.value.status is Status.INVALID_ARGUMENT
    message = str(refused.value)
    assert f"model {model}" in message or f"model '{model}'" in message  # infergate's words or Triton's
    if tensor is not None:
        assert f"'{tensor}'" in message


# --------------------------------------------------------------------------- batching groups


def sequences(tokens: Sequence[int], mask: Sequence[int], *, mask_first: bool = False) -> pb.ModelInferRequest:
    t = typed_input("tokens", "INT64", tokens, [0] * int(np.prod(tokens)))
    m = typed_input("mask", "INT64", mask, [0] * int(np.prod(mask)))
    return request(m, t) if mask_first else request(t, m)


@pytest.mark.parametrize("rows", [1, 4])
def test_requests_to_a_model_with_fixed_inner_dims_all_share_the_group_none(rows: int) -> None:
    assert decode(request(image(rows), scale(rows))).group is None


@pytest.mark.parametrize(
    ("first", "second", "same_group"),
    [
        pytest.param(sequences([1, 5], [1, 5]), sequences([3, 5], [3, 5]), True, id="only the batch dim differs"),
        pytest.param(sequences([1, 5], [1, 5]), sequences([1, 7], [1, 7]), False, id="inner dims differ"),
        pytest.param(sequences([1, 5], [1, 5]), sequences([1, 5], [1, 6]), False, id="one input's inner dims differ"),
        pytest.param(
            sequences([1, 3], [1, 5]),
            sequences([1, 5], [1, 3], mask_first=True),
            False,
            id="inner dims swapped between inputs sent in the other order",
        ),
    ],
)
def test_requests_share_a_group_exactly_when_every_input_has_the_same_inner_dims(
    first: pb.ModelInferRequest, second: pb.ModelInferRequest, same_group: bool
) -> None:
    a, b = decode(first, SEQUENCES), decode(second, SEQUENCES)
    assert a.group is not None and b.group is not None
    assert (a.group == b.group) is same_group


# --------------------------------------------------------------------------- responses


def split_length_prefixed(data: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        items.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


OUTPUTS = {
    "score": np.array([[0.25, 0.75], [1.0, -2.5]], dtype=np.float32),
    "label": np.array(["cat", "ünï"], dtype=object),
    "count": np.array([7, -(2**40)], dtype=np.int64),
}


def test_a_response_echoes_the_request_id_and_names_the_model_and_version() -> None:
    response = encode(request(image(), scale(), id="req-7"), CLASSIFIER, OUTPUTS, ())
    assert (response.id, response.model_name, response.model_version) == ("req-7", "classifier", "3")


def test_a_response_carries_every_output_raw_when_none_was_requested() -> None:
    response = encode(request(image(), scale()), CLASSIFIER, OUTPUTS, ())
    assert [o.name for o in response.outputs] == ["score", "label", "count"]
    assert len(response.raw_output_contents) == 3
    assert not any(o.HasField("contents") for o in response.outputs)


@pytest.mark.parametrize("name", ["score", "count"])
def test_numeric_outputs_round_trip_through_raw_output_contents(name: str) -> None:
    response = encode(request(image(), scale()), CLASSIFIER, OUTPUTS, (name,))
    (out,) = response.outputs
    (raw,) = response.raw_output_contents
    datatype = DATATYPES[out.datatype]
    assert out.datatype == CLASSIFIER.output_by_name[name].datatype.name
    decoded = np.frombuffer(raw, dtype=datatype.numpy).reshape(tuple(out.shape))
    assert_same_array(decoded, OUTPUTS[name])


def test_bytes_outputs_are_length_prefixed_utf8() -> None:
    response = encode(request(image(), scale()), CLASSIFIER, OUTPUTS, ("label",))
    (out,) = response.outputs
    (raw,) = response.raw_output_contents
    assert (out.name, out.datatype, list(out.shape)) == ("label", "BYTES", [2])
    assert raw == b"\x03\x00\x00\x00cat" + struct.pack("<I", 5) + "ünï".encode()
    assert [item.decode() for item in split_length_prefixed(raw)] == ["cat", "ünï"]


def test_only_the_requested_outputs_are_returned_in_the_requested_order() -> None:
    response = encode(request(image(), scale()), CLASSIFIER, OUTPUTS, ("count", "score"))
    assert [o.name for o in response.outputs] == ["count", "score"]
    assert len(response.raw_output_contents) == 2


@pytest.mark.parametrize("datatype", list(VALUES))
def test_every_datatype_decoded_from_raw_encodes_back_to_the_same_bytes(datatype: str) -> None:
    spec = typed_spec(datatype)
    wire = raw_bytes(datatype, VALUES[datatype])
    decoded = decode(request(raw_input("value", datatype, [1, 2]), raw=[wire]), spec)
    response = encode(request(), spec, {"out": decoded.inputs["value"]}, ())
    assert response.raw_output_contents == [wire]
    assert (response.outputs[0].datatype, list(response.outputs[0].shape)) == (datatype, [1, 2])


# --------------------------------------------------------------------------- timeout parameter


def with_timeout(**param: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest()
    req.parameters["timeout"].CopyFrom(pb.InferParameter(**param))
    return req


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        pytest.param(pb.ModelInferRequest(), None, id="absent"),
        pytest.param(with_timeout(int64_param=1500), 1500, id="int64"),
        pytest.param(with_timeout(uint64_param=2**40), 2**40, id="uint64"),
        pytest.param(with_timeout(int64_param=0), 0, id="zero"),
    ],
)
def test_the_timeout_parameter_is_read_in_microseconds(req: pb.ModelInferRequest, expected: int | None) -> None:
    assert request_timeout_us(req) == expected


@pytest.mark.parametrize(
    "req",
    [
        pytest.param(with_timeout(int64_param=-1), id="negative"),
        pytest.param(with_timeout(string_param="100"), id="string"),
        pytest.param(with_timeout(double_param=1.5), id="double"),
        pytest.param(with_timeout(bool_param=True), id="bool"),
        pytest.param(with_timeout(), id="no value set"),
    ],
)
def test_a_timeout_parameter_that_is_not_a_non_negative_integer_is_an_invalid_argument(
    req: pb.ModelInferRequest,
) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        request_timeout_us(req)


def test_a_bytes_shape_larger_than_its_data_could_hold_is_refused_before_allocating() -> None:
    spec = ModelSpec(
        name="texts",
        version=1,
        inputs=(tensor_spec("value", "BYTES", (-1, -1)),),
        outputs=(tensor_spec("out", "BYTES", (-1, -1)),),
        max_batch_size=8,
    )
    claim = request(raw_input("value", "BYTES", [1, 50_000_000]), raw=[length_prefixed([b"ab"])])
    with pytest.raises(
        InvalidArgument, match=r"input 'value' for model 'texts': 6 bytes cannot hold 50000000 BYTES elements"
    ):
        decode_request(claim, spec, max_elements=100_000_000)
