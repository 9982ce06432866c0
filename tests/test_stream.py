"""A stream's requests answered concurrently (serving/stream.py): draining, order, Triton's final flag.

On plain async iterators: the window, draining, order and cancellation of
``answer_concurrently``. Through a real server and tritonclient's streams (the
synchronous ``start_stream``/``async_stream_infer`` and the aio
``stream_infer``): answers come back in the order the requests were sent, as
Triton answers a non-decoupled model's requests on a stream (so a client that
sends no request ids pairs answers with requests by position), and every
answer carries Triton's ``triton_final_response`` parameter.

The order tests make the first request finish last without any timing: it goes
to ``held``, whose batcher runs only full batches of two (or after 10 s, a hang
guard), and the second row of that batch is sent only once the server has
answered the requests in between (ModelStatistics on another connection says so).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from conftest import WAIT_S, ServerProcess, eventually, running_server, wait_until
from models import save_model
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.demo import build_matmul16
from infergate.errors import InvalidArgument, Unavailable
from infergate.serving.stream import answer_concurrently
from load_tests.models import make_model

FINAL = "triton_final_response"

# --------------------------------------------------------------------------- answer_concurrently


async def test_draining_answers_every_request_read_even_one_still_waiting_for_room() -> None:
    """One slot, and a client that sends without end: the stream reads one request ahead of its window."""
    read: list[str] = []

    async def requests() -> AsyncIterator[str]:
        for number in itertools.count(1):
            read.append(f"r{number}")
            yield f"r{number}"

    async def answer(request: str) -> str:
        return request.upper()

    closing = asyncio.Event()
    stream = answer_concurrently(requests(), answer, window=1, closing=closing)
    assert await anext(stream) == "R1"
    await eventually(lambda: len(read) == 2, "the second request read, waiting for room")
    closing.set()  # the server drains
    answered = []
    with pytest.raises(Unavailable, match="shutting down"):
        async for response in stream:
            answered.append(response)
    assert answered == [name.upper() for name in read[1:]]  # whatever was read is answered, nothing more


async def test_answers_come_in_request_order_and_an_unfinished_first_one_holds_back_the_rest() -> None:
    """Three slots: r1 waits on a gate while r2 and r3 finish; the stream reads r4 (waiting for room)
    and no further, yields nothing until r1 is answered, then everything in order."""
    read: list[str] = []
    gate = asyncio.Event()
    finished: list[str] = []

    async def requests() -> AsyncIterator[str]:
        for number in range(1, 7):
            read.append(f"r{number}")
            yield f"r{number}"

    async def answer(request: str) -> str:
        if request == "r1":
            await gate.wait()
        finished.append(request)
        return request.upper()

    stream = answer_concurrently(requests(), answer, window=3)
    first = asyncio.ensure_future(anext(stream))
    await eventually(lambda: finished == ["r2", "r3"] and read == ["r1", "r2", "r3", "r4"], "r2, r3 answered")
    assert not first.done()  # r2 and r3 are answered, but r1 comes first
    gate.set()
    assert await first == "R1"
    assert [response async for response in stream] == ["R2", "R3", "R4", "R5", "R6"]


async def test_requests_that_fail_end_the_stream_with_their_error_after_every_answer_to_what_was_read() -> None:
    """A request that does not parse raises in the requests while r2 still runs (it waits for that raise):
    r2 is answered before the error, which the stream's consumer (the one that writes answers) gets
    to end the call with."""
    gate = asyncio.Event()

    async def requests() -> AsyncIterator[str]:
        yield "r1"
        yield "r2"
        gate.set()
        raise InvalidArgument("r3 does not parse")

    async def answer(request: str) -> str:
        if request == "r2":
            await gate.wait()
        return request.upper()

    stream = answer_concurrently(requests(), answer, window=3)
    assert [await anext(stream), await anext(stream)] == ["R1", "R2"]
    with pytest.raises(InvalidArgument, match="r3 does not parse"):
        await anext(stream)


async def test_a_stream_closed_while_its_first_answer_runs_cancels_every_answer_it_started() -> None:
    """The answers side waits on r1 while r2 and r3 run too: a client that cancels stops all three."""
    started: list[str] = []
    cancelled: list[str] = []

    async def requests() -> AsyncIterator[str]:
        for number in range(1, 4):
            yield f"r{number}"
        await asyncio.Event().wait()  # a client that keeps its stream open

    async def answer(request: str) -> str:
        started.append(request)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(request)
            raise
        raise AssertionError("never answered")

    stream = answer_concurrently(requests(), answer, window=8)
    first = asyncio.ensure_future(anext(stream))
    await eventually(lambda: len(started) == 3, "three answers running")
    first.cancel()  # the client cancels the call
    await asyncio.gather(first, return_exceptions=True)
    await stream.aclose()
    assert sorted(cancelled) == ["r1", "r2", "r3"]


# --------------------------------------------------------------------------- through a server and tritonclient

HELD = "max_batch_size: 2\ndynamic_batching: {preferred_batch_size: [2], max_queue_delay_microseconds: 10000000}\n"


def identity() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    return make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y]))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("stream-order")
    save_model(identity(), repo, "held", config_yaml=HELD)  # runs only full batches of 2 (or after 10 s)
    save_model(build_matmul16(), repo, "fast", config_yaml="max_batch_size: 8\n")
    with running_server(repo, log_dir) as started:
        yield started


def held_input(value: float) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    return tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))


def fast_input() -> grpcclient.InferInput:
    return grpcclient.InferInput("x", [1, 16], "FP32").set_data_from_numpy(np.ones((1, 16), np.float32))


def fast_answered(stats: grpcclient.InferenceServerClient) -> int:
    return int(stats.get_inference_statistics("fast").model_stats[0].inference_stats.success.count)


def position(item: Any) -> tuple[str, object]:
    """What a client that sent no request ids knows of an answer: its model and first value, or its error."""
    if isinstance(item, InferenceServerException):
        return ("error", item.message().split(":")[0])
    response = item.get_response()
    value = float(item.as_numpy("y")[0, 0]) if response.model_name == "held" else None
    return (response.model_name, value)


# held(1.0), an unknown model, fast, held(4.0): the first runs only with the last, after the two between.
IN_ORDER = [("held", 1.0), ("error", "Request for unknown model"), ("fast", None), ("held", 4.0)]


def test_sync_stream_answers_in_request_order_though_the_first_request_finishes_last(server: ServerProcess) -> None:
    received: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(server.url)
    stats = grpcclient.InferenceServerClient(server.url)
    try:
        before = fast_answered(stats)
        client.start_stream(callback=lambda result, error: received.put(error or result))
        client.async_stream_infer("held", [held_input(1.0)])  # no request ids: matched by position
        client.async_stream_infer("missing", [held_input(2.0)])
        client.async_stream_infer("fast", [fast_input()])
        wait_until(lambda: fast_answered(stats) == before + 1, "the server answered the third request")
        client.async_stream_infer("held", [held_input(4.0)])  # fills held's batch: the first request runs
        answers = [received.get(timeout=WAIT_S) for _ in IN_ORDER]
        client.stop_stream()
    finally:
        client.close()
        stats.close()
    assert [position(answer) for answer in answers] == IN_ORDER


async def test_aio_stream_answers_in_request_order_though_the_first_request_finishes_last(
    server: ServerProcess,
) -> None:
    client = aiogrpcclient.InferenceServerClient(server.url)
    stats = aiogrpcclient.InferenceServerClient(server.url)

    async def answered() -> int:
        return int((await stats.get_inference_statistics("fast")).model_stats[0].inference_stats.success.count)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        before = await answered()
        yield {"model_name": "held", "inputs": [held_input(1.0)]}
        yield {"model_name": "missing", "inputs": [held_input(2.0)]}
        yield {"model_name": "fast", "inputs": [fast_input()]}

        async def third_answered() -> bool:
            return await answered() == before + 1

        await eventually(third_answered, "the server answered the third request")
        yield {"model_name": "held", "inputs": [held_input(4.0)]}

    answers = []
    try:
        async for result, error in client.stream_infer(requests()):
            answers.append(position(error or result))
    finally:
        await client.close()
        await stats.close()
    assert answers == IN_ORDER


def test_every_streamed_answer_is_triton_final_response(server: ServerProcess) -> None:
    """Triton's client idiom (qa/L0_decoupled): count the responses flagged final."""
    received: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(server.url)
    try:
        client.start_stream(callback=lambda result, error: received.put(error or result))
        for number in range(3):
            client.async_stream_infer("fast", [fast_input()], request_id=str(number))
        answers = [received.get(timeout=WAIT_S) for _ in range(3)]
        client.stop_stream()
    finally:
        client.close()
    flags = [answer.get_response().parameters[FINAL].bool_param for answer in answers]
    assert [answer.get_response().id for answer in answers] == ["0", "1", "2"]
    assert flags == [True, True, True]


async def test_aio_streamed_answers_are_triton_final_response(server: ServerProcess) -> None:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        for number in range(2):
            yield {"model_name": "fast", "inputs": [fast_input()], "request_id": str(number)}

    client = aiogrpcclient.InferenceServerClient(server.url)
    try:
        responses = [result.get_response() async for result, error in client.stream_infer(requests())]
    finally:
        await client.close()
    assert [(r.id, FINAL in r.parameters and r.parameters[FINAL].bool_param) for r in responses] == [
        ("0", True),
        ("1", True),
    ]


async def test_an_error_answer_carries_its_request_and_triton_final_response(server: ServerProcess) -> None:
    """tritonclient hands a client only an error's message; the wire answer also says which request
    failed (its id, model and version) and that it is final, as Triton's answer to a failed inference."""
    bad = pb.ModelInferRequest(model_name="fast", model_version="1", id="bad")
    bad.inputs.add(name="x", datatype="FP64", shape=[1, 16])
    bad.raw_input_contents.append(np.ones((1, 16), np.float64).tobytes())
    async with grpc.aio.insecure_channel(server.url) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([bad]))
        (response,) = [response async for response in call]
    assert response.error_message.startswith("inference input 'x' data-type is 'FP64'"), response.error_message
    echo = response.infer_response
    assert (echo.id, echo.model_name, echo.model_version) == ("bad", "fast", "1")
    assert FINAL in echo.parameters and echo.parameters[FINAL].bool_param
