"""Model control with Triton's overrides, over a real server in explicit mode, through tritonclient.

What Triton's model-control example relies on — a repository of eight models
nothing loads at start, ``load_model`` with a ``config`` given as JSON (a bad
one refused with ``failed to load``), with ``file:`` overrides (a path
component longer than NAME_MAX is INTERNAL, "failed to poll from model
repository"), and an unknown model refused with ``failed to load`` — plus the
guarantees infergate keeps while it does so: a refused override leaves the
serving version serving, a reload with an override drops no request, and no
answer shows a server path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, running_server
from triton_models import TRITON_EXAMPLE_MODELS, build_densenet, build_simple, write_triton_repository
from tritonclient.utils import InferenceServerException

# How many requests run while a reload with an override happens: enough to straddle the switch.
REQUESTS_DURING_RELOAD = 40


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explicit-models")
    write_triton_repository(root)
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("explicit-logs")
    with running_server(repository, logs, "--model-control-mode", "explicit") as process:
        yield process


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[aioclient.InferenceServerClient]:
    c = aioclient.InferenceServerClient(server.url)
    try:
        yield c
    finally:
        await c.close()


def pair(rows: int = 1) -> list[aioclient.InferInput]:
    inputs = [aioclient.InferInput(n, [rows, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.arange(rows * 16, dtype=np.int32).reshape(rows, 16))
    return inputs


async def refusal(call: asyncio.Future[object] | object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        await call  # type: ignore[misc]
    return refused.value


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


# --------------------------------------------------------------------------- start


async def test_nothing_is_loaded_at_start_and_the_log_does_not_say_otherwise(
    client: aioclient.InferenceServerClient, server: ServerProcess
) -> None:
    index = await client.get_model_repository_index()
    assert len(index.models) == len(TRITON_EXAMPLE_MODELS) == 8
    server.logged("0 model(s) ready; server ready")
    assert await client.is_server_ready()


# --------------------------------------------------------------------------- config overrides


async def test_a_config_override_applies_for_that_load_and_config_yaml_comes_back_with_a_plain_load(
    client: aioclient.InferenceServerClient,
) -> None:
    await client.load_model("simple")
    assert (await client.get_model_config("simple")).config.max_batch_size == 8

    await client.load_model("simple", config='{"max_batch_size":"16"}')  # Triton's example sends a string
    assert (await client.get_model_config("simple")).config.max_batch_size == 16
    assert (await client.infer("simple", pair(16))).as_numpy("OUTPUT0").shape == (16, 16)

    await client.load_model("simple")
    assert (await client.get_model_config("simple")).config.max_batch_size == 8


@pytest.mark.parametrize(
    ("config", "says"),
    [
        pytest.param(
            '"parameters": {"config": {{"max_batch_size": "16"}}}',
            "failed to load 'simple': Invalid config override: not valid JSON",
            id="not JSON",
        ),
        pytest.param(
            '{"dynamic_batching": {"delay": 5}}',
            "failed to load 'simple': Invalid config override: dynamic_batching.delay: Extra inputs",
            id="an unknown field",
        ),
    ],
)
async def test_a_bad_config_override_is_refused_and_the_loaded_version_keeps_serving(
    client: aioclient.InferenceServerClient, config: str, says: str
) -> None:
    await client.load_model("simple")
    refused = await refusal(client.load_model("simple", config=config))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert says in str(refused.message())
    assert await client.is_model_ready("simple")
    assert (await client.infer("simple", pair())).as_numpy("OUTPUT0")[0, 1] == 2


def _warmup_reading(path: str) -> str:
    zeros = {"data_type": "TYPE_INT32", "dims": [16], "zero_data": True}
    read = {"data_type": "TYPE_INT32", "dims": [16], "input_data_file": path}
    return json.dumps(
        {
            "max_batch_size": 8,
            "model_warmup": [{"name": "w", "batch_size": 1, "inputs": {"INPUT0": read, "INPUT1": zeros}}],
        }
    )


@pytest.mark.parametrize(
    ("config", "says"),
    [
        pytest.param('{"default_model_filename": "/etc/hostname"}', "default_model_filename", id="an absolute model"),
        pytest.param('{"default_model_filename": "../../densenet_onnx/1/model.onnx"}', "default_model", id="up"),
        pytest.param(_warmup_reading("/etc/hostname"), "warm-up input_data_file", id="absolute warm-up data"),
        pytest.param(_warmup_reading("../config.yaml"), "warm-up input_data_file", id="warm-up data up"),
        pytest.param(  # the writer appends to it, rotates it away and deletes it: any file of the server's user
            '{"max_batch_size": 8, "monitoring": {"payload_log": {"path": "/tmp/any-file", "backups": 0}}}',
            "monitoring.payload_log names a file on the server",
            id="a payload log",
        ),
    ],
)
async def test_a_config_override_cannot_name_a_file_outside_the_model_directory(
    client: aioclient.InferenceServerClient, config: str, says: str
) -> None:
    """A config sent over the API reads no file of the host, nor tells whether one exists or its size."""
    await client.load_model("simple")
    refused = await refusal(client.load_model("simple", config=config))
    message = str(refused.message())
    assert says in message and ("leads out of the" in message or "config.yaml" in message), message
    assert "hostname" not in message.replace("'/etc/hostname'", "") and "bytes" not in message
    assert await client.is_model_ready("simple")


async def test_a_config_override_the_graph_cannot_take_is_refused_and_the_loaded_version_keeps_serving(
    client: aioclient.InferenceServerClient,
) -> None:
    await client.load_model("simple")
    wrong = json.dumps({"max_batch_size": 8, "input": [{"name": "INPUT0", "data_type": "TYPE_FP32"}]})
    refused = await refusal(client.load_model("simple", config=wrong))
    assert refused.status() == "StatusCode.FAILED_PRECONDITION"
    message = str(refused.message())
    assert message.startswith("failed to load 'simple': ")
    assert "input 'INPUT0': data_type TYPE_FP32, the model's is TYPE_INT32" in message
    assert (await client.infer("simple", pair())).as_numpy("OUTPUT1")[0, 1] == 0


async def test_a_reload_with_a_config_override_drops_no_request(client: aioclient.InferenceServerClient) -> None:
    await client.load_model("simple")
    reloaded = asyncio.Event()

    async def keep_asking() -> int:
        answered = 0
        while answered < REQUESTS_DURING_RELOAD or not reloaded.is_set():
            assert (await client.infer("simple", pair())).as_numpy("OUTPUT0")[0, 3] == 6
            answered += 1
        return answered

    asking = asyncio.create_task(keep_asking())
    await client.load_model("simple", config='{"max_batch_size": 4}')
    reloaded.set()
    assert await asking >= REQUESTS_DURING_RELOAD
    assert (await client.get_model_config("simple")).config.max_batch_size == 4


# --------------------------------------------------------------------------- file overrides


async def test_file_overrides_replace_the_model_s_files_for_that_load(client: aioclient.InferenceServerClient) -> None:
    # "simple" from the files of an INT8 graph: the metadata and the answers are that graph's.
    int8 = onnx_bytes(build_simple(onnx.TensorProto.INT8, "simple"))
    await client.load_model("simple", config='{"max_batch_size": 8}', files={"file:1/model.onnx": int8})
    metadata = await client.get_model_metadata("simple")
    assert [t.datatype for t in metadata.inputs] == ["INT8", "INT8"]
    inputs = [aioclient.InferInput(n, [1, 16], "INT8") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.full((1, 16), 3, dtype=np.int8))
    assert (await client.infer("simple", inputs)).as_numpy("OUTPUT0")[0, 0] == 6
    await client.load_model("simple")  # the repository's files again
    assert [t.datatype for t in (await client.get_model_metadata("simple")).inputs] == ["INT32", "INT32"]


async def test_a_model_not_in_the_repository_loads_from_its_files_with_their_labels(
    client: aioclient.InferenceServerClient,
) -> None:
    config = {"max_batch_size": 0, "output": [{"name": "fc6_1", "label_filename": "labels.txt"}]}
    labels = "".join(f"label-{i}\n" for i in range(1000)).encode()
    files = {"file:3/model.onnx": onnx_bytes(build_densenet()), "file:labels.txt": labels}
    await client.load_model("uploaded", config=json.dumps(config), files=files)
    image = aioclient.InferInput("data_0", [3, 224, 224], "FP32")
    image.set_data_from_numpy(np.ones((3, 224, 224), dtype=np.float32))
    result = await client.infer("uploaded", [image], outputs=[aioclient.InferRequestedOutput("fc6_1", class_count=2)])
    top = [entry.decode().split(":") for entry in result.as_numpy("fc6_1")]
    assert [label for _, index, label in top] == [f"label-{index}" for _, index, _ in top]
    assert (await client.get_model_metadata("uploaded")).versions == ["3"]


async def test_a_file_path_component_longer_than_name_max_is_internal_and_the_server_lives(
    client: aioclient.InferenceServerClient,
) -> None:
    refused = await refusal(client.load_model("simple", config="{}", files={"file:" + "A" * 256: b"a"}))
    assert refused.status() == "StatusCode.INTERNAL"
    assert "failed to poll from model repository" in str(refused.message())
    assert await client.is_server_live()


@pytest.mark.parametrize(
    ("files", "config", "says"),
    [
        pytest.param({"file:../x/1/model.onnx": b"a"}, "{}", "must be a relative path", id="leaves the directory"),
        pytest.param({"file:1/model.onnx": b"a"}, None, "need a 'config' parameter too", id="without a config"),
        pytest.param({"file:labels.txt": b"a"}, "{}", "hold no '<version>/model.onnx'", id="without a version"),
    ],
)
async def test_bad_file_overrides_are_refused_before_anything_loads(
    client: aioclient.InferenceServerClient, files: dict[str, bytes], config: str | None, says: str
) -> None:
    await client.load_model("simple")
    refused = await refusal(client.load_model("simple", config=config, files=files))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert "failed to load 'simple'" in str(refused.message()) and says in str(refused.message())
    assert await client.is_model_ready("simple")


async def test_file_overrides_that_do_not_load_leave_the_serving_version_serving(
    client: aioclient.InferenceServerClient,
) -> None:
    await client.load_model("simple")
    refused = await refusal(client.load_model("simple", config="{}", files={"file:1/model.onnx": b"not onnx"}))
    assert refused.status() == "StatusCode.FAILED_PRECONDITION"
    message = str(refused.message())
    # The files are named as they were sent, not where the server put them.
    assert message.startswith("failed to load 'simple': version 1: onnxruntime cannot load file:1/model.onnx")
    reasons = [m.reason for m in (await client.get_model_repository_index()).models if m.name == "simple"]
    assert all("file:1/model.onnx" in reason for reason in reasons), reasons
    assert "/tmp" not in message + "".join(reasons)
    assert (await client.infer("simple", pair())).as_numpy("OUTPUT0")[0, 2] == 4


# --------------------------------------------------------------------------- unknown models


async def test_loading_an_unknown_model_says_failed_to_load_without_a_server_path(
    client: aioclient.InferenceServerClient, repository: Path
) -> None:
    refused = await refusal(client.load_model("wrong_model_name"))
    message = str(refused.message())
    assert refused.status() == "StatusCode.NOT_FOUND"
    assert message.startswith("failed to load 'wrong_model_name', failed to poll from model repository")
    assert str(repository) not in message and "/" not in message
