"""--workers N: several server processes share one port under a supervisor."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from conftest import launch_server


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


def _wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)  # waiting on another process's log: no event to wait on


def test_workers_share_the_port_restart_after_a_crash_and_drain_on_sigterm(
    demo_repository: Path, log_dir: Path
) -> None:
    server = launch_server(demo_repository, log_dir, "--workers", "2", wait=False)
    try:
        _wait_for(lambda: len(_worker_pids(server.log())) == 2)
        for pid in _worker_pids(server.log()).values():
            _wait_for(lambda pid=pid: _ready(server.log(), pid))
        _infer_on_fresh_channels(server.url, 10)

        crashed = _worker_pids(server.log())[0]
        os.kill(crashed, signal.SIGKILL)
        _wait_for(lambda: "worker 0 restarted" in server.log())
        replacement = _worker_pids(server.log())[0]
        assert replacement != crashed
        # Its models load again before it may serve: wait for its own "ready" line.
        _wait_for(lambda: _ready(server.log(), replacement))
        _infer_on_fresh_channels(server.url, 10)
        live = list(_worker_pids(server.log()).values())
    finally:
        code = server.terminate()
    assert code == 0, server.log()
    for pid in live:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
