"""Execution providers: a configured provider this onnxruntime lacks fails the load
clearly, unless the config lists a fallback.

CI has no GPU, so CUDA stands for "a provider that is not available here"; on a
GPU machine with onnxruntime-gpu the first case would load on CUDA instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, running_server
from models import save_model

from infergate.demo import build_matmul16
from infergate.models.runner import plain_run

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this machine has CUDA, so it cannot stand for a missing provider",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("providers")
    save_model(build_matmul16(), repo, "cuda_only", config_yaml="execution_providers: [{name: cuda}]\n")
    save_model(
        build_matmul16(),
        repo,
        "cuda_then_cpu",
        config_yaml="execution_providers: [{name: cuda, options: {device_id: 0}}, {name: cpu}]\n",
    )
    config = repo / "server.yaml"
    config.write_text("strict_readiness: false\n")
    with running_server(repo, log_dir, "--config", str(config)) as server:
        yield server


def test_a_missing_provider_without_fallback_fails_the_load_with_a_clear_reason(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    assert not client.is_model_ready("cuda_only")
    x = grpcclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    with pytest.raises(grpcclient.InferenceServerException) as error:
        client.infer("cuda_only", [x])
    assert error.value.status() == "StatusCode.UNAVAILABLE"
    assert "['cuda'] are not available" in error.value.message()
    assert "list a fallback" in error.value.message()


def test_a_listed_fallback_serves_on_the_cpu(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("cuda_then_cpu")
    config = client.get_model_config("cuda_then_cpu").config
    assert config.instance_group[0].kind == 2  # KIND_CPU
    assert "providers ['cuda'] unavailable, using CPUExecutionProvider" in server.log()


def test_a_cpu_only_session_runs_without_the_python_wrapper_and_answers_the_same() -> None:
    """Batches on a CPU-only session call onnxruntime's binding directly (the wrapper's checks and
    provider fallback cost as much as a tiny model's run); the outputs are the wrapper's."""
    session = ort.InferenceSession(build_matmul16().SerializeToString(), providers=["CPUExecutionProvider"])
    run = plain_run(session)
    assert run == session._sess.run
    x = {"x": np.arange(32, dtype=np.float32).reshape(2, 16)}
    np.testing.assert_array_equal(run(["y"], x, None)[0], session.run(["y"], x)[0])


class _GpuSession:
    """Stands in for a CUDA session, which cannot be created on this machine (no GPU)."""

    _sess = object()

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run(self, *args: object) -> list[object]:
        return []


def test_a_session_on_another_provider_keeps_the_wrapper_and_its_fallback() -> None:
    session = _GpuSession()
    assert plain_run(session) == session.run  # type: ignore[arg-type]
