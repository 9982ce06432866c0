"""A request that is not a valid protobuf message gets INVALID_ARGUMENT naming the method, on every RPC,
and the server keeps serving everyone else.

Raw bytes go through plain grpc channels (no serializer), so the server's own
parser meets them; without the guard, gRPC answers UNKNOWN with a Python class name.
"""

from __future__ import annotations

from collections.abc import Iterator

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
