"""A ModelStreamInfer client that writes and never reads cannot make the server hold its answers:
the stream stops reading requests after a bounded window, memory stays flat, and everything is
answered once the client reads.

The model answers 16 KiB per request; the client is a plain grpc.aio stub writing raw requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from conftest import ServerProcess, eventually, running_server
from models import save_model
from onnx import TensorProto, helper

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.serving.servicer import STREAM_WINDOW

WIDTH = 4096  # FP32: 16 KiB per request and per answer
MIB = 1024 * 1024


def identity() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("streams")
    save_model(identity(), repo, "wide", config_yaml="max_batch_size: 32\n")
    with running_server(repo, log_dir, "--metrics-port", "0") as started:
        yield started


def request(i: int) -> pb.ModelInferRequest:
    x = np.full((1, WIDTH), i, np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, WIDTH])
    return pb.ModelInferRequest(model_name="wide", id=str(i), inputs=[tensor], raw_input_contents=[x.tobytes()])


def rss(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_client_that_never_reads_pauses_its_stream_and_the_server_holds_a_bounded_window(
    server: ServerProcess,
) -> None:
    before = rss(server)
    async with grpc.aio.insecure_channel(server.url) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        written = 0

        async def write() -> None:
            nonlocal written
            for i in range(20_000):
                await call.write(request(i))
                written += 1

        writer = asyncio.create_task(write())
        try:
            await eventually(lambda: server.metric("infergate_streams_paused") == 1, "the stream paused")
            rows = server.metric("infergate_batch_size_sum", model="wide")
            grown = rss(server) - before
        finally:
            writer.cancel()
            call.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    assert rows <= STREAM_WINDOW * 2, f"{rows} requests ran for a client that read nothing"
    assert written < 20_000, "the client could write everything: nothing pushed back"
    assert grown < 50 * MIB, f"RSS grew {grown / MIB:.0f} MiB"
    await eventually(lambda: server.metric("infergate_streams_paused") == 0, "the cancelled stream released")


async def test_a_paused_stream_resumes_when_its_client_reads_and_every_request_is_answered_once(
    server: ServerProcess,
) -> None:
    count = STREAM_WINDOW * 4
    async with grpc.aio.insecure_channel(server.url) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()

        async def write() -> None:
            for i in range(count):
                await call.write(request(i))
            await call.done_writing()

        writer = asyncio.create_task(write())
        await eventually(lambda: server.metric("infergate_streams_paused") == 1, "the stream paused")
        answered: dict[str, float] = {}
        async for response in call:
            assert not response.error_message, response.error_message
            y = np.frombuffer(response.infer_response.raw_output_contents[0], np.float32)
            answered[response.infer_response.id] = float(y[0])
        await writer
    assert answered == {str(i): float(i) for i in range(count)}
