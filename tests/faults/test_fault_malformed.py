"""A request that is not a valid protobuf message gets INVALID_ARGUMENT naming the method, on every RPC,
and the server keeps serving everyone else.

Raw bytes go through plain grpc channels (no serializer), so the server's own
parser meets them; without the guard, gRPC answers UNKNOWN with a Python class name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import infergate_admin_pb2 as apb

TRUNCATED = b"\x0a\x05abc"  # field 1, five bytes long, with only three to read


def methods() -> Iterator[MethodDescriptor]:
    for service in (
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        apb.DESCRIPTOR.services_by_name["InferGateAdmin"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ):
        yield from service.methods


def call(channel: grpc.Channel, method: MethodDescriptor, body: bytes) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:
        responses = channel.stream_stream(path)(iter([body]), timeout=30)
        for _ in responses:
            pass
    elif method.server_streaming:
        for _ in channel.unary_stream(path)(body, timeout=30):
            pass
    else:
        channel.unary_unary(path)(body, timeout=30)


@pytest.mark.parametrize("method", list(methods()), ids=lambda m: m.name)
def test_bytes_that_do_not_parse_are_an_invalid_argument_naming_the_method(
    demo_server: ServerProcess, method: MethodDescriptor
) -> None:
    with grpc.insecure_channel(demo_server.url) as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel, method, TRUNCATED)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    details = caught.value.details() or ""
    assert details.startswith(f"{method.name}: the request is not a valid {method.input_type.full_name} message")
    assert "class" not in details


def test_random_bytes_as_a_model_infer_body_are_refused_and_the_server_keeps_serving(
    demo_server: ServerProcess,
) -> None:
    garbage = np.random.default_rng(12).bytes(4096)
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(garbage)  # the premise: these bytes do not parse
    with grpc.insecure_channel(demo_server.url) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(garbage, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client = grpcclient.InferenceServerClient(demo_server.url)
    x = grpcclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    assert client.infer("matmul16", [x]).as_numpy("y").shape == (1, 16)
    client.close()


def matmul16_request() -> bytes:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])
    x = np.ones((1, 16), np.float32)
    return pb.ModelInferRequest(
        model_name="matmul16", inputs=[tensor], raw_input_contents=[x.tobytes()]
    ).SerializeToString()


async def valid_then_junk(stream: Any, wait_for_the_answer: bool) -> grpc.aio.AioRpcError:
    """One stream: a valid request, then bytes that do not parse (once the answer is read, or at once);
    the error the stream ends with, once the valid request's answer came."""
    answered = asyncio.Event()

    async def requests() -> AsyncIterator[bytes]:
        yield matmul16_request()
        if wait_for_the_answer:
            await answered.wait()
        yield TRUNCATED

    answers = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for answer in stream(requests(), timeout=60):  # a hang guard: a stream left open fails the test
            answers.append(pb.ModelStreamInferResponse.FromString(answer))
            answered.set()
    assert [a.error_message for a in answers] == [""]
    return caught.value


@pytest.mark.parametrize("wait_for_the_answer", [True, False], ids=["after-the-answer", "right-behind"])
async def test_junk_behind_a_valid_request_ends_every_stream_with_its_answer_then_invalid_argument_and_no_traceback(
    demo_server: ServerProcess, wait_for_the_answer: bool
) -> None:
    logged_before = len(demo_server.log())
    async with grpc.aio.insecure_channel(demo_server.url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        errors = await asyncio.gather(*(valid_then_junk(stream, wait_for_the_answer) for _ in range(50)))
    assert {(e.code(), (e.details() or "").split(" (")[0]) for e in errors} == {
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "ModelStreamInfer: the request is not a valid inference.ModelInferRequest message",
        )
    }
    log = demo_server.log()[logged_before:]
    assert "Traceback" not in log and "UsageError" not in log and "ERROR" not in log
