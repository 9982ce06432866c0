"""A server that is up with one broken model: not ready (strict readiness), yet every client
keeps serving the models that loaded — tritonclient, the SDK over its health-checked
channel, and ``infergate-client``, whose ``health`` exits 1 naming the model and why (also
``health --model`` of the good one); the SDK does not retry a call to the broken model (the
server's message says it failed to load: retrying cannot help)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_sdk_client import EitherClient

from infergate.demo import build_matmul16
from infergate.server import SERVICE_NAME
from infergate_client import Client, RetryBudget, RetryPolicy
from infergate_client.errors import Unavailable

CLI = Path(sys.executable).parent / "infergate-client"
HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def partly_ready(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("partly-ready")
    (root / "good" / "1").mkdir(parents=True)
    onnx.save_model(build_matmul16(), str(root / "good" / "1" / "model.onnx"))
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07 not an onnx graph")
    with running_server(root, log_dir, wait=False) as server:
        with grpc.insecure_channel(server.url) as channel:  # loading is over when the inference service serves
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=HANG_GUARD_S
            )
            try:
                assert any(u.status == health_pb2.HealthCheckResponse.SERVING for u in watch)
            finally:
                watch.cancel()
        yield server


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120, check=False)


X = np.arange(16, dtype=np.float32).reshape(1, 16)


def test_the_sdk_serves_the_model_that_loaded_and_says_why_the_other_did_not(partly_ready: ServerProcess) -> None:
    with Client(partly_ready.url, timeout=HANG_GUARD_S) as client:
        assert client.is_server_ready() is False
        assert client.infer("good", {"x": X})["y"].shape == (1, 16)
        with pytest.raises(Unavailable, match=r"corrupt.*model\.onnx"):
            client.infer("corrupt", {"x": X})
    triton = grpcclient.InferenceServerClient(partly_ready.url)
    tensor = grpcclient.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(X)
    assert triton.infer("good", [tensor]).as_numpy("y").shape == (1, 16)
    triton.close()


def test_cli_health_exits_1_naming_the_model_that_failed_and_why(partly_ready: ServerProcess) -> None:
    done = _cli("--url", partly_ready.url, "health")
    assert done.returncode == 1, done.stderr
    status = json.loads(done.stdout)
    assert (status["live"], status["ready"]) == (True, False)
    [row] = status["not_ready"]
    assert (row["model"], row["version"], row["state"]) == ("corrupt", "1", "UNAVAILABLE")
    assert "model.onnx" in row["reason"]
    assert "not ready: model corrupt version 1:" in done.stderr


def test_cli_infer_still_runs_the_model_that_loaded(partly_ready: ServerProcess) -> None:
    done = _cli("--url", partly_ready.url, "infer", "good", "-i", f"x={json.dumps(X.tolist())}")
    assert done.returncode == 0, done.stderr
    assert np.asarray(json.loads(done.stdout)["y"]).shape == (1, 16)


def test_in_poll_mode_the_server_becomes_ready_once_its_broken_model_is_fixed(tmp_path: Path, log_dir: Path) -> None:
    """A pod started while a model was half copied must not stay out of its Service for good."""
    (tmp_path / "late" / "1").mkdir(parents=True)
    model_file = tmp_path / "late" / "1" / "model.onnx"
    model_file.write_bytes(b"\x08\x07 half copied")
    with running_server(
        tmp_path, log_dir, "--model-control-mode", "poll", "--repository-poll-secs", "1", wait=False
    ) as s:
        with grpc.insecure_channel(s.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=HANG_GUARD_S)
            assert any(u.status == health_pb2.HealthCheckResponse.SERVING for u in watch)  # loading is over
            watch.cancel()
            assert (
                health.Check(health_pb2.HealthCheckRequest(service="")).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            onnx.save_model(build_matmul16(), str(model_file))  # the copy completes
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=HANG_GUARD_S)
            assert any(u.status == health_pb2.HealthCheckResponse.SERVING for u in watch)
            watch.cancel()


@pytest.fixture(params=["sync", "aio"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_health_of_a_good_model_on_a_server_not_ready_names_the_broken_model(partly_ready: ServerProcess) -> None:
    done = _cli("--url", partly_ready.url, "health", "--model", "good")
    assert done.returncode == 1, done.stderr
    status = json.loads(done.stdout)
    assert (status["live"], status["ready"], status["model good ready"]) == (True, False, True)
    [row] = status["not_ready"]
    assert (row["model"], row["version"], row["state"]) == ("corrupt", "1", "UNAVAILABLE")
    assert "model.onnx" in row["reason"]
    assert done.stderr.startswith("infergate-client: not ready: model corrupt version 1: "), done.stderr


def test_health_of_the_broken_model_names_it(partly_ready: ServerProcess) -> None:
    done = _cli("--url", partly_ready.url, "health", "--model", "corrupt")
    assert done.returncode == 1, done.stderr
    status = json.loads(done.stdout)
    assert status["model corrupt ready"] is False
    assert [row["model"] for row in status["not_ready"]] == ["corrupt"]


async def test_a_call_to_a_model_that_failed_to_load_is_not_retried(partly_ready: ServerProcess, flavour: str) -> None:
    retries: list[int] = []
    budget = RetryBudget(max_tokens=4)
    client = EitherClient(
        flavour, partly_ready.url, retry=RetryPolicy(on_retry=lambda n, e: retries.append(n)), retry_budget=budget
    )
    try:
        for version in (None, 1):
            with pytest.raises(Unavailable, match=r"corrupt.*(no available versions|failed to load)"):
                await client.infer("corrupt", {"x": X}, model_version=version)
        assert (await client.infer("good", {"x": X}))["y"].shape == (1, 16)
    finally:
        await client.close()
    assert retries == []
    assert budget.tokens == 4  # untouched: the next transient failure may still be retried


def _serving(health: health_pb2_grpc.HealthStub, service: str) -> None:
    """Wait until ``service`` reports SERVING (a Watch, no polling)."""
    watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=HANG_GUARD_S)
    try:
        assert any(u.status == health_pb2.HealthCheckResponse.SERVING for u in watch)
    finally:
        watch.cancel()


def _whole_server(health: health_pb2_grpc.HealthStub) -> int:
    return int(health.Check(health_pb2.HealthCheckRequest(service="")).status)


@pytest.mark.parametrize("mend", ["load it once fixed", "unload it"])
def test_in_explicit_mode_a_start_up_model_that_failed_keeps_the_server_not_ready_until_mended(
    tmp_path: Path, log_dir: Path, mend: str
) -> None:
    """``--load-model`` of a broken model counts as a broken model does in the other modes (and in
    Triton's strict readiness): the server serves the others, not ready, until the model is loaded
    through RepositoryModelLoad or unloaded. A model no ``--load-model`` names never counts."""
    for name in ("good", "idle"):
        (tmp_path / name / "1").mkdir(parents=True)
        onnx.save_model(build_matmul16(), str(tmp_path / name / "1" / "model.onnx"))
    (tmp_path / "corrupt" / "1").mkdir(parents=True)
    (tmp_path / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07 not an onnx graph")
    loads = ("--load-model", "good", "--load-model", "corrupt")
    with (
        running_server(tmp_path, log_dir, "--model-control-mode", "explicit", *loads, wait=False) as server,
        grpc.insecure_channel(server.url) as channel,
        Client(server.url, timeout=HANG_GUARD_S) as client,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        _serving(health, SERVICE_NAME)  # loading is over
        assert _whole_server(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert client.is_server_ready() is False
        assert client.infer("good", {"x": X})["y"].shape == (1, 16)
        triton = grpcclient.InferenceServerClient(server.url)
        try:
            if mend == "unload it":
                triton.unload_model("corrupt")
            else:
                onnx.save_model(build_matmul16(), str(tmp_path / "corrupt" / "1" / "model.onnx"))
                triton.load_model("corrupt")
                assert client.infer("corrupt", {"x": X})["y"].shape == (1, 16)
        finally:
            triton.close()
        _serving(health, "")
        assert client.is_server_ready() is True


def test_in_explicit_mode_a_load_model_naming_no_model_directory_keeps_the_server_not_ready(
    tmp_path: Path, log_dir: Path
) -> None:
    (tmp_path / "good" / "1").mkdir(parents=True)
    onnx.save_model(build_matmul16(), str(tmp_path / "good" / "1" / "model.onnx"))
    loads = ("--load-model", "good", "--load-model", "goood")
    with (
        running_server(tmp_path, log_dir, "--model-control-mode", "explicit", *loads, wait=False) as server,
        grpc.insecure_channel(server.url) as channel,
        Client(server.url, timeout=HANG_GUARD_S) as client,
    ):
        _serving(health_pb2_grpc.HealthStub(channel), SERVICE_NAME)
        assert _whole_server(health_pb2_grpc.HealthStub(channel)) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert client.infer("good", {"x": X})["y"].shape == (1, 16)
    assert "NOT ready (strict readiness)" in server.log() and "goood" in server.log()
