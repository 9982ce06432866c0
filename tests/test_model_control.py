"""Versions, version policies and model control: load before unload, under load.

Each version of the test model multiplies its input by its own version number,
so every answer proves which version computed it; the response must name the
same version in ``model_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as aioclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess, eventually, running_server

WAIT_S = 60.0  # generous bound for "eventually": never a performance threshold


def build_scale_model(factor: float) -> onnx.ModelProto:
    """``y = x * factor`` for ``x`` FP32 [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def add_version(root: Path, model: str, version: int, content: bytes | None = None) -> None:
    """Write a version directory atomically (written aside, then renamed into place)."""
    staging = root / f".staging-{model}-{version}"
    staging.mkdir(parents=True)
    data = content if content is not None else build_scale_model(float(version)).SerializeToString()
    (staging / "model.onnx").write_bytes(data)
    (root / model).mkdir(exist_ok=True)
    os.replace(staging, root / model / str(version))


def write_config(root: Path, model: str, text: str) -> None:
    staging = root / f".{model}-config.yaml"
    staging.write_text(text)
    os.replace(staging, root / model / "config.yaml")


def x_input() -> aioclient.InferInput:
    tensor = aioclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return tensor


@dataclass
class Load:
    """Requests kept in flight against ``model`` (no version named), recording every outcome."""

    client: aioclient.InferenceServerClient
    model: str
    in_flight: int = 32
    served: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                result = await self.client.infer(self.model, [x_input()], client_timeout=WAIT_S)
            except InferenceServerException as exc:
                self.failures.append(f"{exc.status()}: {exc.message()}")
                continue
            version = result.get_response().model_version
            y = result.as_numpy("y")
            if not np.array_equal(y, np.full((1, 4), float(version), dtype=np.float32)):
                self.failures.append(f"version {version} answered {y.tolist()}")
            self.served[version] += 1
            self.recent = [*self.recent[-63:], version]

    def now_serving(self, version: str) -> bool:
        return len(self.recent) == 64 and all(v == version for v in self.recent)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._loop()) for _ in range(self.in_flight)]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    add_version(root, "scale", 1)
    return root


@pytest.fixture
def poll_server(repository: Path, log_dir: Path) -> Iterator[ServerProcess]:
    with running_server(repository, log_dir, "--model-control-mode", "poll", "--repository-poll-secs", "0.1") as server:
        yield server


async def index(client: aioclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    found = await client.get_model_repository_index()
    return {(m.name, m.version): (m.state, m.reason) for m in found.models}


async def test_versions_are_added_replaced_broken_and_removed_under_load_without_a_failed_request(
    repository: Path, poll_server: ServerProcess
) -> None:
    client = aioclient.InferenceServerClient(poll_server.url)
    try:
        async with Load(client, "scale").running() as load:
            await eventually(lambda: load.now_serving("1"), "version 1 serving")

            add_version(repository, "scale", 2)  # a newer version: loads, then takes over
            await eventually(lambda: load.now_serving("2"), "version 2 took over")

            add_version(repository, "scale", 3, b"not an onnx model")  # broken: never replaces version 2
            await eventually(lambda: _state(client, "scale", "3", "UNAVAILABLE"), "version 3 reported UNAVAILABLE")
            reason = (await index(client))[("scale", "3")][1]
            assert "version 3" in reason or "model.onnx" in reason or "protobuf" in reason.lower(), reason
            load.recent.clear()
            await eventually(lambda: load.now_serving("2"), "version 2 still serving")

            shutil.rmtree(repository / "scale" / "3")
            add_version(repository, "scale", 4)  # a good newer version replaces 2
            await eventually(lambda: load.now_serving("4"), "version 4 took over")

            shutil.rmtree(repository / "scale" / "4")  # removed: the newest remaining (2) loads again
            await eventually(lambda: load.now_serving("2"), "back to version 2")
        assert load.failures == []
        assert {"1", "2", "4"} <= set(load.served)
        assert "3" not in load.served
    finally:
        await client.close()
    assert "Traceback" not in poll_server.log()


def _state(client: aioclient.InferenceServerClient, model: str, version: str, state: str) -> object:
    async def check() -> bool:
        return (await index(client)).get((model, version), ("", ""))[0] == state

    return check()


async def test_a_bad_config_reload_keeps_the_serving_versions_and_reports_why(
    repository: Path, poll_server: ServerProcess
) -> None:
    client = aioclient.InferenceServerClient(poll_server.url)
    try:
        async with Load(client, "scale", in_flight=8).running() as load:
            await eventually(lambda: load.now_serving("1"), "version 1 serving")
            write_config(repository, "scale", "max_batch_size: 8\ndynamic_batching: {max_queue_sise: 4}\n")

            async def reported() -> bool:
                models = (await client.get_model_repository_index()).models
                return any("max_queue_sise" in m.reason for m in models if m.name == "scale")

            await eventually(reported, "the config error in the index")
            load.recent.clear()
            await eventually(lambda: load.now_serving("1"), "version 1 still serving")
            write_config(repository, "scale", "version_policy: {all: {}}\n")
            add_version(repository, "scale", 2)
            await eventually(
                lambda: _state(client, "scale", "2", "READY"), "version 2 loaded beside version 1 (policy all)"
            )
            assert await client.is_model_ready("scale", "1")
            result = await client.infer("scale", [x_input()], model_version="1")
            assert result.get_response().model_version == "1"
        assert load.failures == []
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("policy", "ready", "not_loaded"),
    [
        ("latest: {num_versions: 2}", ["2", "3"], ["1"]),
        ("all: {}", ["1", "2", "3"], []),
        ("specific: {versions: [1, 3]}", ["1", "3"], ["2"]),
    ],
)
async def test_version_policy_decides_which_versions_serve(
    tmp_path: Path, log_dir: Path, policy: str, ready: list[str], not_loaded: list[str]
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for version in (1, 2, 3):
        add_version(root, "scale", version)
    write_config(root, "scale", f"version_policy: {{{policy}}}\n")
    with running_server(root, log_dir) as server:
        client = aioclient.InferenceServerClient(server.url)
        try:
            for version in ready:
                assert await client.is_model_ready("scale", version)
                result = await client.infer("scale", [x_input()], model_version=version)
                assert result.as_numpy("y")[0, 0] == float(version)
            for version in not_loaded:
                assert not await client.is_model_ready("scale", version)
            metadata = await client.get_model_metadata("scale")
            assert list(metadata.versions) == ready
            newest = await client.infer("scale", [x_input()])
            assert newest.get_response().model_version == ready[-1]
        finally:
            await client.close()


async def test_explicit_mode_loads_and_unloads_only_on_request(repository: Path, log_dir: Path) -> None:
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"garbage")
    with running_server(repository, log_dir, "--model-control-mode", "explicit") as server:
        client = aioclient.InferenceServerClient(server.url)
        try:
            assert await client.is_server_ready()
            assert not await client.is_model_ready("scale")
            assert (await index(client))[("scale", "")][0] == "UNAVAILABLE"

            await client.load_model("scale")
            assert await client.is_model_ready("scale")
            assert (await client.infer("scale", [x_input()])).as_numpy("y")[0, 0] == 1.0

            await client.unload_model("scale")
            assert not await client.is_model_ready("scale")
            with pytest.raises(InferenceServerException) as refused:
                await client.infer("scale", [x_input()])
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            assert "unloaded" in refused.value.message()

            for attempt in range(2):  # each load request tries again, and says why it failed
                with pytest.raises(InferenceServerException) as failed:
                    await client.load_model("broken")
                assert failed.value.status() == "StatusCode.FAILED_PRECONDITION", attempt
                assert "failed to load 'broken'" in failed.value.message(), attempt
                assert "1/model.onnx" in failed.value.message(), attempt
                state, reason = (await index(client))[("broken", "1")]
                assert state == "UNAVAILABLE" and "1/model.onnx" in reason, attempt

            with pytest.raises(InferenceServerException) as missing:
                await client.load_model("no_such_model")
            assert missing.value.status() == "StatusCode.NOT_FOUND"
            with pytest.raises(InferenceServerException) as sneaky:
                await client.load_model("../models")
            assert sneaky.value.status() == "StatusCode.INVALID_ARGUMENT"

            await client.load_model("scale")  # and back
            assert await client.is_model_ready("scale")
            ready_only = await client.get_model_repository_index()
            assert ("scale", "1") in {(m.name, m.version) for m in ready_only.models}
        finally:
            await client.close()
    assert "Traceback" not in server.log()


async def test_unloading_lets_in_flight_requests_finish(repository: Path, log_dir: Path) -> None:
    with running_server(repository, log_dir, "--model-control-mode", "explicit", "--load-model", "scale") as server:
        client = aioclient.InferenceServerClient(server.url)
        try:
            pending = [asyncio.create_task(client.infer("scale", [x_input()])) for _ in range(64)]
            await asyncio.sleep(0)
            await client.unload_model("scale")
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
            answered = [o for o in outcomes if not isinstance(o, BaseException)]
            refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
            assert len(answered) + len(refused) == len(pending)
            for result in answered:
                assert result.as_numpy("y")[0, 0] == 1.0
            for error in refused:  # sent after the unload: refused cleanly, never cut off mid-way
                assert error.status() == "StatusCode.UNAVAILABLE", error.message()
        finally:
            await client.close()
