"""Priorities under overload: priority-1 requests are batched first and shed last, so a priority-1
stream keeps its latency while priority-2 traffic overloads the queue.

A real server runs a slow model (about 100 ms per batch of 4) with Triton's priority config;
40 priority-2 callers keep its 32-place queue full while one priority-1 caller sends 15 requests.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, eventually, running_server
from models import build_slow_model, save_model
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.alone  # compares latencies under load: make test runs it with the machine to itself

CONFIG = """\
max_batch_size: 4
dynamic_batching: {max_queue_size: 32, priority_levels: 2, default_priority_level: 2}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("priority")
    save_model(build_slow_model(100), repo, "slow", config_yaml=CONFIG)
    save_model(build_slow_model(1), repo, "plain", config_yaml="max_batch_size: 4\n")
    with running_server(repo, log_dir, "--metrics-port", "0") as started:
        yield started


def x() -> list[InferInput]:
    tensor = InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return [tensor]


async def test_a_priority_1_stream_keeps_its_latency_while_priority_2_traffic_overloads_the_queue(
    server: ServerProcess,
) -> None:
    low_latencies: list[float] = []
    low_refused = 0
    stop = asyncio.Event()

    async def low(client: aioclient.InferenceServerClient) -> None:
        nonlocal low_refused
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await client.infer("slow", x(), priority=2, client_timeout=60)
            except InferenceServerException as exc:
                assert "queue full" in exc.message(), exc.message()
                low_refused += 1
                await asyncio.sleep(0.01)
                continue
            low_latencies.append(time.perf_counter() - started)

    async with aioclient.InferenceServerClient(server.url) as client:
        flood = [asyncio.create_task(low(client)) for _ in range(40)]
        await eventually(lambda: server.queued("slow") >= 30, "the queue full")
        high_latencies = []
        for _ in range(15):
            started = time.perf_counter()
            await client.infer("slow", x(), priority=1, client_timeout=60)  # never refused: it sheds a low one
            high_latencies.append(time.perf_counter() - started)
        stop.set()
        await asyncio.gather(*flood)
    assert low_refused > 0, "the priority-2 traffic never overloaded the queue"
    # Compared within one run, not against a clock: a priority-1 request heads the next batch, while a
    # priority-2 one waits behind a full queue (eight batches).
    p99_high = sorted(high_latencies)[-1]
    assert p99_high < statistics.median(low_latencies), (high_latencies, statistics.median(low_latencies))


async def test_a_priority_past_the_models_levels_takes_its_default_level_as_in_triton(server: ServerProcess) -> None:
    """Triton's InferenceRequest::SetPriority: 0, or a priority over the model's levels, is the default."""
    async with aioclient.InferenceServerClient(server.url) as client:
        for model, priority in [("slow", 3), ("plain", 1)]:
            answer = await client.infer(model, x(), priority=priority, client_timeout=60)
            assert answer.as_numpy("y") is not None, (model, priority)
