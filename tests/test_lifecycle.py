"""Graceful shutdown: SIGTERM under load loses no in-flight request and exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, eventually, launch_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from models import build_slow_model, save_model
from tritonclient.grpc import InferInput


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    save_model(build_slow_model(300), tmp_path, "slow", config_yaml="max_batch_size: 4\n")
    return tmp_path


def _all_arrived_some_running(server: ServerProcess, calls: int) -> bool:
    scrape = server.scrape()
    running = scrape.metric("infergate_requests_active", rpc_method="ModelInfer")
    answered = scrape.metric("infergate_requests_total", rpc_method="ModelInfer", model="slow")
    return running > 0 and running + answered == calls


async def _infer(client: aioclient.InferenceServerClient, value: float) -> np.ndarray:
    x = np.full((1, 4), value, dtype=np.float32)
    tensor = InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = await client.infer("slow", [tensor])
    return result.as_numpy("y")


async def test_sigterm_drains_in_flight_requests_then_exits_zero(slow_repository: Path, log_dir: Path) -> None:
    server = launch_server(slow_repository, log_dir, "--metrics-port", "0")
    try:
        async with aioclient.InferenceServerClient(server.url) as client:
            async with grpc.aio.insecure_channel(server.url) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                # 16 requests on a model that runs 4 rows per ~300 ms batch: several batches of work.
                calls = [asyncio.create_task(_infer(client, float(i))) for i in range(16)]
                # Every call has reached the server before the signal, and some are still there: a condition
                # that holds for the whole second of work, not a moment a slow scrape could miss.
                await eventually(lambda: _all_arrived_some_running(server, 16), "16 calls in the server")
                server.process.send_signal(signal.SIGTERM)
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == [], f"in-flight requests failed during drain: {failures}"
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result, np.full((1, 4), float(i), dtype=np.float32))
        assert await asyncio.to_thread(server.process.wait, 60) == 0
        assert "stopped" in server.log()
    finally:
        server.terminate()


async def test_a_stopped_server_refuses_new_requests(slow_repository: Path, log_dir: Path) -> None:
    server = launch_server(slow_repository, log_dir)
    assert server.terminate() == 0
    async with aioclient.InferenceServerClient(server.url) as client:
        with pytest.raises(Exception, match=r"UNAVAILABLE|failed to connect|Connection refused"):
            await client.is_server_live()


async def test_a_watch_hears_of_shutdown_though_another_watch_of_its_service_ended(
    slow_repository: Path, log_dir: Path
) -> None:
    """Two clients watch the server's health; one stops. The other still hears NOT_SERVING at SIGTERM
    (grpcio-health-checking's own servicer dropped the watchers' shared condition with the first to go)."""
    server = launch_server(slow_repository, log_dir)
    try:
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            leaving = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            staying = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            for watch in (leaving, staying):
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            leaving.cancel()
            await stub.Check(health_pb2.HealthCheckRequest(service=""))  # a call after the cancel, answered
            server.process.send_signal(signal.SIGTERM)
            assert (await staying.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.to_thread(server.process.wait, 60) == 0
    finally:
        server.terminate()
