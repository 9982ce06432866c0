"""``python -m load_tests suite`` end to end, cut short, and the reading of threads behind its CPU table."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

from infergate import threadnames
from infergate.models.cpus import model_cpus, usable_cpus
from infergate.models.runner import intra_op_threads
from load_tests.procfs import ROLES, cpu_by_role, thread_cpu
from load_tests.suite import REPO_ROOT


def burn(cpu_seconds: float) -> None:
    """Use ``cpu_seconds`` of this thread's CPU time (not wall-clock time: a busy machine only makes it longer)."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def test_cpu_by_role_counts_the_main_thread_as_the_event_loop_and_ort_threads_as_models() -> None:
    burned, release = threading.Event(), threading.Event()

    def model_thread() -> None:
        threadnames.set_name("ort-spec-0")
        burn(0.2)
        burned.set()
        release.wait()  # alive at the second reading

    thread = threading.Thread(target=model_thread)
    before = thread_cpu([os.getpid()])
    thread.start()  # after the first reading: a thread that starts in between counts from zero
    burn(0.2)
    burned.wait()
    spent = cpu_by_role(before, thread_cpu([os.getpid()]))
    release.set()
    thread.join()
    assert set(spent) == set(ROLES)
    assert spent["event loop"] >= 0.1, "this process's main thread"
    assert spent["models"] >= 0.1, "the thread named ort-*"


def test_the_suite_runs_every_server_and_says_where_their_cpu_went(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "suite"
    argv = [sys.executable, "-m", "load_tests", "suite", "--scenarios", "mlp_b8_c32",
            "--duration", "1", "--warmup", "0.5", "--compute-duration", "0.2", "--out", str(out)]  # fmt: skip
    run = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "suite.json").read_text())
    assert report["failures"] == []
    assert report["infergate"]["mlp_b8_c32"]["requests"] > 0
    ceiling, infergate = (report["server_cpu"][name]["mlp_b8_c32"] for name in ("ceiling", "infergate"))
    assert set(infergate) == set(ROLES)
    assert ceiling["models"] == 0, "the ceiling runs no model"
    assert max(infergate, key=infergate.get) == "models", "mlp's batches run on threads named ort-mlp*"
    table = (out / "suite.md").read_text().split("## Where the CPU went", 1)[1]
    assert "server CPU µs per request" in table
    # In-process onnxruntime also as infergate serves mlp (auto: two sessions sharing the CPUs, where there
    # are two), each session driven from a thread of its own; the target names the best layout.
    layouts = {(c["sessions"], c["intra_op_threads"]) for c in report["compute"] if c["model"] == "mlp"}
    served = intra_op_threads(0, 2, True, model_cpus())  # the runner's share of the models' CPUs
    assert layouts == ({(1, 0), (2, served)} if usable_cpus() >= 2 else {(1, 0)})
    (target,) = [t for t in report["targets"] if t["key"] == "d"]
    assert "best in-process" in target["description"] and "session" in target["description"]
