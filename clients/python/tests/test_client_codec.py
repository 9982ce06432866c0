"""Request building and reply decoding: pure functions, checked by table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from infergate_client import InferRequest, InvalidArgument
from infergate_client._codec import (
    build_infer_request,
    datatype_of,
    decode_infer_response,
    decode_parameters,
    encode_parameters,
)
from infergate_client._proto import grpc_service_pb2 as pb


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.array([True]), "BOOL"),
        (np.array([1], np.uint8), "UINT8"),
        (np.array([1], np.uint16), "UINT16"),
        (np.array([1], np.uint32), "UINT32"),
        (np.array([1], np.uint64), "UINT64"),
        (np.array([1], np.int8), "INT8"),
        (np.array([1], np.int16), "INT16"),
        (np.array([1], np.int32), "INT32"),
        (np.array([1], np.int64), "INT64"),
        (np.array([1], np.float16), "FP16"),
        (np.array([1], np.float32), "FP32"),
        (np.array([1], np.float64), "FP64"),
        (np.array(["text"]), "BYTES"),
        (np.array([b"raw"]), "BYTES"),
        (np.array([b"raw", "text"], dtype=object), "BYTES"),
    ],
)
def test_each_numpy_dtype_has_its_datatype(array: np.ndarray[Any, Any], datatype: str) -> None:
    assert datatype_of(array) == datatype


def test_dtypes_without_a_datatype_are_refused() -> None:
    with pytest.raises(TypeError, match="complex"):
        datatype_of(np.array([1j]))


def _reply_for(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What an echoing server would answer: each input back as an output of the same name."""
    reply = pb.ModelInferResponse(model_name=request.model_name, model_version="3", id=request.id)
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        reply.raw_output_contents.append(raw)
    return reply


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([[True, False]]),
        np.array([[1.5, -2.0]], dtype=np.float16),
        np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2],  # not contiguous
        np.array([[b"a", b""], [b"\xff\x00", b"long" * 10]], dtype=object),
    ],
)
def test_inputs_come_back_unchanged_through_raw_contents(array: np.ndarray[Any, Any]) -> None:
    request = build_infer_request(InferRequest("m", {"t": array}, request_id="r1"))
    result = decode_infer_response(_reply_for(request))
    assert result["t"].shape == array.shape
    assert result["t"].tolist() == array.tolist()
    assert (result.model_name, result.model_version, result.request_id) == ("m", "3", "r1")


def test_str_inputs_travel_as_utf8_bytes() -> None:
    request = build_infer_request(InferRequest("m", {"t": np.array(["é"])}))
    assert request.raw_input_contents[0] == b"\x02\x00\x00\x00\xc3\xa9"


def test_the_request_carries_version_outputs_and_parameters() -> None:
    request = build_infer_request(
        InferRequest("m", {"x": np.zeros(1)}, outputs=["y"], parameters={"p": 7}, model_version=2)
    )
    assert request.model_version == "2"
    assert [o.name for o in request.outputs] == ["y"]
    assert request.parameters["p"].int64_param == 7


def test_a_request_needs_an_input() -> None:
    with pytest.raises(InvalidArgument, match="at least one input") as caught:
        build_infer_request(InferRequest("m", {}))
    assert caught.value.code is None and isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("request_", "message", "cause"),
    [
        (InferRequest("m", {"x": np.array([1j])}), "infer\\('m'\\): input 'x': numpy dtype complex128", TypeError),
        (InferRequest("m", {"x": np.zeros(1)}, parameters={"p": np.int64(3)}), "parameter 'p': int64", TypeError),
        (InferRequest("m", {"x": np.zeros(1)}, parameters={"p": 2**70}), "infer\\('m'\\): ", ValueError),
        (InferRequest("m", {"x": [[1, 2], [3]]}), "input 'x': setting an array element", ValueError),
    ],
)
def test_a_request_that_cannot_be_encoded_is_refused_with_its_cause(
    request_: InferRequest, message: str, cause: type[Exception]
) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        build_infer_request(request_)
    assert caught.value.code is None and isinstance(caught.value.__cause__, cause)


@pytest.mark.parametrize(
    ("value", "field"),
    [(True, "bool_param"), (3, "int64_param"), (2.5, "double_param"), ("s", "string_param")],
)
def test_parameters_keep_their_type(value: Any, field: str) -> None:
    request = pb.ModelInferRequest()
    encode_parameters({"k": value}, request.parameters)
    assert request.parameters["k"].WhichOneof("parameter_choice") == field
    assert decode_parameters(request.parameters) == {"k": value}


def test_typed_contents_are_decoded_too() -> None:
    reply = pb.ModelInferResponse()
    reply.outputs.add(name="y", datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, 2, 3, 4])
    assert decode_infer_response(reply)["y"].tolist() == [[1, 2], [3, 4]]


def test_a_reply_whose_bytes_do_not_fit_its_shape_is_refused() -> None:
    reply = pb.ModelInferResponse()
    reply.outputs.add(name="y", datatype="FP32", shape=[4])
    reply.raw_output_contents.append(b"\x00" * 8)
    with pytest.raises(ValueError, match="2 elements for shape"):
        decode_infer_response(reply)
