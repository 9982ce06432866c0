"""The ``limits:`` block on a real server: bad or greedy requests are refused, nobody else suffers.

The server runs with tight limits so each one is easy to cross: rows per
request, inputs per request, elements per tensor, message size, and HTTP/2
streams per connection.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, running_server

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

HANG_GUARD_S = 30.0  # a call that takes this long is a hang; not a performance bound
Tensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def limited(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("limits")
    config = directory / "server.yaml"
    limits = {
        "max_batch_rows": 2,
        "max_inputs_per_request": 2,
        "max_elements_per_tensor": 32,
        "max_concurrent_streams": 1,
    }
    config.write_text(json.dumps({"max_receive_message_bytes": 4096, "limits": limits}))
    with running_server(demo_repository, directory, "--config", str(config)) as server:
        yield server


@pytest.fixture
def stub(limited: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(limited.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def matmul(rows: int) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="matmul16",
        inputs=[Tensor(name="x", datatype="FP32", shape=[rows, 16])],
        raw_input_contents=[np.ones((rows, 16), dtype=np.float32).tobytes()],
    )


def refusal(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=HANG_GUARD_S)
    error: Any = caught.value
    return error.code(), error.details()


def test_requests_within_the_limits_are_served(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ModelInfer(matmul(2), timeout=HANG_GUARD_S).outputs[0].shape == [2, 16]


def test_more_rows_than_the_server_allows_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    code, message = refusal(stub, matmul(3))  # matmul16 itself takes 64
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "server's limit of 2" in message


def test_more_inputs_than_the_server_allows_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = matmul(1)
    request.inputs.extend([request.inputs[0], request.inputs[0]])
    request.raw_input_contents.extend([request.raw_input_contents[0]] * 2)
    code, message = refusal(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "3 inputs, more than the limit of 2" in message


def test_a_tensor_with_more_elements_than_allowed_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[Tensor(name="x", datatype="FP32", shape=[1, 512])],
    )
    request.inputs[0].contents.fp32_contents.extend([0.0] * 512)
    code, message = refusal(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "512 elements, more than the limit of 32" in message


def test_a_message_over_the_size_limit_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = matmul(1)
    request.raw_input_contents[0] = bytes(8192)
    assert refusal(stub, request)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ModelInfer(matmul(1), timeout=HANG_GUARD_S).outputs  # the connection is still good


def test_streams_beyond_the_per_connection_limit_wait_for_a_free_one(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    feed = _Feed()
    held = stub.ModelStreamInfer(feed, timeout=HANG_GUARD_S)
    feed.send(matmul(1))
    assert next(held).error_message == ""  # the one allowed stream is open
    # Never admitted while the other stream is open, however long it waits: the deadline only ends the wait.
    code, _ = refusal_with_deadline(stub, matmul(1), 1.0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    feed.close()
    assert list(held) == []
    assert stub.ModelInfer(matmul(1), timeout=HANG_GUARD_S).outputs


def refusal_with_deadline(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, deadline: float
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=deadline)
    error: Any = caught.value
    return error.code(), error.details()


class _Feed:
    """A request iterator the test feeds by hand and closes when it wants the stream to end."""

    def __init__(self) -> None:
        self._queue: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def send(self, request: pb.ModelInferRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> pb.ModelInferRequest:
        item = self._queue.get(timeout=HANG_GUARD_S)
        if item is None:
            raise StopIteration
        return item
