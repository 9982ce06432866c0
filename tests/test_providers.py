"""Execution providers: a configured provider this onnxruntime lacks fails the load
clearly, unless the config lists a fallback.

CI has no GPU, so CUDA stands for "a provider that is not available here"; on a
GPU machine with onnxruntime-gpu the first case would load on CUDA instead.
A provider that is available but does not come up, and an EP failure in a run,
are simulated (each test says how): onnxruntime's own fallback must not hide them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, running_server
from models import save_model
from onnxruntime.capi import onnxruntime_inference_collection as oic

from infergate.demo import build_matmul16
from infergate.errors import ModelExecutionError
from infergate.models import runner as runner_module
from infergate.models.config import model_config_from_data
from infergate.models.runner import ModelLoadError, OnnxRunner, plain_run

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

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
    server.logged("providers ['cuda'] unavailable, using CPUExecutionProvider")


def test_a_cpu_only_session_runs_without_the_python_wrapper_and_answers_the_same() -> None:
    """Batches on a CPU-only session call onnxruntime's binding directly (the wrapper's checks and
    provider fallback cost as much as a tiny model's run); the outputs are the wrapper's."""
    session = ort.InferenceSession(build_matmul16().SerializeToString(), providers=["CPUExecutionProvider"])
    run = plain_run(session)
    assert run == session._sess.run
    x = {"x": np.arange(32, dtype=np.float32).reshape(2, 16)}
    np.testing.assert_array_equal(run(["y"], x, None)[0], session.run(["y"], x)[0])


class _GpuSession:
    """Simulates a CUDA session, which cannot be created here (no GPU): a real CPU session that says it runs
    on CUDA first, and whose C session fails the next run with EPFail, as a CUDA failure does."""

    def __init__(self) -> None:
        self.session = runner_module._new_session(build_matmul16().SerializeToString(), ort.SessionOptions(), [CPU])
        self.c_session = self.session._sess
        self.session.get_providers = lambda: [CUDA, CPU]  # type: ignore[method-assign]
        self.session._sess = _FailsOnce(self.c_session)


class _FailsOnce:
    """A C session whose next ``run`` raises onnxruntime's EPFail; everything else is the real one's."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def run(self, *args: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise oic.C.EPFail("simulated: CUDA failure 700: an illegal memory access was encountered")
        return self.real.run(*args)


def test_a_session_on_another_provider_keeps_the_wrapper_without_its_fallback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """onnxruntime's wrapper would answer an EPFail by re-creating the session on the CPU (without the
    provider's options; a TensorRT one on CUDA device 0), and a bound instance's IO bindings would then
    fail every batch: the runner's sessions raise it instead, and stay the sessions they were."""
    gpu = _GpuSession()
    run = plain_run(gpu.session)
    assert run == gpu.session.run
    x = {"x": np.ones((1, 16), np.float32)}
    with pytest.raises(oic.C.EPFail, match="simulated"):
        run(["y"], x, None)
    assert gpu.session._sess.real is gpu.c_session, "the C session was replaced"
    assert run(["y"], x, None)[0].shape == (1, 16)
    assert "Falling back" not in capfd.readouterr().out


def test_an_ep_failure_in_a_bound_instance_fails_those_requests_and_the_next_batches_still_run(
    tmp_path: Path,
) -> None:
    """Bound on the CPU (``io_binding: true``); the EP failure is simulated on the request-by-request
    retry of a failed batch, which goes through the wrapper's ``run``."""
    path = save_model(build_matmul16(), tmp_path, "m")
    config = model_config_from_data({"device_execution": {"io_binding": True}, "max_batch_size": 8}, "config.yaml")
    runner = OnnxRunner.load(path, config, "m", 1)
    try:
        instance = runner._instances.instances[0]
        assert instance.bound is not None
        c_session = instance.session._sess
        failing = instance.session._sess = _FailsOnce(c_session)
        bad = {"x": np.ones((1, 15), np.float32)}  # fails the bound batch, then the retry of each request alone
        results, _ = runner._run_sync(instance, [bad, bad], [1, 1])
        assert all(isinstance(r, ModelExecutionError) for r in results)
        assert isinstance(results[0].__cause__, oic.C.EPFail)
        if instance.session._sess is failing:  # not replaced: the bindings' own C session again
            instance.session._sess = c_session
        results, _ = runner._run_sync(instance, [{"x": np.ones((2, 16), np.float32)}], [2])
        assert not isinstance(results[0], Exception), results[0].__cause__
        assert results[0]["y"].shape == (2, 16)
    finally:
        runner.close()


@pytest.fixture
def cuda_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """This onnxruntime says it has CUDA, as onnxruntime-gpu does on a machine where CUDA cannot start."""
    real = oic.C.get_available_providers
    monkeypatch.setattr(oic.C, "get_available_providers", lambda: [CUDA, *real()])
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, *real()])


@pytest.fixture
def cuda_raises(cuda_listed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulates a CUDA provider that raises as the session is created (a GPU host with a bad
    ``device_id``, no usable GPU, or CUDA libraries missing); no GPU here to do it for real."""

    class NoCuda(oic.C.InferenceSession):  # type: ignore[misc]
        def initialize_session(self, providers: list[str], *args: Any) -> Any:
            if CUDA in providers:
                raise RuntimeError("simulated: CUDA failure 100: no CUDA-capable device is detected")
            return super().initialize_session(providers, *args)

    monkeypatch.setattr(oic.C, "InferenceSession", NoCuda)


def load(tmp_path: Path, providers: list[dict[str, Any]]) -> OnnxRunner:
    path = save_model(build_matmul16(), tmp_path, "m")
    config = {"execution_providers": providers, "instance_group": {"inline_max_microseconds": 0}}
    return OnnxRunner.load(path, model_config_from_data(config, "config.yaml"), "m", 1)


CUDA_THEN_CPU = [{"name": "cuda", "options": {"device_id": 0}}, {"name": "cpu"}]


@pytest.mark.usefixtures("cuda_raises")
def test_a_provider_that_raises_at_creation_before_a_listed_cpu_is_a_warning_with_onnxruntime_s_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING, "infergate.models.runner")
    runner = load(tmp_path, CUDA_THEN_CPU)
    runner.close()
    assert runner.providers == [CPU]
    warned = [r.getMessage() for r in caplog.records if "execution_providers.0" in r.getMessage()]
    assert len(warned) == 1 and "no CUDA-capable device" in warned[0] and "CPUExecutionProvider" in warned[0]
    assert "EP Error" not in capfd.readouterr().out  # onnxruntime's own fallback prints it


@pytest.mark.usefixtures("cuda_raises")
def test_a_provider_that_raises_at_creation_alone_fails_the_load_naming_the_field_and_the_reason(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ModelLoadError) as error:
        load(tmp_path, [{"name": "cuda"}])
    assert "execution_providers.0 (cuda)" in str(error.value)
    assert "no CUDA-capable device" in str(error.value)
    assert "EP Error" not in capfd.readouterr().out


@pytest.mark.usefixtures("cuda_listed")
def test_a_provider_onnxruntime_leaves_out_of_the_session_is_named_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """This onnxruntime (the CPU build) creates the session without the CUDA provider it cannot register."""
    caplog.set_level(logging.WARNING, "infergate.models.runner")
    runner = load(tmp_path, CUDA_THEN_CPU)
    runner.close()
    assert runner.providers == [CPU]
    assert any("execution_providers.0 (cuda)" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelLoadError, match=r"execution_providers\.0 \(cuda\)"):
        load(tmp_path, [{"name": "cuda"}])
