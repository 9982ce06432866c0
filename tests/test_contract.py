"""What any tritonclient user can rely on, checked against a real server.

Each behaviour is checked with tritonclient's synchronous client
(``tritonclient.grpc``) and its asyncio client (``tritonclient.grpc.aio``) — the
``client`` fixture runs a test once per flavour behind the same ``await``.
A few checks go through infergate's own generated stubs, for what tritonclient
cannot send (typed ``contents`` instead of raw bytes).

The server is the shared ``demo_server`` (see conftest.py); statistics are
compared before and after, so other tests' traffic does not matter.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from conftest import TritonClient
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.demo import IDENTITY_DATATYPES

DEMO_MODELS = ["matmul16", "mlp", "cnn", "multi_io", "identity_all"]

# name -> ([(input, datatype, shape)], [(output, datatype, shape)]), shapes as the protocol reports them.
METADATA: dict[str, tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]] = {
    "matmul16": ([("x", "FP32", [-1, 16])], [("y", "FP32", [-1, 16])]),
    "mlp": ([("x", "FP32", [-1, 512])], [("y", "FP32", [-1, 512])]),
    "cnn": ([("image", "FP32", [-1, 3, 64, 64])], [("probabilities", "FP32", [-1, 10])]),
    "multi_io": (
        [("a", "FP32", [-1, 4]), ("b", "INT64", [-1, 4]), ("flag", "BOOL", [-1, 1]), ("text", "BYTES", [-1, 2])],
        [
            ("sum", "FP32", [-1, 4]),
            ("doubled", "INT64", [-1, 4]),
            ("not_flag", "BOOL", [-1, 1]),
            ("text_out", "BYTES", [-1, 2]),
            ("half", "FP16", [-1, 4]),
        ],
    ),
    "identity_all": (
        [(f"in_{dt}", dt, [-1, -1]) for dt in IDENTITY_DATATYPES],
        [(f"out_{dt}", dt, [-1, -1]) for dt in IDENTITY_DATATYPES],
    ),
}

MAX_BATCH_SIZE = {"matmul16": 64, "mlp": 64, "cnn": 32, "multi_io": 16, "identity_all": 16}


# --------------------------------------------------------------------------- clients


@pytest.fixture
def stub(demo_server: Any) -> Any:
    with grpc.insecure_channel(demo_server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer_input(name: str, array: npt.NDArray[Any], datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def multi_io_inputs(rows: int = 2) -> tuple[dict[str, npt.NDArray[Any]], list[grpcclient.InferInput]]:
    rng = np.random.default_rng(rows)
    arrays = {
        "a": rng.standard_normal((rows, 4)).astype(np.float32),
        "b": rng.integers(-1000, 1000, (rows, 4), dtype=np.int64),
        "flag": rng.integers(0, 2, (rows, 1)).astype(bool),
        "text": np.array([[f"row {i}".encode(), "héllo ✓".encode()] for i in range(rows)], dtype=np.object_),
    }
    datatypes = {"a": "FP32", "b": "INT64", "flag": "BOOL", "text": "BYTES"}
    return arrays, [infer_input(name, array, datatypes[name]) for name, array in arrays.items()]


def matmul16_weight(demo_repository: Path) -> npt.NDArray[np.float32]:
    model = onnx.load(str(demo_repository / "matmul16" / "1" / "model.onnx"))
    (weight,) = [t for t in model.graph.initializer if t.name == "W"]
    array: npt.NDArray[np.float32] = numpy_helper.to_array(weight)
    return array


# --------------------------------------------------------------------------- server and model health


async def test_server_is_live_and_ready(client: TritonClient) -> None:
    assert await client.is_server_live() is True
    assert await client.is_server_ready() is True


async def test_server_metadata_names_infergate_and_exactly_its_extensions(client: TritonClient) -> None:
    metadata = await client.get_server_metadata()
    assert metadata.name == "infergate"
    assert metadata.version
    assert list(metadata.extensions) == [
        "classification",
        "logging",
        "model_configuration",
        "model_repository",
        "sequence",
        "statistics",
        "trace",
    ]


@pytest.mark.parametrize("model", DEMO_MODELS)
async def test_every_demo_model_is_ready(client: TritonClient, model: str) -> None:
    assert await client.is_model_ready(model) is True
    assert await client.is_model_ready(model, "1") is True


async def test_an_unknown_model_is_not_ready(client: TritonClient) -> None:
    assert await client.is_model_ready("no_such_model") is False
    assert await client.is_model_ready("matmul16", "2") is False


# --------------------------------------------------------------------------- metadata and configuration


@pytest.mark.parametrize("model", DEMO_MODELS)
async def test_model_metadata_lists_tensors_with_a_variable_batch_dimension(client: TritonClient, model: str) -> None:
    metadata = await client.get_model_metadata(model)
    inputs, outputs = METADATA[model]
    assert metadata.name == model
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == inputs
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == outputs


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


@pytest.mark.parametrize("model", DEMO_MODELS)
async def test_model_config_is_tritons_model_config(client: TritonClient, model: str) -> None:
    config = (await client.get_model_config(model)).config
    inputs, outputs = METADATA[model]
    assert config.name == model
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == MAX_BATCH_SIZE[model]
    # Triton's config dims leave out the batch dimension.
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        (name, _triton_type(dt), shape[1:]) for name, dt, shape in inputs
    ]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [
        (name, _triton_type(dt), shape[1:]) for name, dt, shape in outputs
    ]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024


async def test_model_config_of_an_explicit_version(client: TritonClient) -> None:
    config = (await client.get_model_config("matmul16", "1")).config
    assert config.name == "matmul16"


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("rows", [1, 5])
async def test_matmul16_computes_x_times_w(client: TritonClient, demo_repository: Path, rows: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
    result = await client.infer("matmul16", [infer_input("x", x, "FP32")])
    y = result.as_numpy("y")
    assert y.dtype == np.float32
    assert y.shape == (rows, 16)
    np.testing.assert_allclose(y, x @ matmul16_weight(demo_repository), rtol=1e-5, atol=1e-5)


async def test_mlp_maps_512_features_to_512(client: TritonClient) -> None:
    x = np.random.default_rng(512).standard_normal((3, 512)).astype(np.float32)
    y = (await client.infer("mlp", [infer_input("x", x, "FP32")])).as_numpy("y")
    assert y.dtype == np.float32
    assert y.shape == (3, 512)
    assert np.isfinite(y).all()


async def test_cnn_returns_a_probability_distribution_per_image(client: TritonClient) -> None:
    images = np.random.default_rng(64).random((2, 3, 64, 64), dtype=np.float32)
    probabilities = (await client.infer("cnn", [infer_input("image", images, "FP32")])).as_numpy("probabilities")
    assert probabilities.shape == (2, 10)
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), [1.0, 1.0], rtol=1e-5)


async def test_multi_io_returns_every_output_with_its_datatype(client: TritonClient) -> None:
    arrays, inputs = multi_io_inputs(rows=3)
    result = await client.infer("multi_io", inputs)
    response = result.get_response()
    assert sorted((o.name, o.datatype, list(o.shape)) for o in response.outputs) == sorted(
        (name, dt, [3, *shape[1:]]) for name, dt, shape in METADATA["multi_io"][1]
    )
    np.testing.assert_array_equal(result.as_numpy("sum"), arrays["a"] + arrays["b"].astype(np.float32))
    np.testing.assert_array_equal(result.as_numpy("doubled"), arrays["b"] * 2)
    np.testing.assert_array_equal(result.as_numpy("not_flag"), ~arrays["flag"])
    assert result.as_numpy("not_flag").dtype == np.bool_
    text_out = result.as_numpy("text_out")
    assert text_out.dtype == np.object_
    assert text_out.tolist() == arrays["text"].tolist()
    half = result.as_numpy("half")
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, arrays["a"].astype(np.float16))


def identity_arrays(rows: int) -> dict[str, npt.NDArray[Any]]:
    """One array per datatype, each with its own inner width and its type's edge values."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    for width, datatype in enumerate(IDENTITY_DATATYPES, start=1):
        if datatype == "BYTES":
            values: list[Any] = [b"", b"ascii", "h\u00e9llo \u2713 \U0001f600".encode(), b"nul\x00inside"]
            dtype: Any = np.object_
        elif datatype == "BOOL":
            values, dtype = [True, False], np.bool_
        else:
            dtype = triton_to_np_dtype(datatype)
            info: Any = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
            values = [info.min, info.max, 0, 1]
            if np.dtype(dtype).kind == "f":
                values += [np.nan, np.inf, -np.inf, -0.0, info.smallest_subnormal, info.eps]
        flat = [values[i % len(values)] for i in range(rows * width)]
        arrays[datatype] = np.array(flat, dtype=dtype).reshape(rows, width)
    return arrays


async def test_identity_all_round_trips_every_datatype_exactly(client: TritonClient) -> None:
    arrays = identity_arrays(rows=2)
    inputs = [infer_input(f"in_{dt}", array, dt) for dt, array in arrays.items()]
    result = await client.infer("identity_all", inputs)
    assert len(arrays) == 13
    for datatype, sent in arrays.items():
        received = result.as_numpy(f"out_{datatype}")
        assert received.shape == sent.shape, datatype
        assert received.dtype == sent.dtype, datatype
        if datatype == "BYTES":
            assert received.tolist() == sent.tolist()
        else:  # bit for bit: NaN payloads, -0.0 and subnormals included
            assert received.tobytes() == sent.tobytes(), datatype


async def test_only_requested_outputs_come_back(client: TritonClient) -> None:
    arrays, inputs = multi_io_inputs()
    requested = [grpcclient.InferRequestedOutput("half"), grpcclient.InferRequestedOutput("text_out")]
    result = await client.infer("multi_io", inputs, outputs=requested)
    assert sorted(o.name for o in result.get_response().outputs) == ["half", "text_out"]
    assert result.as_numpy("sum") is None
    assert result.as_numpy("text_out").tolist() == arrays["text"].tolist()


async def test_request_id_model_name_and_version_are_echoed(client: TritonClient) -> None:
    x = np.ones((1, 16), dtype=np.float32)
    response = (await client.infer("matmul16", [infer_input("x", x, "FP32")], request_id="req-42")).get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-42", "matmul16", "1")


async def test_an_explicit_model_version_is_served(client: TritonClient, demo_repository: Path) -> None:
    x = np.ones((2, 16), dtype=np.float32)
    result = await client.infer("matmul16", [infer_input("x", x, "FP32")], model_version="1")
    assert result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("y"), x @ matmul16_weight(demo_repository), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- streaming


def _stream_requests(count: int) -> list[tuple[str, npt.NDArray[np.float32]]]:
    rng = np.random.default_rng(count)
    return [(f"stream-{i}", rng.standard_normal((1 + i % 3, 16)).astype(np.float32)) for i in range(count)]


def test_sync_stream_answers_every_request_matched_by_id(demo_server: Any, demo_repository: Path) -> None:
    weight = matmul16_weight(demo_repository)
    sent = dict(_stream_requests(6))
    answers: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(demo_server.url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for request_id, x in sent.items():
            client.async_stream_infer("matmul16", [infer_input("x", x, "FP32")], request_id=request_id)
        arrays, inputs = multi_io_inputs()
        client.async_stream_infer("multi_io", inputs, request_id="stream-multi_io")
        client.stop_stream()  # closes the request side and waits until the server ends the stream
    finally:
        client.close()
    received = {}
    while not answers.empty():
        result, error = answers.get()
        assert error is None
        received[result.get_response().id] = result
    assert sorted(received) == sorted([*sent, "stream-multi_io"])
    for request_id, x in sent.items():
        assert received[request_id].get_response().model_name == "matmul16"
        np.testing.assert_allclose(received[request_id].as_numpy("y"), x @ weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(received["stream-multi_io"].as_numpy("doubled"), arrays["b"] * 2)


async def test_aio_stream_answers_every_request_matched_by_id(demo_server: Any, demo_repository: Path) -> None:
    weight = matmul16_weight(demo_repository)
    sent = dict(_stream_requests(6))

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for request_id, x in sent.items():
            yield {"model_name": "matmul16", "inputs": [infer_input("x", x, "FP32")], "request_id": request_id}
        yield {
            "model_name": "identity_all",
            "inputs": [infer_input(f"in_{dt}", a, dt) for dt, a in identity_arrays(rows=1).items()],
            "request_id": "stream-identity",
            "model_version": "1",
        }

    client = aiogrpcclient.InferenceServerClient(demo_server.url)
    try:
        received = {}
        async for result, error in client.stream_infer(requests()):
            assert error is None
            received[result.get_response().id] = result
    finally:
        await client.close()
    assert sorted(received) == sorted([*sent, "stream-identity"])
    for request_id, x in sent.items():
        np.testing.assert_allclose(received[request_id].as_numpy("y"), x @ weight, rtol=1e-5, atol=1e-5)
    assert received["stream-identity"].get_response().model_name == "identity_all"
    assert received["stream-identity"].get_response().model_version == "1"


# --------------------------------------------------------------------------- statistics


def _matmul16_stats(response: Any) -> Any:
    (stats,) = [s for s in response.model_stats if s.name == "matmul16" and s.version == "1"]
    return stats


async def test_statistics_count_requests_rows_and_executions(client: TritonClient) -> None:
    # Requests are sent one after another, so each runs as its own batch.
    before = _matmul16_stats(await client.get_inference_statistics("matmul16"))
    batch_sizes = [1, 1, 5, 1]
    for rows in batch_sizes:
        await client.infer("matmul16", [infer_input("x", np.zeros((rows, 16), dtype=np.float32), "FP32")])
    after = _matmul16_stats(await client.get_inference_statistics("matmul16"))

    assert after.inference_stats.success.count - before.inference_stats.success.count == len(batch_sizes)
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    assert after.inference_count - before.inference_count == sum(batch_sizes)
    assert after.execution_count - before.execution_count == len(batch_sizes)
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == len(batch_sizes)
    assert after.inference_stats.compute_infer.count - before.inference_stats.compute_infer.count == len(batch_sizes)
    assert after.last_inference > 0

    def executions(stats: Any) -> dict[int, int]:
        return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}

    grown = {size: executions(after)[size] - executions(before).get(size, 0) for size in executions(after)}
    assert grown[1] == 3
    assert grown[5] == 1


async def test_statistics_for_every_model_when_none_is_named(client: TritonClient) -> None:
    response = await client.get_inference_statistics()
    assert sorted((s.name, s.version) for s in response.model_stats) == sorted((m, "1") for m in DEMO_MODELS)


# --------------------------------------------------------------------------- typed contents (raw stubs)


def test_typed_contents_inputs_work_for_fp32_int64_bool_and_bytes(stub: Any) -> None:
    Tensor = pb.ModelInferRequest.InferInputTensor
    request = pb.ModelInferRequest(
        model_name="multi_io",
        id="typed",
        inputs=[
            Tensor(
                name="a",
                datatype="FP32",
                shape=[2, 4],
                contents=pb.InferTensorContents(fp32_contents=[0.5, 1, 2, 3, 4, 5, 6, 7.25]),
            ),
            Tensor(
                name="b",
                datatype="INT64",
                shape=[2, 4],
                contents=pb.InferTensorContents(int64_contents=[1, -2, 3, -4, 2**40, 0, 7, 8]),
            ),
            Tensor(
                name="flag", datatype="BOOL", shape=[2, 1], contents=pb.InferTensorContents(bool_contents=[True, False])
            ),
            Tensor(
                name="text",
                datatype="BYTES",
                shape=[2, 2],
                contents=pb.InferTensorContents(bytes_contents=[b"one", b"", "tr\u00e8s".encode(), b"four"]),
            ),
        ],
    )
    response = stub.ModelInfer(request)

    assert response.id == "typed"
    outputs = {o.name: (o, raw) for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)}
    assert sorted(outputs) == ["doubled", "half", "not_flag", "sum", "text_out"]

    def decoded(name: str, dtype: str) -> npt.NDArray[Any]:
        tensor, raw = outputs[name]
        return np.frombuffer(raw, dtype=dtype).reshape(list(tensor.shape))

    a = np.array([0.5, 1, 2, 3, 4, 5, 6, 7.25], dtype=np.float32).reshape(2, 4)
    b = np.array([1, -2, 3, -4, 2**40, 0, 7, 8], dtype=np.int64).reshape(2, 4)
    np.testing.assert_array_equal(decoded("sum", "<f4"), a + b.astype(np.float32))
    np.testing.assert_array_equal(decoded("doubled", "<i8"), b * 2)
    np.testing.assert_array_equal(decoded("not_flag", "?"), [[False], [True]])
    np.testing.assert_array_equal(decoded("half", "<f2"), a.astype(np.float16))
    text_tensor, text_raw = outputs["text_out"]
    assert text_tensor.datatype == "BYTES"
    assert list(text_tensor.shape) == [2, 2]
    assert deserialize_bytes_tensor(text_raw).tolist() == [b"one", b"", "tr\u00e8s".encode(), b"four"]
