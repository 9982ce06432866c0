"""The SDK's BYTES tensors through its real codec functions: what an object array sends, and malformed
BYTES outputs refused with a ValueError naming the output and what is wrong (as a numeric size mismatch is)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from infergate_client import InferRequest
from infergate_client._codec import build_infer_request, decode_infer_response
from infergate_client._proto import grpc_service_pb2 as pb


def _element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _sent(value: np.ndarray[Any, Any]) -> bytes:
    message = build_infer_request(InferRequest("m", {"text": value}))
    assert message.inputs[0].datatype == "BYTES"
    return bytes(message.raw_input_contents[0])


def _reply(shape: list[int], raw: bytes) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name="m")
    reply.outputs.add(name="words", datatype="BYTES", shape=shape)
    reply.raw_output_contents.append(raw)
    return reply


def test_objects_that_are_not_bytes_or_str_are_sent_as_their_text() -> None:
    """As Triton's client sends them: ``str(obj)`` in UTF-8, not ``bytes(3)`` (three NUL bytes)."""
    value = np.array([1, "a", 3, 2.5, b"\x00raw", np.int64(7), "é"], dtype=object)
    expected = [b"1", b"a", b"3", b"2.5", b"\x00raw", b"7", "é".encode()]
    assert _sent(value) == b"".join(_element(item) for item in expected)


def test_a_large_int_is_sent_as_its_digits() -> None:
    assert _sent(np.array([10**15], dtype=object)) == _element(b"1000000000000000")


def test_well_formed_bytes_outputs_decode() -> None:
    result = decode_infer_response(_reply([2], _element(b"abcde") + _element(b"")))
    assert result["words"].tolist() == [b"abcde", b""]


def test_an_element_longer_than_the_data_left_is_refused() -> None:
    raw = _element(b"abcde") + struct.pack("<I", 10) + b"xy"
    with pytest.raises(ValueError) as caught:
        decode_infer_response(_reply([2], raw))
    assert str(caught.value) == "output 'words': BYTES element 1 of 2 says 10 bytes but 2 follow its length"


def test_elements_past_the_shapes_count_are_refused() -> None:
    raw = _element(b"abcde") + _element(b"xy")
    with pytest.raises(ValueError) as caught:
        decode_infer_response(_reply([1], raw))
    assert str(caught.value) == "output 'words': 6 bytes left over after the 1 BYTES element(s) of shape [1]"
