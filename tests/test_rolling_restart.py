"""A rolling restart under load drops no request.

Two real server processes sit behind the SDK's client-side round-robin (an
``infergate_client.AsyncClient`` given both addresses), the way a client
balances over a Kubernetes headless Service. While dozens of requests
are in flight, one server gets SIGTERM (as a pod does), drains and exits 0; a
replacement starts on the same port and takes traffic again. Not one request fails,
and every server process answered some of them.

Why it holds: on SIGTERM the server reports NOT_SERVING at once and keeps serving
for ``shutdown_delay_seconds``; the channel watches health (client-side health
checking, on by default in the SDK) and stops picking that server. Then the port
closes (GOAWAY) and calls already in flight finish within the drain. Without the
delay and the health watch, calls that reach the port while it closes are
cancelled: 3 of 8 runs of this test lost 1 to 8 requests that way on the busy
development machine. The SDK's reconnect backoff is short, so the channel finds
the replacement soon. The SDK's own retries are off here, so that a dropped call
shows as a failure instead of being hidden by a retry.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, eventually, launch_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from models import build_slow_model, save_model

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.server import SERVICE_NAME
from infergate_client import AsyncClient, InferGateError, RetryPolicy

IN_FLIGHT = 32
MODEL = "slow"
PATIENCE = 60.0  # seconds any phase may take on a busy machine; a bound, never a measurement

NO_RETRIES = RetryPolicy(max_attempts=1)  # a dropped call must show as a failure, not be retried away


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    # ~10 ms batches of up to 8 rows: requests queue up, so some are always in flight.
    repository = tmp_path / "models"
    save_model(build_slow_model(10), repository, MODEL, config_yaml="max_batch_size: 8\n")
    return repository


@pytest.fixture
def server_config(tmp_path: Path) -> Path:
    # On SIGTERM: NOT_SERVING at once, still serving for 1 s while watchers move away, then drain.
    path = tmp_path / "server.yaml"
    path.write_text("shutdown_delay_seconds: 1\n")
    return path


@dataclass
class Load:
    """IN_FLIGHT callers sending requests back to back until stopped."""

    client: AsyncClient
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    answered: int = 0
    failures: list[BaseException] = field(default_factory=list)

    async def caller(self, index: int) -> None:
        x = np.full((1, 4), float(index), dtype=np.float32)
        while not self.stop.is_set():
            try:
                y = (await self.client.infer(MODEL, {"x": x}, timeout=PATIENCE))["y"]
                assert np.array_equal(y, x), f"sent {index}, got {y}"
            except (InferGateError, AssertionError) as exc:
                self.failures.append(exc)
                continue
            self.answered += 1


async def infer(stub: pb_grpc.GRPCInferenceServiceStub, value: float) -> None:
    """One ModelInfer on the identity-valued slow model; raises unless it answers ``value`` back."""
    x = np.full((1, 4), value, dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x.tobytes()],
    )
    reply = await stub.ModelInfer(request, timeout=PATIENCE)
    y = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
    assert np.array_equal(y, x.ravel()), f"sent {value}, got {y}"


async def served(server: ServerProcess) -> int:
    """Requests this server process has answered, from its own ModelStatistics."""
    async with grpc.aio.insecure_channel(server.url) as channel:
        stats = await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=MODEL), timeout=PATIENCE
        )
    return int(stats.model_stats[0].inference_stats.success.count)


async def at_least(server: ServerProcess, count: int) -> bool:
    return await served(server) >= count


async def test_sigterm_and_replace_one_of_two_servers_under_load_drops_nothing(
    slow_repository: Path, server_config: Path, log_dir: Path
) -> None:
    config = ("--config", str(server_config))
    first = launch_server(slow_repository, log_dir, *config)
    second = launch_server(slow_repository, log_dir, *config)
    replacement: ServerProcess | None = None
    addresses = [first.url, second.url]
    try:
        async with AsyncClient(addresses, retry=NO_RETRIES, timeout=PATIENCE) as client:
            load = Load(client)
            callers = [asyncio.create_task(load.caller(i)) for i in range(IN_FLIGHT)]

            await eventually(lambda: at_least(first, 50), "the first server answers")
            await eventually(lambda: at_least(second, 50), "the second server answers")

            # The pod is told to stop: drain what it holds, take nothing new, exit 0.
            first.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.terminate) == 0, first.log()
            answered_without_first = load.answered
            await eventually(lambda: load.answered >= answered_without_first + 100, "load goes on meanwhile")

            # Its replacement comes up on the same address and gets its share again.
            replacement = launch_server(slow_repository, log_dir, *config, "--port", str(first.port))
            assert replacement.port == first.port
            await eventually(lambda: at_least(replacement, 50), "the replacement answers")

            load.stop.set()
            await asyncio.gather(*callers)

        assert load.failures == [], f"{len(load.failures)} of {load.answered} requests failed: {load.failures[:3]}"
        assert "NOT_SERVING; still serving for 1.0s" in first.log() and "stopped" in first.log()
    finally:
        for server in (first, second, replacement):
            if server is not None:
                server.terminate()


async def test_during_the_shutdown_delay_health_says_not_serving_and_calls_are_still_answered(
    slow_repository: Path, tmp_path: Path, log_dir: Path
) -> None:
    config = tmp_path / "delay.yaml"
    config.write_text("shutdown_delay_seconds: 10\n")  # room for one call on a busy machine
    server = launch_server(slow_repository, log_dir, "--config", str(config))
    try:
        async with grpc.aio.insecure_channel(server.url) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=PATIENCE
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            server.process.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await infer(pb_grpc.GRPCInferenceServiceStub(channel), 7.0)
            watch.cancel()
        assert await asyncio.to_thread(server.process.wait, PATIENCE) == 0, server.log()
    finally:
        server.terminate()
