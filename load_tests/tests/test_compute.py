"""The in-process baseline: onnxruntime run the way a server would lay it out, no server, no network.

Fake sessions stand in for onnxruntime where what is asserted is who calls
them; nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import pathlib
import sys
import threading

import onnx
import pytest

from infergate.demo import build_matmul16, write_demo_repository
from load_tests import layouts
from load_tests.compute import Layout, measure_batch, run_compute
from load_tests.servers import free_port, running_server
from load_tests.signature import ModelSignature, TensorSpec
from load_tests.suite import REPO_ROOT

MATMUL = ModelSignature("matmul16", (TensorSpec("x", "FP32", (-1, 16)),), (TensorSpec("y", "FP32", (-1, 16)),))


class _Session:
    """Records the threads that run it after its five warm-up calls; the first of those runs waits until
    every session has started one."""

    def __init__(self, started: threading.Barrier) -> None:
        self.started, self.threads, self.runs = started, set[int](), 0

    def run(self, outputs: object, feeds: dict[str, object]) -> None:
        self.runs += 1
        if self.runs <= 5:
            return
        if self.runs == 6:
            self.started.wait()  # broken (an error) unless the other session runs at the same time
        self.threads.add(threading.get_ident())


def test_several_sessions_run_at_once_each_from_a_thread_of_its_own() -> None:
    started = threading.Barrier(2, timeout=30)
    sessions = [_Session(started), _Session(started)]
    result = measure_batch(sessions, MATMUL, 4, 0.1, threads=1, provider="CPUExecutionProvider")
    assert [len(s.threads) for s in sessions] == [1, 1] and sessions[0].threads != sessions[1].threads
    assert result.calls == sum(s.runs for s in sessions) - 2 * 5  # warm-up calls not counted
    assert (result.sessions, result.intra_op_threads, result.layout) == (2, 1, Layout(2, 1))
    assert result.samples_per_s == pytest.approx(4 * result.calls / result.seconds)


def test_run_compute_opens_the_sessions_of_the_layout(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(build_matmul16(), str(path))
    results = run_compute(path, [1, 4], 0.05, name="matmul16", layout=Layout(sessions=2, threads=1))
    assert [(r.batch, r.sessions, r.intra_op_threads) for r in results] == [(1, 2, 1), (4, 2, 1)]
    assert all(r.calls > 0 for r in results)


@pytest.mark.parametrize(
    ("layout", "text"),
    [
        (Layout(), "1 session x onnxruntime's threads"),
        (Layout(2, 1), "2 sessions x 1 thread"),
        (Layout(1, 4), "1 session x 4 threads"),
    ],
)
def test_a_layout_says_what_it_runs(layout: Layout, text: str) -> None:
    assert str(layout) == text


def test_the_layout_asked_of_a_server_gives_one_session_the_models_cpus_as_the_runner_does(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One session with every CPU keeps onnxruntime's own thread count (0); under a CPU quota the runner
    gives it the quota's CPUs, and so must the baseline (a default-threads session throttled to a quota
    would be a weak baseline). The quota is the test's: the layout is worked out in this process."""
    write_demo_repository(tmp_path / "models")
    (tmp_path / "models" / "mlp" / "config.yaml").write_text("max_batch_size: 64\ninstance_group: {count: 1}\n")
    port = free_port()
    target = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(tmp_path / "models"),
            "--port", str(port)]  # fmt: skip
    with running_server("infergate", argv, target, tmp_path / "server.log", REPO_ROOT, models=("mlp",)):
        monkeypatch.setattr(layouts, "model_cpus", lambda: None)
        unlimited = layouts.served_layout(target, "mlp")
        monkeypatch.setattr(layouts, "model_cpus", lambda: 3)
        quota = layouts.served_layout(target, "mlp")
    assert (unlimited, quota) == (Layout(1, 0), Layout(1, 3))
