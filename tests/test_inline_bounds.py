"""A model that runs its batches on the event loop runs there only batches as large as the one timed at load.

Its warm-up shapes say nothing of a later request: with a variable dimension
the load times one element, and a request of millions would hold the event
loop for its whole run. The server here is embedded: it serves on this test's
own event loop, so a ticker task on that loop sees whether the loop kept
turning while such a request ran.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from models import save_model
from onnx import TensorProto, helper

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.config import ServerConfig
from infergate.server import InferGateServer

ELEMENTS = 250_000  # 1 MB over the wire: the run, not the bytes, is most of the call
ROUNDS = 256  # of Sin and Cos over every element


def build_heavy() -> onnx.ModelProto:
    """``ROUNDS`` of Sin and Cos over ``x`` [b, n], then a sum: work in proportion to the elements, on one thread."""
    nodes, last = [], "x"
    for i in range(ROUNDS):
        nodes += [helper.make_node("Sin", [last], [f"s{i}"]), helper.make_node("Cos", [f"s{i}"], [f"c{i}"])]
        last = f"c{i}"
    nodes.append(helper.make_node("ReduceSum", [last], ["y"], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[InferGateServer]:
    # A bound far above the load's one-element run, so that the model is judged tiny however busy the machine.
    config = "max_batch_size: 0\ninstance_group: {inline_max_microseconds: 10000}\n"
    save_model(build_heavy(), tmp_path, "heavy", config_yaml=config)
    server = InferGateServer(ServerConfig(model_repository=tmp_path, port=0))
    await server.start()
    try:
        assert await server.load_models()
        yield server
    finally:
        await server.stop()


async def test_a_request_larger_than_the_batch_timed_at_load_runs_off_the_event_loop(
    embedded: InferGateServer,
) -> None:
    """No wall-clock bound: the loop's longest pause is compared with the call's own length."""
    assert embedded.repository.catalog.get("heavy").runner.inline, "judged tiny at load"
    x = np.full((1, ELEMENTS), 0.5, np.float32)
    request = pb.ModelInferRequest(
        model_name="heavy",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{embedded.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        turns: list[float] = []
        call = asyncio.ensure_future(stub.ModelInfer(request, timeout=120))
        started = time.perf_counter()
        while not call.done():
            await asyncio.sleep(0)
            turns.append(time.perf_counter())
        reply = await call
    one = np.float32(0.5)
    for _ in range(ROUNDS):
        one = np.cos(np.sin(one))
    expected = one * ELEMENTS
    assert np.frombuffer(reply.raw_output_contents[0], np.float32)[0] == pytest.approx(expected, rel=1e-3)
    gaps = np.diff([started, *turns])
    # On the loop, the run (most of the call) would be one pause; on its thread the loop keeps turning.
    assert gaps.max() < (turns[-1] - started) / 4, f"the loop stopped for {gaps.max():.3f} s"
