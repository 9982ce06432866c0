"""A server over stand-ins of Triton's example model repository, talked to with tritonclient.

Every model of Triton's example repository loads and the server reports ready
(strict readiness): in particular ``simple_string``, whose Cast from string to
int used to fail the default warm-up. The behaviours Triton's example clients
check are covered model by model as they reach the request path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as triton_mc
from conftest import ServerProcess, running_server
from triton_models import TRITON_EXAMPLE_MODELS, write_triton_repository


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
