"""The SDK and ``infergate-client`` against a real server with one model that failed to load and one that
loaded: ``health --model`` of the good one says which model is broken and why, and a call to the broken
model is not retried (the server's message says it failed to load: retrying cannot help)."""

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
from conftest import ServerProcess, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_sdk_client import EitherClient

from infergate.demo import build_matmul16
from infergate.server import SERVICE_NAME
from infergate_client import RetryBudget, RetryPolicy, Unavailable

CLI = Path(sys.executable).parent / "infergate-client"
HANG_GUARD_S = 60.0
X = np.arange(16, dtype=np.float32).reshape(1, 16)


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("one-broken")
    (root / "good" / "1").mkdir(parents=True)
    onnx.save_model(build_matmul16(), str(root / "good" / "1" / "model.onnx"))
    (root / "fraud" / "1").mkdir(parents=True)
    (root / "fraud" / "1" / "model.onnx").write_bytes(b"garbage, not an onnx graph")
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


@pytest.fixture(params=["sync", "aio"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120, check=False)


def test_health_of_a_good_model_on_a_server_not_ready_names_the_broken_model(broken: ServerProcess) -> None:
    done = _cli("--url", broken.url, "health", "--model", "good")
    assert done.returncode == 1, done.stderr
    status = json.loads(done.stdout)
    assert (status["live"], status["ready"], status["model good ready"]) == (True, False, True)
    [row] = status["not_ready"]
    assert (row["model"], row["version"], row["state"]) == ("fraud", "1", "UNAVAILABLE")
    assert "model.onnx" in row["reason"]
    assert done.stderr.startswith("infergate-client: not ready: model fraud version 1: "), done.stderr


def test_health_of_the_broken_model_names_it(broken: ServerProcess) -> None:
    done = _cli("--url", broken.url, "health", "--model", "fraud")
    assert done.returncode == 1, done.stderr
    status = json.loads(done.stdout)
    assert status["model fraud ready"] is False
    assert [row["model"] for row in status["not_ready"]] == ["fraud"]


async def test_a_call_to_a_model_that_failed_to_load_is_not_retried(broken: ServerProcess, flavour: str) -> None:
    retries: list[int] = []
    budget = RetryBudget(max_tokens=4)
    client = EitherClient(
        flavour, broken.url, retry=RetryPolicy(on_retry=lambda n, e: retries.append(n)), retry_budget=budget
    )
    try:
        for version in (None, 1):
            with pytest.raises(Unavailable, match=r"fraud.*(no available versions|failed to load)"):
                await client.infer("fraud", {"x": X}, model_version=version)
        assert (await client.infer("good", {"x": X}))["y"].shape == (1, 16)
    finally:
        await client.close()
    assert retries == []
    assert budget.tokens == 4  # untouched: the next transient failure may still be retried
