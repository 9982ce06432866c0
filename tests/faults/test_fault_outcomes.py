"""A call that is cancelled or expires is never a success: not in ModelStatistics, not in the
metrics, not for the canary; and the metrics and ModelStatistics agree on every outcome.

Real server processes on 127.0.0.1, real tritonclient calls, a real Prometheus scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, eventually, running_server
from models import build_slow_model, save_model
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc

OK, INVALID, EXPIRED, CANCELLED = 0, 3, 4, 1  # grpc status codes as the metrics label them


def x(width: int = 4) -> list[InferInput]:
    tensor = InferInput("x", [1, width], "FP32")
    tensor.set_data_from_numpy(np.ones((1, width), np.float32))
    return [tensor]


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("outcomes")
    # Several times the 50 ms deadlines below on any machine (the hint is ms on a slow core; a fast one
    # ran a 100 ms hint in 48 ms, and calls meant to expire were answered).
    save_model(build_slow_model(400), repo, "slow", config_yaml="max_batch_size: 8\n")
    # Runs only batches of 8 rows (or after 10 s): a few requests stay queued as long as a test needs.
    held = "max_batch_size: 8\ndynamic_batching: {max_queue_delay_microseconds: 10000000}\n"
    save_model(build_slow_model(1), repo, "held", config_yaml=held)
    with running_server(repo, log_dir, "--metrics-port", "0") as server:
        yield server


async def statistics(client: aioclient.InferenceServerClient, model: str) -> tuple[int, int]:
    (stats,) = (await client.get_inference_statistics(model)).model_stats
    return stats.inference_stats.success.count, stats.inference_stats.fail.count


def requests(server: ServerProcess, model: str, status: int) -> float:
    return server.metric(
        "infergate_requests_total", rpc_method="ModelInfer", model=model, rpc_grpc_status_code=str(status)
    )


def failures(server: ServerProcess, model: str) -> float:
    return requests(server, model, EXPIRED) + requests(server, model, CANCELLED)


def active(server: ServerProcess) -> float:
    return server.metric("infergate_requests_active", rpc_method="ModelInfer")


def idle(server: ServerProcess) -> bool:
    """No inference call is being served: every outcome has been recorded."""
    return active(server) == 0


async def test_calls_that_expire_or_are_cancelled_count_as_failures_never_as_successes(
    slow_server: ServerProcess,
) -> None:
    models = ("slow", "held")
    async with aioclient.InferenceServerClient(slow_server.url) as client:
        await client.infer("slow", x())  # connected: the calls below reach the server before their deadline
        before = {model: await statistics(client, model) for model in models}
        failed_before = {model: failures(slow_server, model) for model in models}
        expired = await asyncio.gather(
            *(client.infer("slow", x(), client_timeout=0.05) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(e, InferenceServerException) and "DEADLINE" in str(e.status()) for e in expired)
        await eventually(lambda: idle(slow_server), "the expired calls finished on the server")
        hung_up = [asyncio.create_task(client.infer("held", x())) for _ in range(5)]
        # They stay queued (held runs full batches of 8 only): the hang-up surely reaches waiting calls.
        await eventually(lambda: slow_server.queued("held") == 5, "five calls queued")
        for task in hung_up:
            task.cancel()
        await asyncio.gather(*hung_up, return_exceptions=True)
        await eventually(lambda: idle(slow_server), "every call finished on the server")
        after = {model: await statistics(client, model) for model in models}
    for model in models:
        (success, fail), (after_success, after_fail) = before[model], after[model]
        assert after_success == success, f"a cancelled or expired call was counted as a success on {model}"
        assert after_fail - fail == failures(slow_server, model) - failed_before[model] > 0
    assert requests(slow_server, "slow", EXPIRED) > 0 and requests(slow_server, "held", CANCELLED) == 5


async def test_metrics_and_model_statistics_agree_on_every_outcome(slow_server: ServerProcess) -> None:
    async with aioclient.InferenceServerClient(slow_server.url) as client:
        await client.infer("slow", x())
        await asyncio.gather(*(client.infer("slow", x()) for _ in range(3)))
        with pytest.raises(InferenceServerException, match="shape"):
            await client.infer("slow", x(width=5))
        with pytest.raises(InferenceServerException, match="DEADLINE"):
            await client.infer("slow", x(), client_timeout=0.05)
        await eventually(lambda: idle(slow_server), "every call finished on the server")
        success, fail = await statistics(client, "slow")
    ok = requests(slow_server, "slow", OK)
    failed = slow_server.metric("infergate_requests_total", rpc_method="ModelInfer", model="slow") - ok
    assert (ok, failed) == (success, fail)
    assert requests(slow_server, "slow", INVALID) >= 1


CANARY = """\
max_batch_size: 8
version_policy: {all: {}}
routing:
  canary: {version: 2, steps: [50, 100], step_requests: 20, max_error_rate: 0.01}
"""


async def test_calls_that_expire_on_the_canary_roll_it_back_instead_of_promoting_it(
    tmp_path: Path, log_dir: Path
) -> None:
    save_model(build_slow_model(1), tmp_path, "canaried", version=1)
    save_model(build_slow_model(300), tmp_path, "canaried", version=2, config_yaml=CANARY)
    with running_server(tmp_path, log_dir) as server:
        async with aioclient.InferenceServerClient(server.url) as client:

            async def rolled_back() -> bool:
                await asyncio.gather(
                    *(client.infer("canaried", x(), client_timeout=0.05) for _ in range(16)), return_exceptions=True
                )
                return canary_state(server) != "ramping"

            await eventually(rolled_back, "the canary judged")
        with_reason = canary_status(server)
    assert with_reason.state == "rolled_back", with_reason
    assert "error rate" in with_reason.reason


def canary_status(server: ServerProcess) -> apb.CanaryStatus:
    with grpc.insecure_channel(server.url) as channel:
        response = apb_grpc.InferGateAdminStub(channel).RoutingStatus(apb.RoutingStatusRequest(name="canaried"))
    return response.models[0].canary


def canary_state(server: ServerProcess) -> str:
    return canary_status(server).state
