"""The soak command: its growth arithmetic by table, /proc sampling of a real process, and a short real run."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from load_tests.procfs import listener_pid, usage
from load_tests.soak import OPERATIONS, Sample, rss_growth
from load_tests.suite import REPO_ROOT

MiB = 2**20


def _samples(*rss_mib: float) -> list[Sample]:
    """One sample a second with these RSS values."""
    return [Sample(float(t), int(mib * MiB), 10, 5, 1, t * 100) for t, mib in enumerate(rss_mib)]


@pytest.mark.parametrize(
    ("rss_mib", "warmup_s", "from_s", "percent", "within"),
    [
        ((100, 100, 100, 100, 100, 100), 2, 2.0, 0.0, True),
        ((90, 95, 100, 100, 100, 104, 104, 104), 2, 2.0, 4.0, True),
        ((100, 100, 100, 100, 100, 106, 106, 106), 2, 2.0, 6.0, False),
        ((100, 100, 100, 200, 100, 100, 100, 100), 2, 2.0, 0.0, True),  # one passing peak is not a level
        ((100, 100, 100, 100, 100, 98, 98, 98), 2, 2.0, -2.0, True),
    ],
)
def test_rss_growth_runs_from_the_level_after_the_warm_up_to_the_level_at_the_end(
    rss_mib: tuple[float, ...], warmup_s: float, from_s: float, percent: float, within: bool
) -> None:
    growth = rss_growth(_samples(*rss_mib), warmup_s, 5.0)
    assert (growth["from_s"], growth["growth_percent"], growth["within_bound"]) == (from_s, percent, within)


def test_the_listener_of_a_port_and_its_usage_are_read_from_proc() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert listener_pid(port) == os.getpid()
        now = usage(os.getpid())
    assert now.rss_bytes > 10 * MiB
    assert now.fds >= 4  # stdin, stdout, stderr and the socket at least
    assert now.threads >= 1
    assert now.processes >= 1
    assert listener_pid(port) is None  # closed: nobody listens


def test_a_short_soak_starts_a_server_runs_every_operation_and_reports_its_growth(tmp_path: pathlib.Path) -> None:
    command = [sys.executable, "-m", "load_tests", "soak", "--minutes", "0.1", "--sample-seconds", "0.5"]
    command += ["--concurrency", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "soak.json").read_text())

    assert report["unexpected"]["count"] == 0, report["unexpected"]
    assert set(report["operations"]) <= {operation.name for operation in OPERATIONS}
    assert report["operations"]["unary"]["OK"] > 0
    assert set(report["config"]["models"]) == {"matmul16", "mlp", "cnn", "multi_io", "identity_all"}
    samples = report["samples"]
    assert len(samples) >= 5
    assert all(s["rss_bytes"] > 10 * MiB and s["fds"] > 0 and s["processes"] == 1 for s in samples)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    rss = report["rss"]
    assert rss["from_s"] < rss["to_s"] == samples[-1]["t"] == report["duration_s"]
    assert rss["bound_percent"] == 5.0 and isinstance(rss["within_bound"], bool)
    assert f"{rss['growth_percent']:+.2f}%" in done.stdout
    assert "rss" in done.stderr  # a progress line per sample
