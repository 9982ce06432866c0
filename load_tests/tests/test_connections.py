"""``connections``: one generator process spreads its calls over several connections, and so over the
workers of a ``--workers N`` server, which the kernel picks per connection, not per call."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

from infergate.demo import write_demo_repository
from infergate.telemetry.logs import LISTENING
from load_tests.generator import LoadConfig, run_closed_loop
from load_tests.gpu.phases import worker_batches
from load_tests.servers import free_port, running_server
from load_tests.suite import REPO_ROOT


def test_one_process_with_many_connections_reaches_every_worker(tmp_path: pathlib.Path) -> None:
    write_demo_repository(tmp_path / "models")
    port = free_port()
    target = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(tmp_path / "models"),
            "--port", str(port), "--workers", "2"]  # fmt: skip
    log = tmp_path / "server.log"
    # Every worker listens once the supervisor says so; before that, the first alone takes every connection.
    with running_server("infergate", argv, target, log, REPO_ROOT, models=("matmul16",), announces=LISTENING):
        # 16 connections: each lands on either worker, so both get some but with odds of 2 in 65,536.
        config = LoadConfig(target=target, model="matmul16", concurrency=16, connections=16, duration=1.0, warmup=0.2)
        result = run_closed_loop(config)
        assert result.requests > 0 and not result.errors
        seen = worker_batches(target, ["matmul16"], workers=2)
    assert sorted(b.worker for b in seen) == ["0/2", "1/2"]
    assert all(not math.isnan(b.averages["matmul16"]) for b in seen), "a worker that served nothing"


def test_several_connections_need_the_raw_client() -> None:
    with pytest.raises(ValueError, match="raw client"):
        LoadConfig(target="127.0.0.1:1", model="m", client="sdk", connections=2)
    with pytest.raises(ValueError, match="at least 1"):
        LoadConfig(target="127.0.0.1:1", model="m", connections=0)
