"""``instance_group.count: auto``: the server chooses, as Triton's onnxruntime backend does.

With ``auto`` (and in a Triton config whose instance groups give no count), a
model on the CPU gets two instances, each with half the CPUs this process may
use as intra-op threads (when ``intra_op_num_threads`` is 0). A model whose
batches run on the event loop, a stateful model and a model with
``device_execution`` get one. ``auto`` is the default; a number is kept, and
several instances with ``intra_op_num_threads: 0`` share the CPUs out among
them. How auto's two instances share the work is the batcher's (test_batcher.py).
The sessions are real onnxruntime sessions, read back through onnxruntime's
own ``get_session_options``; the last tests serve a real repository.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from infergate.demo import build_matmul16
from infergate.models.config import ModelConfig
from infergate.models.config_files import read_model_config
from infergate.models.cpus import model_cpus, usable_cpus
from infergate.models.runner import AUTO_CPU_INSTANCES, OnnxRunner
from infergate.models.version import load_model_version
from load_tests.models import build_slow_model
from tests.conftest import running_server
from tests.models import save_model

CPUS = usable_cpus()  # what the runner shares out: this process's CPUs, cut to any CPU quota (test_cpus.py)
SLOW_MS = 2  # far over the 100 µs under which a model's batches run on the event loop


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "model.onnx"
    onnx.save(build_slow_model(SLOW_MS), str(path))
    return path


@pytest.fixture(scope="module")
def matmul16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("matmul16") / "model.onnx"
    onnx.save(build_matmul16(), str(path))
    return path


@contextlib.contextmanager
def loaded(path: Path, cpus: int | None = None, **config: Any) -> Iterator[OnnxRunner]:
    runner = OnnxRunner.load(path, ModelConfig.model_validate({"max_batch_size": 8, **config}), "m", 1, cpus)
    try:
        yield runner
    finally:
        runner.close()


def threads_of(runner: OnnxRunner) -> list[int]:
    """Each instance's intra-op threads, as onnxruntime holds them."""
    return [i.session.get_session_options().intra_op_num_threads for i in runner._instances.instances]


def test_an_auto_count_gives_a_cpu_model_two_instances_that_share_the_cpus(slow_model: Path) -> None:
    with loaded(slow_model, instance_group={"count": "auto"}) as runner:
        assert AUTO_CPU_INSTANCES == 2
        assert runner.instance_count == 2
        assert not runner.inline
        assert threads_of(runner) == [max(1, CPUS // 2)] * 2


@pytest.fixture
def sessions_opened(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The intra-op threads of each onnxruntime session opened meanwhile, in order (real sessions,
    of a subclass that notes them)."""
    opened: list[int] = []

    class Noted(ort.InferenceSession):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(ort, "InferenceSession", Noted)
    return opened


def test_a_model_that_is_not_tiny_opens_each_of_its_sessions_once(slow_model: Path, sessions_opened: list[int]) -> None:
    """The session that measures the model is opened as the first instance and stays one."""
    with loaded(slow_model, instance_group={"count": "auto"}) as runner:
        assert sessions_opened == threads_of(runner) == [max(1, CPUS // 2)] * 2


def test_a_tiny_model_ends_on_one_single_threaded_session(matmul16: Path, sessions_opened: list[int]) -> None:
    with loaded(matmul16, instance_group={"count": "auto", "inline_max_microseconds": 10_000}) as runner:
        assert runner.inline and threads_of(runner) == [1]
        # Opened with an instance's share of the CPUs, then once more on one thread where that share is more.
        assert sessions_opened == ([1] if CPUS // 2 <= 1 else [CPUS // 2, 1])


@pytest.mark.parametrize(("cpus", "threads"), [(2, [1, 1]), (4, [2, 2]), (6, [3, 3]), (1, [1])])
def test_instances_share_the_cpus_the_process_gives_its_models(slow_model: Path, cpus: int, threads: list[int]) -> None:
    """What a worker of ``--workers N``, or a process under a CPU quota, gives its models (tests/test_cpus.py).
    With one CPU, auto keeps one instance: a second would hold the weights twice for nothing."""
    with loaded(slow_model, cpus=cpus) as runner:
        assert threads_of(runner) == threads


def test_one_instance_takes_the_cpus_it_is_given_instead_of_onnxruntimes_choice(slow_model: Path) -> None:
    with loaded(slow_model, cpus=3, instance_group={"count": 1}) as runner:
        assert threads_of(runner) == [3]


def test_threads_that_are_set_stay_as_set(slow_model: Path) -> None:
    with loaded(slow_model, instance_group={"count": "auto"}, session_options={"intra_op_num_threads": 3}) as runner:
        assert threads_of(runner) == [3, 3]


def test_a_number_is_kept_and_its_instances_share_the_cpus(slow_model: Path) -> None:
    with loaded(slow_model, instance_group={"count": 3}) as runner:
        assert runner.instance_count == 3
        assert threads_of(runner) == [max(1, CPUS // 3)] * 3
    with loaded(slow_model, instance_group={"count": 1}) as runner:
        assert runner.instance_count == 1
        # One instance: onnxruntime's own choice, unless a CPU quota leaves the process fewer CPUs than it sees.
        assert threads_of(runner) == [model_cpus() or 0]


def test_a_tiny_model_with_an_auto_count_keeps_one_instance_on_the_event_loop(matmul16: Path) -> None:
    with loaded(matmul16, instance_group={"count": "auto", "inline_max_microseconds": 10_000}) as runner:
        assert runner.instance_count == 1
        assert runner.inline


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"sequence_batching": {"max_sequence_idle_microseconds": 1_000_000}}, id="stateful"),
        pytest.param({"device_execution": {"io_binding": True}}, id="io binding"),
    ],
)
def test_other_models_with_an_auto_count_get_one_instance(slow_model: Path, config: dict[str, Any]) -> None:
    with loaded(slow_model, instance_group={"count": "auto"}, **config) as runner:
        assert runner.instance_count == 1


@pytest.mark.parametrize(("group", "parallel_at_half"), [("", True), ("instance_group: {count: 2}\n", False)])
async def test_auto_s_second_instance_waits_for_half_a_batch_and_a_set_count_s_does_not(
    tmp_path: Path, group: str, parallel_at_half: bool
) -> None:
    save_model(build_slow_model(SLOW_MS), tmp_path, "slow", config_yaml="max_batch_size: 8\n" + group)
    config = read_model_config(tmp_path / "slow")
    version = load_model_version(tmp_path / "slow" / "1", "slow", 1, config)
    try:
        assert version.runner.instance_count == 2
        assert version.batcher.policy.parallel_at_half is parallel_at_half
    finally:
        await version.aclose()


@pytest.mark.parametrize(
    ("groups", "count"),
    [
        ("instance_group [ { kind: KIND_CPU } ]", "auto"),
        ("instance_group [ { kind: KIND_CPU count: 3 } ]", 3),
        ("instance_group [ { kind: KIND_CPU count: 1 }, { kind: KIND_CPU } ]", 2),
    ],
)
def test_a_triton_config_without_counts_leaves_the_count_to_the_server(
    tmp_path: Path, groups: str, count: object
) -> None:
    directory = tmp_path / "scale"
    directory.mkdir()
    (directory / "config.pbtxt").write_text(f'name: "scale"\nmax_batch_size: 8\n{groups}\n')
    assert read_model_config(directory).instance_group.count == count


def test_modelconfig_answers_with_the_count_each_model_runs_with(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    save_model(build_slow_model(SLOW_MS), repo, "slow", config_yaml="max_batch_size: 8\n")  # auto, the default
    single = "max_batch_size: 8\ninstance_group: {count: 1}\n"
    save_model(build_slow_model(SLOW_MS), repo, "single", config_yaml=single)
    # On the event loop however busy the machine is, so one instance.
    tiny = "max_batch_size: 8\ninstance_group: {count: auto, inline_max_microseconds: 10000}\n"
    save_model(build_matmul16(), repo, "tiny", config_yaml=tiny)
    with running_server(repo, tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        counts = {
            name: client.get_model_config(name, as_json=True)["config"]["instance_group"][0]["count"]
            for name in ("slow", "single", "tiny")
        }
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        request = grpcclient.InferInput("x", [2, 4], "FP32")
        request.set_data_from_numpy(x)
        answer = client.infer("slow", [request])
    assert counts == {"slow": 2, "single": 1, "tiny": 1}
    np.testing.assert_array_equal(answer.as_numpy("y"), x)  # the two-instance model answers as it should
