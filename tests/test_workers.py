"""--workers N: several server processes share one port under a supervisor."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from conftest import launch_server, wait_until


def _worker_pids(log: str) -> dict[int, int]:
    """Latest pid of each worker index, from the supervisor's log lines."""
    pids: dict[int, int] = {}
    for index, pid in re.findall(r"worker (\d+) (?:started|restarted) \(pid (\d+)\)", log):
        pids[int(index)] = int(pid)
    return pids


def _ready(log: str, pid: int) -> bool:
    return re.search(rf"\[{pid}\] .*model\(s\) ready", log) is not None


def _infer_on_fresh_channels(url: str, count: int) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    for _ in range(count):
        # A new client is a new connection, which the kernel may give to either worker.
        client = grpcclient.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        tensor = grpcclient.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("matmul16", [tensor]).as_numpy("y").shape == (1, 16)
        client.close()


def test_workers_share_the_port_restart_after_a_crash_and_drain_on_sigterm(
    demo_repository: Path, log_dir: Path
) -> None:
    server = launch_server(demo_repository, log_dir, "--workers", "2", wait=False)
    try:
        wait_until(lambda: len(_worker_pids(server.log())) == 2, "two workers started")
        for pid in _worker_pids(server.log()).values():
            wait_until(lambda pid=pid: _ready(server.log(), pid), f"worker {pid} ready")
        _infer_on_fresh_channels(server.url, 10)

        crashed = _worker_pids(server.log())[0]
        os.kill(crashed, signal.SIGKILL)
        wait_until(lambda: "worker 0 restarted" in server.log(), "worker 0 restarted")
        replacement = _worker_pids(server.log())[0]
        assert replacement != crashed
        # Its models load again before it may serve: wait for its own "ready" line.
        wait_until(lambda: _ready(server.log(), replacement), "the replacement worker ready")
        _infer_on_fresh_channels(server.url, 10)
        live = list(_worker_pids(server.log()).values())
    finally:
        code = server.terminate()
    assert code == 0, server.log()
    for pid in live:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
