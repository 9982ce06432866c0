"""Triton's system shared-memory extension, through tritonclient's own ``utils.shared_memory`` and a real server.

The client creates POSIX shared-memory regions with ``tritonclient.utils.shared_memory``
(unique keys per test, destroyed afterwards), registers them, and names them in its
inputs and requested outputs; the server reads the inputs in place and writes the
outputs into the regions. Requests that tritonclient cannot build (parameters it
would never send) go through the raw gRPC stub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from conftest import ServerProcess, eventually, launch_server, running_server, wait_until
from models import build_slow_model, save_model
from security import SECRET, claims, token
from triton_models import write_triton_repository
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

import infergate
from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.demo import build_matmul16

Handles = dict[str, Any]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shm-models")
    write_triton_repository(root, ["simple", "simple_string"])
    save_model(build_matmul16(), root, "matmul16", config_yaml="max_batch_size: 8\n")
    # Runs only full batches of 8 (or after 10 s): a request waits in the queue until 7 more come.
    held = "max_batch_size: 8\ndynamic_batching: {preferred_batch_size: [8], max_queue_delay_microseconds: 10000000}\n"
    save_model(build_slow_model(1), root, "held", config_yaml=held)
    return root


def _config(directory: Path, **extra: Any) -> Path:
    path = directory / "server.yaml"
    system = {"enabled": True, "max_regions": 6, "max_bytes": 1 << 20}
    path.write_text(json.dumps({"shared_memory": {"system": system}, **extra}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("shm-server")
    with running_server(repository, directory, "--config", str(_config(directory)), "--metrics-port", "0") as s:
        yield s


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.unregister_system_shared_memory()  # whatever a test left registered
    c.close()


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def unique_key() -> str:
    return f"/infergate-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def regions(client: grpcclient.InferenceServerClient, headers: Any = None, **sizes: int) -> Iterator[Handles]:
    """Create, register, and finally unregister and destroy one region per ``name=byte_size``."""
    handles: Handles = {}
    try:
        for name, size in sizes.items():
            key = unique_key()
            handles[name] = shm.create_shared_memory_region(name, key, size)
            client.register_system_shared_memory(name, key, size, headers=headers)
        yield handles
    finally:
        for handle in handles.values():
            shm.destroy_shared_memory_region(handle)


def shm_input(name: str, shape: list[int], datatype: str, region: str, size: int, offset: int = 0) -> Any:
    return grpcclient.InferInput(name, shape, datatype).set_shared_memory(region, size, offset=offset)


def shm_output(name: str, region: str, size: int, offset: int = 0) -> grpcclient.InferRequestedOutput:
    output = grpcclient.InferRequestedOutput(name)
    output.set_shared_memory(region, size, offset=offset)
    return output


def wire_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    return grpcclient.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array)


def refusal(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), str(caught.value.message())


# --------------------------------------------------------------------------- round trips


def test_server_metadata_lists_the_extension(client: grpcclient.InferenceServerClient) -> None:
    assert "system_shared_memory" in client.get_server_metadata().extensions
    assert "cuda_shared_memory" not in client.get_server_metadata().extensions


def test_fp32_inputs_and_outputs_go_through_shared_memory(client: grpcclient.InferenceServerClient) -> None:
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    with regions(client, frames=64 + x.nbytes, scores=x.nbytes) as r:
        shm.set_shared_memory_region(r["frames"], [x], offset=64)
        result = client.infer(
            "matmul16",
            [shm_input("x", [2, 16], "FP32", "frames", x.nbytes, offset=64)],
            outputs=[shm_output("y", "scores", x.nbytes)],
        )
        y = shm.get_contents_as_numpy(
            r["scores"], np.float32, [2, 16]
        ).copy()  # the region goes at the end of the block
        expected = client.infer("matmul16", [wire_input("x", x, "FP32")]).as_numpy("y")
    np.testing.assert_array_equal(y, expected)
    response = result.get_response()
    assert list(response.raw_output_contents) == [b""]  # no bytes over the wire
    params = response.outputs[0].parameters
    assert params["shared_memory_region"].string_param == "scores"
    assert params["shared_memory_byte_size"].int64_param == x.nbytes
    assert list(response.outputs[0].shape) == [2, 16]


def test_shared_memory_and_raw_tensors_mix_in_one_request(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    with regions(client, ins=a.nbytes, outs=2 * a.nbytes) as r:
        shm.set_shared_memory_region(r["ins"], [a])
        result = client.infer(
            "simple",
            [shm_input("INPUT0", [1, 16], "INT32", "ins", a.nbytes), wire_input("INPUT1", b, "INT32")],
            outputs=[grpcclient.InferRequestedOutput("OUTPUT0"), shm_output("OUTPUT1", "outs", a.nbytes, a.nbytes)],
        )
        difference = shm.get_contents_as_numpy(r["outs"], np.int32, [1, 16], offset=a.nbytes).copy()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)  # raw: its entry is where it belongs
    np.testing.assert_array_equal(difference, a - b)
    assert result.get_output("OUTPUT1").parameters["shared_memory_offset"].int64_param == a.nbytes


def test_bytes_inputs_and_outputs_go_through_shared_memory(client: grpcclient.InferenceServerClient) -> None:
    a = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    b = np.array([[b"10"] * 16], dtype=np.object_)
    first, second = serialize_byte_tensor(a), serialize_byte_tensor(b)
    size_a, size_b = first.item().__len__(), second.item().__len__()
    with regions(client, strings=size_a + size_b, sums=256, diffs=256) as r:
        shm.set_shared_memory_region(r["strings"], [first, second])
        result = client.infer(
            "simple_string",
            [
                shm_input("INPUT0", [1, 16], "BYTES", "strings", size_a),
                shm_input("INPUT1", [1, 16], "BYTES", "strings", size_b, offset=size_a),
            ],
            outputs=[shm_output("OUTPUT0", "sums", 256), shm_output("OUTPUT1", "diffs", 256)],
        )
        sums = shm.get_contents_as_numpy(r["sums"], np.object_, [1, 16])
        diffs = shm.get_contents_as_numpy(r["diffs"], np.object_, [1, 16])
    assert [int(s) for s in sums[0]] == [i + 10 for i in range(16)]
    assert [int(s) for s in diffs[0]] == [i - 10 for i in range(16)]
    written = result.get_output("OUTPUT0").parameters["shared_memory_byte_size"].int64_param
    assert written == len(serialize_byte_tensor(sums).item())


def test_status_lists_the_regions_and_unregister_takes_them_away(client: grpcclient.InferenceServerClient) -> None:
    with regions(client, a=64, b=128):
        everything = client.get_system_shared_memory_status()
        assert {
            name: (s.byte_size, s.offset, s.key.startswith("/infergate-test-"))
            for name, s in everything.regions.items()
        } == {
            "a": (64, 0, True),
            "b": (128, 0, True),
        }
        assert list(client.get_system_shared_memory_status("b").regions) == ["b"]
        client.unregister_system_shared_memory("a")
        client.unregister_system_shared_memory("a")  # again: nothing to do, as in Triton
        status, message = refusal(lambda: client.get_system_shared_memory_status("a"))
        assert (status, message) == ("StatusCode.NOT_FOUND", "Unable to find system shared memory region: 'a'")
        status, message = refusal(lambda: client.infer("matmul16", [shm_input("x", [1, 16], "FP32", "a", 64)]))
        assert (status, message) == ("StatusCode.NOT_FOUND", "Unable to find shared memory region: 'a'")
        client.unregister_system_shared_memory()
        assert not client.get_system_shared_memory_status().regions


# --------------------------------------------------------------------------- refusals


def test_what_cannot_be_registered(client: grpcclient.InferenceServerClient) -> None:
    spare = shm.create_shared_memory_region("spare", unique_key(), 64)  # a file nobody registered
    try:
        with regions(client, base=64) as r:
            key, other = r["base"]._shm_key, spare._shm_key
            cases = [
                (("base", other, 8), "INVALID_ARGUMENT", "shared memory region 'base' already in manager"),
                (("other", key, 8), "INVALID_ARGUMENT", f'registering an active shared memory key, "{key}"'),
                (("other", "/a/b", 8), "INVALID_ARGUMENT", "Unable to open shared memory region: '/a/b'"),
                (("other", "/../etc/passwd", 8), "INVALID_ARGUMENT", "Unable to open shared memory region"),
                (("other", unique_key(), 8), "INVALID_ARGUMENT", "(No such file or directory)"),
                (
                    ("other", other, 8, 60),
                    "INVALID_ARGUMENT",
                    "failed to register shared memory region 'other': invalid args",
                ),
                (("big", other, 2 << 20), "FAILED_PRECONDITION", "shared_memory.system.max_bytes"),
            ]
            for args, code, fragment in cases:
                status, message = refusal(lambda args=args: client.register_system_shared_memory(*args))
                assert status == f"StatusCode.{code}" and fragment in message, (args, status, message)
            assert list(client.get_system_shared_memory_status().regions) == ["base"]
    finally:
        shm.destroy_shared_memory_region(spare)


def test_the_number_of_regions_is_bounded(client: grpcclient.InferenceServerClient) -> None:
    with regions(client, **{f"r{i}": 8 for i in range(6)}):
        handle = shm.create_shared_memory_region("seventh", unique_key(), 8)
        try:
            status, message = refusal(lambda: client.register_system_shared_memory("seventh", handle._shm_key, 8))
        finally:
            shm.destroy_shared_memory_region(handle)
    assert status == "StatusCode.FAILED_PRECONDITION"
    assert "6 regions are registered, the server's limit (shared_memory.system.max_regions)" in message


def _request(inputs: list[pb.ModelInferRequest.InferInputTensor], **kwargs: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="matmul16", inputs=inputs, **kwargs)


def _x(shape: tuple[int, ...] = (2, 16), **params: Any) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)
    for key, value in params.items():
        field = "string_param" if isinstance(value, str) else "int64_param"
        setattr(tensor.parameters[key], field, value)
    return tensor


def _y(**params: Any) -> pb.ModelInferRequest.InferRequestedOutputTensor:
    tensor = pb.ModelInferRequest.InferRequestedOutputTensor(name="y")
    for key, value in params.items():
        setattr(tensor.parameters[key], "string_param" if isinstance(value, str) else "int64_param", value)
    return tensor


IN = {"shared_memory_region": "frames", "shared_memory_byte_size": 128}
BAD_REQUESTS = [
    pytest.param(
        _request([_x(shared_memory_region="nope", shared_memory_byte_size=128)]),
        grpc.StatusCode.NOT_FOUND,
        "Unable to find shared memory region: 'nope'",
        id="unknown region",
    ),
    pytest.param(
        _request([_x(**IN, shared_memory_offset=256)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Invalid offset for shared memory region: 'frames'",
        id="offset past the region",
    ),
    pytest.param(
        _request([_x(**IN, shared_memory_offset=128)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shared memory region 'frames' holds 192 bytes: 128 bytes at offset 128 for input 'x' for model 'matmul16'",
        id="bytes past the region's end",
    ),
    pytest.param(
        _request([_x(shared_memory_region="frames", shared_memory_byte_size=64)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input byte size mismatch for input 'x' for model 'matmul16'. Expected 128, got 64",
        id="byte size of another shape",
    ),
    pytest.param(
        _request([_x(**IN)], outputs=[_y(shared_memory_region="scores", shared_memory_byte_size=64)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shared memory size specified with the request for output 'y' (64 bytes) should be at least 128 bytes",
        id="output region too small",
    ),
    pytest.param(
        _request(
            [_x(**IN)], outputs=[_y(shared_memory_region="scores", shared_memory_byte_size=128, classification=2)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "output can't set both 'shared_memory_region' and 'classification'",
        id="classification into shared memory",
    ),
    pytest.param(
        _request([_x(shared_memory_byte_size=128)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'shared_memory_byte_size' can not be specified without 'shared_memory_region' parameter for tensor 'x'",
        id="byte size without a region",
    ),
    pytest.param(
        _request([_x(shared_memory_region="frames")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for tensor 'x'",
        id="region without a byte size",
    ),
    pytest.param(
        _request([_x(shared_memory_region=7, shared_memory_byte_size=128)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid value type for 'shared_memory_region' parameter for tensor 'x', expected string_param.",
        id="region name that is not a string",
    ),
    pytest.param(
        _request([_x(**IN)], raw_input_contents=[bytes(128)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model matmul16: 1 raw_input_contents for the 0 inputs sent raw",
        id="raw contents for an input in shared memory",
    ),
]


@pytest.mark.parametrize(("request_", "code", "fragment"), BAD_REQUESTS)
def test_a_bad_shared_memory_request_is_refused_and_the_server_keeps_serving(
    client: grpcclient.InferenceServerClient,
    stub: pb_grpc.GRPCInferenceServiceStub,
    request_: pb.ModelInferRequest,
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    x = np.ones((2, 16), dtype=np.float32)
    with regions(client, frames=192, scores=128) as r:
        shm.set_shared_memory_region(r["frames"], [x])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request_, timeout=30)
        error: Any = caught.value
        assert error.code() == code and fragment in error.details(), error.details()
        good = stub.ModelInfer(
            _request([_x(**IN)], outputs=[_y(shared_memory_region="scores", shared_memory_byte_size=128)])
        )
        assert list(good.raw_output_contents) == [b""]


def test_contents_beside_a_region_are_refused_in_tritons_words(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    tensor = _x(**IN)
    tensor.contents.fp32_contents.extend([1.0] * 32)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_request([tensor]), timeout=30)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        error.details()
        == "unexpected 'content' provided when using shared memory for input tensor 'x' for model 'matmul16'"
    )


# --------------------------------------------------------------------------- lifetime


def _holds(server: ServerProcess, handle: Any) -> bool:
    """Does the server process map the file of this region, or hold a descriptor of it, now?"""
    target = "/dev/shm/" + handle._shm_key.lstrip("/")
    if target in Path(f"/proc/{server.process.pid}/maps").read_text():
        return True
    descriptors = Path(f"/proc/{server.process.pid}/fd")
    return any(os.readlink(fd).startswith(target) for fd in descriptors.iterdir() if fd.is_symlink())


async def test_a_region_unregistered_while_its_request_waits_is_still_read_and_written(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    """The request was given its input when it arrived, and keeps the file of its output region open until
    it is answered.

    It waits in the queue of ``held`` until seven more requests fill its batch: nothing here depends on
    how long a model runs (an earlier version raced a one-second model on a busy machine)."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with regions(client, held_in=16, held_out=16) as r:
        shm.set_shared_memory_region(r["held_in"], [x])
        async with aioclient.InferenceServerClient(server.url) as aio:
            inputs = [aioclient.InferInput("x", [1, 4], "FP32").set_shared_memory("held_in", 16)]
            outputs = [aioclient.InferRequestedOutput("y")]
            outputs[0].set_shared_memory("held_out", 16)
            waiting = asyncio.create_task(aio.infer("held", inputs, outputs=outputs))
            await eventually(lambda: server.queued("held") == 1, "the shm request queued")
            client.unregister_system_shared_memory()
            assert not client.get_system_shared_memory_status().regions
            with pytest.raises(InferenceServerException, match="Unable to find shared memory region: 'held_in'"):
                await aio.infer("held", inputs)
            assert not _holds(server, r["held_in"])  # read when the request came
            assert _holds(server, r["held_out"])  # held by the queued request
            assert not waiting.done()
            fillers = [aioclient.InferInput("x", [1, 4], "FP32").set_data_from_numpy(np.zeros((1, 4), np.float32))]
            await asyncio.gather(*(aio.infer("held", fillers) for _ in range(7)))  # the batch of 8 runs
            result = await waiting
        np.testing.assert_array_equal(shm.get_contents_as_numpy(r["held_out"], np.float32, [1, 4]), x)
        assert result.get_output("y").parameters["shared_memory_region"].string_param == "held_out"
        await eventually(lambda: not _holds(server, r["held_out"]), "the output region's file closed")


@pytest.mark.parametrize("shrunk", ["input", "output"])
async def test_a_file_shrunk_while_its_request_waits_does_not_bring_the_server_down(
    server: ServerProcess, client: grpcclient.InferenceServerClient, shrunk: str
) -> None:
    """A client may shrink its file at any time: reading or writing a mapping past the end of its file
    would end the server (SIGBUS). The server reads an input out of its region when the request arrives,
    into memory of its own, so the request is answered from the bytes it came with; an output region
    whose file no longer covers it is refused when the answer would be written."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with regions(client, shrink_in=16, shrink_out=16) as r:
        shm.set_shared_memory_region(r["shrink_in"], [x])
        async with aioclient.InferenceServerClient(server.url) as aio:
            inputs = [aioclient.InferInput("x", [1, 4], "FP32").set_shared_memory("shrink_in", 16)]
            outputs = [aioclient.InferRequestedOutput("y")]
            outputs[0].set_shared_memory("shrink_out", 16)
            waiting = asyncio.create_task(aio.infer("held", inputs, outputs=outputs))
            await eventually(lambda: server.queued("held") == 1, "the shm request queued")
            os.truncate("/dev/shm/" + r[f"shrink_{'in' if shrunk == 'input' else 'out'}"]._shm_key.lstrip("/"), 0)
            fillers = [aioclient.InferInput("x", [1, 4], "FP32").set_data_from_numpy(np.zeros((1, 4), np.float32))]
            await asyncio.gather(*(aio.infer("held", fillers) for _ in range(7)))  # the batch of 8 runs
            if shrunk == "input":
                await waiting
                np.testing.assert_array_equal(shm.get_contents_as_numpy(r["shrink_out"], np.float32, [1, 4]), x)
            else:
                with pytest.raises(InferenceServerException, match="shrank to 0 bytes since it was registered"):
                    await waiting
            # A request that comes after the file shrank is refused, and the server serves on.
            with pytest.raises(InferenceServerException, match="shrank to 0 bytes since it was registered"):
                await aio.infer("held", inputs, outputs=outputs, client_timeout=30)
        result = client.infer("matmul16", [wire_input("x", np.ones((1, 16), np.float32), "FP32")])
        assert result.as_numpy("y").shape == (1, 16)


def _stream_error(url: str, request: pb.ModelInferRequest) -> str:
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        (answer,) = list(stub.ModelStreamInfer(iter([request]), timeout=30))
    return str(answer.error_message)


SCORES = {"shared_memory_region": "scores", "shared_memory_byte_size": 128}
FAILING = [
    pytest.param(
        "unary",
        _request([_x(**IN)], outputs=[_y(shared_memory_region="scores", shared_memory_byte_size=64)]),
        "should be at least 128 bytes",
        id="output region too small",
    ),
    pytest.param(
        "unary",
        _request([_x(shared_memory_region="frames", shared_memory_byte_size=64)], outputs=[_y(**SCORES)]),
        "input byte size mismatch",
        id="input byte size mismatch",
    ),
    pytest.param("unary", _request([_x(shape=(2, 15), **IN)], outputs=[_y(**SCORES)]), "shape [2, 15]", id="bad shape"),
    pytest.param(
        "stream",
        _request([_x(shape=(2, 15), **IN)], outputs=[_y(**SCORES)]),
        "shape [2, 15]",
        id="bad shape, streamed",
    ),
]


@pytest.mark.parametrize(("via", "request_", "fragment"), FAILING)
def test_a_failed_request_lets_go_of_its_regions_when_they_are_unregistered(
    server: ServerProcess,
    client: grpcclient.InferenceServerClient,
    stub: pb_grpc.GRPCInferenceServiceStub,
    via: str,
    request_: pb.ModelInferRequest,
    fragment: str,
) -> None:
    """Nothing of a region outlives its registration and the requests that used it, failed ones included:
    a client that destroys its file then gets its memory back."""
    with regions(client, frames=192, scores=128) as r:
        shm.set_shared_memory_region(r["frames"], [np.ones((2, 16), dtype=np.float32)])
        if via == "unary":
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request_, timeout=30)
            error: Any = caught.value
            details = str(error.details())
        else:
            details = _stream_error(server.url, request_)
        assert fragment in details, details
        client.unregister_system_shared_memory()
        wait_until(lambda: not _holds(server, r["frames"]) and not _holds(server, r["scores"]), "regions let go")


# --------------------------------------------------------------------------- switched off, and auth


def test_a_server_without_the_switch_says_how_to_turn_it_on(demo_server: ServerProcess) -> None:
    with grpcclient.InferenceServerClient(demo_server.url) as client:
        assert "system_shared_memory" not in client.get_server_metadata().extensions
        status, message = refusal(lambda: client.register_system_shared_memory("r", "/k", 8))
        assert status == "StatusCode.UNIMPLEMENTED"
        assert f"the system_shared_memory extension is off on this infergate {infergate.__version__}" in message
        assert "--allow-client-shm" in message
        status, message = refusal(lambda: client.infer("matmul16", [shm_input("x", [1, 16], "FP32", "r", 64)]))
        assert (
            status == "StatusCode.UNIMPLEMENTED"
            and "input 'x' for model 'matmul16' names shared memory region 'r'" in message
        )
        # CUDA regions can never be registered, so there are none to list or to unregister.
        assert not client.get_cuda_shared_memory_status().regions
        client.unregister_cuda_shared_memory()
        status, message = refusal(lambda: client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 8))
        assert status == "StatusCode.UNIMPLEMENTED" and "cuda_shared_memory extension is not implemented" in message


def test_cuda_shared_memory_is_refused_naming_the_extensions_the_server_has(
    client: grpcclient.InferenceServerClient,
) -> None:
    extensions = client.get_server_metadata().extensions
    assert "system_shared_memory" in extensions and "logging" in extensions
    status, message = refusal(lambda: client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 8))
    assert status == "StatusCode.UNIMPLEMENTED"
    assert message.endswith(f"(ServerMetadata lists the extensions it implements: {', '.join(extensions)})")


@pytest.fixture(scope="module")
def auth_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("shm-auth")
    auth = {"enabled": True, "algorithms": ["HS256"], "secret_env": "INFERGATE_TEST_JWT_SECRET"}
    config = _config(directory, auth={**auth, "issuer": claims()["iss"], "audience": claims()["aud"]})
    server = launch_server(
        repository, directory, "--config", str(config), env={"INFERGATE_TEST_JWT_SECRET": SECRET.decode()}
    )
    try:
        yield server
    finally:
        assert server.terminate() == 0, server.log()


def _bearer(scope: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token(SECRET, 'HS256', claims(scope))}"}


def test_with_auth_shared_memory_needs_its_own_permission(auth_server: ServerProcess) -> None:
    allowed, infer_only = _bearer("infer:* shared_memory"), _bearer("infer:* metadata")
    x = np.ones((1, 16), dtype=np.float32)
    with grpcclient.InferenceServerClient(auth_server.url) as client:
        status, message = refusal(
            lambda: client.register_system_shared_memory("r", unique_key(), 64, headers=infer_only)
        )
        assert status == "StatusCode.PERMISSION_DENIED"
        assert message == "SystemSharedMemoryRegister needs permission 'shared_memory'"
        with regions(client, headers=allowed, frames=64) as r:
            shm.set_shared_memory_region(r["frames"], [x])
            inputs = [shm_input("x", [1, 16], "FP32", "frames", 64)]
            result = client.infer("matmul16", inputs, headers=allowed)
            assert result.as_numpy("y").shape == (1, 16)
            status, message = refusal(lambda: client.infer("matmul16", inputs, headers=infer_only))
            assert status == "StatusCode.PERMISSION_DENIED" and "needs permission 'shared_memory'" in message
            client.unregister_system_shared_memory(headers=allowed)
    events = [
        json.loads(line.split("infergate.audit: ", 1)[1])
        for line in auth_server.logged('"method": "SystemSharedMemoryUnregister"').splitlines()
        if "infergate.audit" in line
    ]
    assert [(a["detail"]["method"], a["outcome"]) for a in events if a["event"] == "admin"] == [
        ("SystemSharedMemoryRegister", "PERMISSION_DENIED"),
        ("SystemSharedMemoryRegister", "OK"),
        ("SystemSharedMemoryUnregister", "OK"),
    ]
