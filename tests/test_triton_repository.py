"""A server over stand-ins of Triton's example model repository, talked to with tritonclient.

Every model of Triton's example repository loads and the server reports ready
(strict readiness): in particular ``simple_string``, whose Cast from string to
int used to fail the default warm-up. Then what Triton's example clients check,
in tests of our own: health and metadata (and Triton's words for an unknown
model), typed ``contents`` of every kind and the refusals the explicit-content
clients look for, and classification (top-k strings with labels) on the image
stand-ins, unary and streamed. Sequences and model control have their own
files (``test_triton_sequences.py``, ``test_triton_model_control.py``).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as triton_mc
from conftest import ServerProcess, running_server
from triton_models import TRITON_EXAMPLE_MODELS, write_triton_repository
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("triton-models")
    write_triton_repository(root)
    logs = tmp_path_factory.mktemp("triton-logs")
    with running_server(root, logs) as server:
        yield server


@pytest.fixture
def client(triton_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(triton_server.url) as c:
        yield c


def test_every_model_of_triton_s_example_repository_is_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_ready()
    index = client.get_model_repository_index()
    assert sorted(m.name for m in index.models) == sorted(m.name for m in TRITON_EXAMPLE_MODELS)
    assert all(m.state == "READY" for m in index.models), index


def test_simple_string_adds_and_subtracts_decimal_strings(client: grpcclient.InferenceServerClient) -> None:
    first = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    ones = np.array([[b"1"] * 16], dtype=np.object_)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "BYTES"), grpcclient.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_data_from_numpy(first)
    inputs[1].set_data_from_numpy(ones)
    result = client.infer("simple_string", inputs)
    assert [int(x) for x in result.as_numpy("OUTPUT0")[0]] == [i + 1 for i in range(16)]
    assert [int(x) for x in result.as_numpy("OUTPUT1")[0]] == [i - 1 for i in range(16)]


@pytest.mark.parametrize(("model", "expected"), [("densenet_onnx", "FORMAT_NCHW"), ("inception_onnx", "FORMAT_NHWC")])
def test_image_models_report_the_input_format_image_clients_need(
    client: grpcclient.InferenceServerClient, model: str, expected: str
) -> None:
    config = client.get_model_config(model).config
    assert triton_mc.ModelInput.Format.Name(config.input[0].format) == expected
    assert config.output[0].label_filename.endswith("_labels.txt")


def test_model_directories_carry_their_labels_files(tmp_path: Path) -> None:
    write_triton_repository(tmp_path, ["densenet_onnx"])
    labels = (tmp_path / "densenet_onnx" / "densenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "CLASS_0"


# --------------------------------------------------------------------------- health and metadata


def test_health_and_metadata_answer_as_triton_s_health_example_expects(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.is_server_live(headers={"test": "1"}) and client.is_server_ready()
    assert client.is_model_ready("simple")
    server = client.get_server_metadata()
    assert server.name == "infergate"  # never "triton"
    assert {"classification", "sequence", "model_repository"} <= set(server.extensions)
    metadata = client.get_model_metadata("simple", headers={"test": "1"})
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    assert client.get_model_config("simple").config.name == "simple"
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_metadata("wrong_model_name")
    assert "Request for unknown model: 'wrong_model_name' is not found" in str(refused.value.message())


# --------------------------------------------------------------------------- typed contents


@pytest.fixture
def stub(triton_server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(triton_server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def typed_request(model: str, field: str, first: list[Any], second: list[Any]) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    datatype = {"int_contents": "INT32", "bytes_contents": "BYTES"}[field]
    if model == "simple_int8":
        datatype = "INT8"
    for name, values in (("INPUT0", first), ("INPUT1", second)):
        tensor = service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype=datatype, shape=[1, 16])
        getattr(tensor.contents, field).extend(values)
        request.inputs.append(tensor)
    return request


@pytest.mark.parametrize(
    ("model", "field", "first", "second", "read"),
    [
        pytest.param("simple", "int_contents", list(range(16)), [1] * 16, np.int32, id="int"),
        pytest.param("simple_int8", "int_contents", list(range(16)), [1] * 16, np.int8, id="int8"),
        pytest.param(
            "simple_string", "bytes_contents", [str(i).encode() for i in range(16)], [b"1"] * 16, None, id="bytes"
        ),
    ],
)
def test_typed_contents_of_every_example_kind_are_added_and_subtracted(
    stub: Any, model: str, field: str, first: list[Any], second: list[Any], read: Any
) -> None:
    response = stub.ModelInfer(typed_request(model, field, first, second))
    if read is None:  # BYTES: length-prefixed decimal strings
        raw = response.raw_output_contents[0]
        sums, offset = [], 0
        while offset < len(raw):
            size = int.from_bytes(raw[offset : offset + 4], "little")
            sums.append(int(raw[offset + 4 : offset + 4 + size]))
            offset += 4 + size
    else:
        sums = [int(v) for v in np.frombuffer(response.raw_output_contents[0], dtype=read)]
    assert sums == [i + 1 for i in range(16)]


def test_typed_contents_beside_raw_contents_are_refused_in_triton_s_words(stub: Any) -> None:
    request = typed_request("simple", "int_contents", list(range(16)), [1] * 16)
    request.raw_input_contents.append(np.zeros(16, dtype=np.int32).tobytes())
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
        in refused.value.details()
    )


def test_a_version_that_is_not_a_number_is_refused_in_triton_s_words(stub: Any) -> None:
    request = typed_request("simple_int8", "int_contents", list(range(16)), [1] * 16)
    request.model_version = "wrong_specification"
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "failed to get model version from specified version string 'wrong_specification'" in refused.value.details()


# --------------------------------------------------------------------------- classification


def image(model: str) -> grpcclient.InferInput:
    """A deterministic image in the model's input format (NCHW for densenet, NHWC for inception)."""
    shape = [3, 224, 224] if model == "densenet_onnx" else [299, 299, 3]
    name = "data_0" if model == "densenet_onnx" else "input:0"
    pixels = np.random.default_rng(7).random(shape, dtype=np.float32)
    tensor = grpcclient.InferInput(name, shape, "FP32")
    tensor.set_data_from_numpy(pixels)
    return tensor


OUTPUTS = {"densenet_onnx": "fc6_1", "inception_onnx": "InceptionV3/Predictions/Softmax:0"}


@pytest.mark.parametrize("model", list(OUTPUTS))
def test_an_image_model_answers_its_top_classes_with_their_labels(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    output = OUTPUTS[model]
    scores = client.infer(model, [image(model)]).as_numpy(output)
    top = client.infer(model, [image(model)], outputs=[grpcclient.InferRequestedOutput(output, class_count=3)])
    got = top.as_numpy(output)
    assert got.shape == (3,)
    expected = np.argsort(-scores, kind="stable")[:3]
    assert [entry.decode() for entry in got] == [f"{scores[i]:f}:{i}:CLASS_{i}" for i in expected]
    response = top.get_output(output)
    assert response.datatype == "BYTES"


def test_a_batching_model_classifies_each_row_and_integers_print_as_integers(
    client: grpcclient.InferenceServerClient,
) -> None:
    inputs = [grpcclient.InferInput(n, [2, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(np.arange(32, dtype=np.int32).reshape(2, 16))
    inputs[1].set_data_from_numpy(np.zeros((2, 16), dtype=np.int32))
    requested = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=2), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", inputs, outputs=requested)
    assert [[e.decode() for e in row] for row in result.as_numpy("OUTPUT0")] == [
        ["15:15", "14:14"],
        ["31:15", "30:14"],
    ]
    assert result.as_numpy("OUTPUT1").shape == (2, 16), "an output asked for without a count stays raw"


def test_classes_of_a_bytes_output_are_refused_before_the_model_runs(client: grpcclient.InferenceServerClient) -> None:
    inputs = [grpcclient.InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.array([[b"1"] * 16], dtype=np.object_))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("simple_string", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=1)])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "class result not available for output due to unsupported type 'BYTES'" in str(refused.value.message())


def test_classification_comes_back_over_a_stream_too(client: grpcclient.InferenceServerClient) -> None:
    requested = [grpcclient.InferRequestedOutput("fc6_1", class_count=1)]
    unary = client.infer("densenet_onnx", [image("densenet_onnx")], outputs=requested).as_numpy("fc6_1")
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("densenet_onnx", [image("densenet_onnx")], outputs=requested, request_id="img")
        result, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is None, error
    assert result.as_numpy("fc6_1").tolist() == unary.tolist()
    assert unary[0].decode().endswith(":CLASS_" + unary[0].decode().split(":")[1])
