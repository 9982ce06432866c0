"""The server's count of inference calls in progress, which the batchers read to decide whether to gather.

A batch gathers (lets the loop turn so that requests on their way can join)
only while the server holds calls that are not yet queued or running in its
batcher (tests/test_batcher.py specifies that rule). The count comes from
admission: unary calls one each, and an open ModelStreamInfer as unbounded,
since a stream can send any number of requests. A real in-process server on
127.0.0.1 and a real grpc.aio client.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from conftest import eventually

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.config import ServerConfig
from infergate.server import InferGateServer

HANG_GUARD_S = 60.0


def _request() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="matmul16",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[np.ones(16, dtype=np.float32).tobytes()],
    )


async def test_an_open_stream_counts_as_unbounded_and_every_call_is_released(demo_repository: Path) -> None:
    server = InferGateServer(ServerConfig(model_repository=demo_repository, port=0))
    await server.start()
    await server.load_models()
    try:
        admission = server.admission
        assert admission.calls_in_progress() == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(_request(), timeout=HANG_GUARD_S)
            await eventually(lambda: admission.calls_in_progress() == 0, "the unary call released")

            more = asyncio.Queue[pb.ModelInferRequest | None]()

            async def requests() -> AsyncIterator[pb.ModelInferRequest]:
                while (request := await more.get()) is not None:
                    yield request

            stream = stub.ModelStreamInfer(requests(), timeout=HANG_GUARD_S)
            more.put_nowait(_request())
            answer = await stream.read()
            assert not answer.error_message
            assert admission.calls_in_progress() == sys.maxsize  # open: it may send more at any time
            more.put_nowait(None)
            assert await stream.read() == grpc.aio.EOF
            await eventually(lambda: admission.calls_in_progress() == 0, "the stream released")
            assert admission.streams == 0
    finally:
        await server.stop(grace=5)
