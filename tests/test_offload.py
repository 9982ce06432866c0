"""Per-element work a request can make large (BYTES, classification) runs off the event loop when it is.

The server here is embedded: it serves on this test's own event loop, so a
ticker task on that loop sees whether the loop kept turning while a request
of a million BYTES elements was being decoded.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import WAIT_S, MakeFile, eventually

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.config import ServerConfig
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.server import InferGateServer
from infergate.serving.codec import WireRequest
from infergate.serving.handler import InferenceHandler
from infergate.serving.offload import ELEMENTS_ON_LOOP, class_strings, object_elements
from infergate.serving.request import DecodedRequest, RequestLimits

Tensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture
async def embedded(demo_repository: Path, tmp_path: Path) -> AsyncIterator[InferGateServer]:
    """An embedded server of the demo's identity_all model alone, with system shared memory on."""
    shutil.copytree(demo_repository / "identity_all", tmp_path / "identity_all")
    shared_memory = {"system": {"enabled": True}}
    server = InferGateServer(ServerConfig(model_repository=tmp_path, port=0, shared_memory=shared_memory))
    await server.start()
    try:
        assert await server.load_models()
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def identity(embedded: InferGateServer) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{embedded.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def bytes_request(count: int) -> pb.ModelInferRequest:
    """identity_all with ``count`` empty BYTES elements and none of its other inputs: refused once decoded."""
    return pb.ModelInferRequest(
        model_name="identity_all",
        inputs=[Tensor(name="in_BYTES", datatype="BYTES", shape=[1, count])],
        raw_input_contents=[struct.pack("<I", 0) * count],
    )


async def test_decoding_a_million_bytes_elements_leaves_the_event_loop_free(
    identity: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    await assert_loop_kept_turning(identity, bytes_request(1_000_000))


async def test_a_million_bytes_elements_read_from_shared_memory_are_decoded_off_the_event_loop_too(
    identity: pb_grpc.GRPCInferenceServiceStub, make_file: MakeFile
) -> None:
    """The regions are taken on the loop, which owns the registry; the elements are decoded on a thread."""
    size = 4 * 1_000_000
    key = make_file(struct.pack("<I", 0) * 1_000_000)
    await identity.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="words", key=key, offset=0, byte_size=size)
    )
    request = bytes_request(1_000_000)
    del request.raw_input_contents[:]
    parameters = request.inputs[0].parameters
    parameters["shared_memory_region"].string_param = "words"
    parameters["shared_memory_byte_size"].int64_param = size
    await assert_loop_kept_turning(identity, request)


async def test_a_large_input_in_shared_memory_is_copied_off_the_event_loop(
    identity: pb_grpc.GRPCInferenceServiceStub, make_file: MakeFile
) -> None:
    """The server copies an input out of its region into memory of its own; 64 MiB of it is copied on a thread."""
    count = 16 * 1024 * 1024
    key = make_file(bytes(4 * count))
    await identity.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="floats", key=key, offset=0, byte_size=4 * count)
    )
    request = pb.ModelInferRequest(
        model_name="identity_all", inputs=[Tensor(name="in_FP32", datatype="FP32", shape=[1, count])]
    )
    parameters = request.inputs[0].parameters
    parameters["shared_memory_region"].string_param = "floats"
    parameters["shared_memory_byte_size"].int64_param = 4 * count
    await assert_loop_kept_turning(identity, request)


async def assert_loop_kept_turning(identity: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> None:
    """``request`` (refused once decoded, for its missing inputs) leaves the loop turning while it decodes.

    No wall-clock bound: the loop's longest pause is compared with the call's own length.
    """
    turns: list[float] = []
    call = asyncio.ensure_future(identity.ModelInfer(request, timeout=120))
    started = time.perf_counter()
    while not call.done():
        await asyncio.sleep(0)
        turns.append(time.perf_counter())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # decoded in full, then: inputs missing
    assert "missing required input" in str(refused.value.details())
    gaps = np.diff([started, *turns])
    # On the loop, the decoding (most of the call) would be one pause; on a thread, the loop gets the
    # interpreter back every switch interval.
    assert gaps.max() < (turns[-1] - started) / 4, f"the loop stopped for {gaps.max():.3f} s"


async def test_a_large_bytes_tensor_decoded_and_encoded_on_threads_comes_back_whole(
    identity: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    count = 2 * ELEMENTS_ON_LOOP  # past the bound both ways: the input decoded, the output encoded, on threads
    request = identity_request([f"w{i}".encode() for i in range(count)])
    reply = await identity.ModelInfer(request, timeout=120)
    assert list(reply.outputs[0].shape) == [1, count]
    assert reply.raw_output_contents[0] == request.raw_input_contents[list(DATATYPES).index("BYTES")]


def identity_request(words: list[bytes]) -> pb.ModelInferRequest:
    """identity_all with ``words`` as its BYTES input and one zero for every other input; asks for out_BYTES."""
    inputs, contents = [], []
    for name, datatype in DATATYPES.items():
        if name == "BYTES":
            inputs.append(Tensor(name="in_BYTES", datatype="BYTES", shape=[1, len(words)]))
            contents.append(b"".join(struct.pack("<I", len(w)) + w for w in words))
        else:
            inputs.append(Tensor(name=f"in_{name}", datatype=name, shape=[1, 1]))
            contents.append(np.zeros(1, dtype=datatype.numpy).tobytes())
    request = pb.ModelInferRequest(model_name="identity_all", inputs=inputs, raw_input_contents=contents)
    request.outputs.add(name="out_BYTES")
    return request


class HeldDecode(WireRequest):
    """A real ModelInfer request, taken as large, whose decoding (on its thread) waits for the test."""

    def __init__(self, message: pb.ModelInferRequest):
        super().__init__(message, lambda: ())
        self.entered, self.release = threading.Event(), threading.Event()
        self.decodes = 0

    def decode_elements(self, spec: ModelSpec) -> int:
        return ELEMENTS_ON_LOOP + 1

    def decode(self, spec: ModelSpec, limits: RequestLimits) -> DecodedRequest:
        self.decodes += 1
        self.entered.set()
        self.release.wait(WAIT_S)
        return super().decode(spec, limits)


async def test_a_reload_while_a_request_decodes_on_its_thread_sends_it_to_the_version_now_serving(
    embedded: InferGateServer, tmp_path: Path
) -> None:
    """A version takes new work only in the step that routes to it; the decoding's await is not that step."""
    catalog = embedded.repository.catalog
    handler = InferenceHandler(catalog, RequestLimits(), embedded.shadows)
    request = HeldDecode(identity_request(words=[b"a", b"b"]))
    call = asyncio.create_task(handler.infer(request, None))
    try:
        await eventually(request.entered.is_set, "the decoding started")
        before = catalog.get("identity_all")
        model_file = tmp_path / "identity_all" / "1" / "model.onnx"
        os.utime(model_file, ns=(time.time_ns(), model_file.stat().st_mtime_ns + 10**9))  # a new file there
        await embedded.repository.reconcile("identity_all")
        assert catalog.get("identity_all") is not before  # the version it was routed to is switched out
    finally:
        request.release.set()
    result = await call
    assert result.outputs["out_BYTES"].tolist() == [["a", "b"]]
    assert request.decodes == 2  # decoded again, for the version that serves now


def spec(*inputs: tuple[str, str], batches: bool = True) -> ModelSpec:
    tensors = tuple(TensorSpec(name, DATATYPES[datatype], (-1, -1)) for name, datatype in inputs)
    return ModelSpec("m", 1, tensors, (TensorSpec("y", DATATYPES["FP32"], (-1, 10)),), 8 if batches else 0)


def test_the_work_counted_is_the_elements_converted_one_by_one() -> None:
    text = spec(("text", "BYTES"), ("x", "FP32"))
    request = pb.ModelInferRequest(
        model_name="m",
        inputs=[Tensor(name="text", datatype="BYTES", shape=[2, 300]), Tensor(name="x", datatype="FP32", shape=[2, 5])],
    )
    assert WireRequest(request, lambda: ()).decode_elements(text) == 600  # the FP32 input is one copy
    assert WireRequest(request, lambda: ()).decode_elements(spec(("x", "FP32"))) == 0  # no BYTES: not even looked at
    outputs = {"scores": np.zeros((4, 1000), np.float32), "labels": np.array([["a"] * 3] * 4, dtype=object)}
    assert object_elements(outputs) == 12
    assert class_strings(outputs, {"scores": 5}, text) == 4 * 5
    assert class_strings(outputs, {"scores": 10**9}, text) == 4 * 1000  # no more classes than scores
    assert class_strings(outputs, {"scores": 3}, spec(("x", "FP32"), batches=False)) == 3  # one row
