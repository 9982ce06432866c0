"""A rolling restart under load drops no request.

Two real server processes sit behind one client-side round-robin gRPC channel, the
way a client balances over a Kubernetes headless Service. While dozens of requests
are in flight, one server gets SIGTERM (as a pod does), drains and exits 0; a
replacement starts on the same port and takes traffic again. Not one request fails,
and every server process answered some of them.

Why it holds: on SIGTERM the server stops accepting and sends GOAWAY, so the
channel moves new calls to the other server, while calls already in flight on the
old one finish within the drain. The reconnect backoff is shortened so the channel
finds the replacement soon; docs/deploy.md recommends the same to clients.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, launch_server
from models import build_slow_model, save_model

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

IN_FLIGHT = 32
MODEL = "slow"
PATIENCE = 60.0  # seconds any phase may take on a busy machine; a bound, never a measurement

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
CHANNEL_OPTIONS = [
    ("grpc.service_config", ROUND_ROBIN),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    # ~10 ms batches of up to 8 rows: requests queue up, so some are always in flight.
    save_model(build_slow_model(10), tmp_path, MODEL, config_yaml="max_batch_size: 8\n")
    return tmp_path


@dataclass
class Load:
    """IN_FLIGHT callers sending requests back to back until stopped."""

    stub: pb_grpc.GRPCInferenceServiceStub
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    answered: int = 0
    failures: list[BaseException] = field(default_factory=list)

    async def caller(self, index: int) -> None:
        x = np.full((1, 4), float(index), dtype=np.float32)
        request = pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
            raw_input_contents=[x.tobytes()],
        )
        while not self.stop.is_set():
            try:
                reply = await self.stub.ModelInfer(request, timeout=PATIENCE)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(exc)
                continue
            y = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
            if not np.array_equal(y, x.ravel()):
                self.failures.append(AssertionError(f"caller {index} got {y}"))
            self.answered += 1


async def served(server: ServerProcess) -> int:
    """Requests this server process has answered, from its own ModelStatistics."""
    async with grpc.aio.insecure_channel(server.url) as channel:
        stats = await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=MODEL), timeout=PATIENCE
        )
    return int(stats.model_stats[0].inference_stats.success.count)


async def eventually(condition: Callable[[], object], what: str) -> None:
    """Poll ``condition`` (sync or async) until true; fail after PATIENCE seconds."""
    async with asyncio.timeout(PATIENCE):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")  # pragma: no cover (timeout raises first)


async def at_least(server: ServerProcess, count: int) -> bool:
    return await served(server) >= count


async def test_sigterm_and_replace_one_of_two_servers_under_load_drops_nothing(
    slow_repository: Path, log_dir: Path
) -> None:
    first = launch_server(slow_repository, log_dir)
    second = launch_server(slow_repository, log_dir)
    replacement: ServerProcess | None = None
    target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
    try:
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            load = Load(pb_grpc.GRPCInferenceServiceStub(channel))
            callers = [asyncio.create_task(load.caller(i)) for i in range(IN_FLIGHT)]

            await eventually(lambda: at_least(first, 50), "the first server answers")
            await eventually(lambda: at_least(second, 50), "the second server answers")

            # The pod is told to stop: drain what it holds, take nothing new, exit 0.
            first.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.terminate) == 0, first.log()
            answered_without_first = load.answered
            await eventually(lambda: load.answered >= answered_without_first + 100, "load goes on meanwhile")

            # Its replacement comes up on the same address and gets its share again.
            replacement = launch_server(slow_repository, log_dir, "--port", str(first.port))
            assert replacement.port == first.port
            await eventually(lambda: at_least(replacement, 50), "the replacement answers")

            load.stop.set()
            await asyncio.gather(*callers)

        assert load.failures == [], f"{len(load.failures)} of {load.answered} requests failed: {load.failures[:3]}"
        assert "draining" in first.log() and "stopped" in first.log()
    finally:
        for server in (first, second, replacement):
            if server is not None:
                server.terminate()
