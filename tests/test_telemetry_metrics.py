"""Metrics: what an operator sees agrees with ModelStatistics, and every instrument reports.

A real server runs in-process with OpenTelemetry's in-memory metric reader;
clients are real tritonclient ones over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import eventually
from telemetry_support import Observed, observed_server, telemetry_repository
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.telemetry.metrics import MAX_MODEL_LABELS, OTHER_MODELS


@pytest.fixture(scope="module")
def repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return telemetry_repository(demo_repository, tmp_path_factory.mktemp("metrics"))


@pytest.fixture
async def observed(repository: Path) -> AsyncIterator[Observed]:
    async with observed_server(repository) as observed:
        yield observed


def _x(rows: int = 1, width: int = 16) -> list[InferInput]:
    x = InferInput("x", [rows, width], "FP32")
    x.set_data_from_numpy(np.ones((rows, width), np.float32))
    return [x]


def _where(points: list[Any], **attributes: Any) -> list[Any]:
    return [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]


def _one(points: list[Any], **attributes: Any) -> Any:
    (point,) = _where(points, **attributes)
    return point


async def test_metrics_agree_with_model_statistics_after_a_known_workload(observed: Observed) -> None:
    client = aioclient.InferenceServerClient(observed.url)
    try:
        for rows in (1, 2, 3, 1, 1, 4, 1, 2, 1, 1):  # 10 requests, 17 rows, one by one
            await client.infer("matmul16", _x(rows))
        await asyncio.gather(*(client.infer("batch4", _x()) for _ in range(4)))  # one batch of 4
        with pytest.raises(InferenceServerException, match="shape"):
            await client.infer("matmul16", _x(1, width=15))
        statistics = {
            s.name: s for s in (await client.get_inference_statistics(as_json=False)).model_stats
        }  # fmt: skip
    finally:
        await client.close()

    requests = observed.points("infergate.requests")
    queue = observed.points("infergate.queue.duration")
    compute = observed.points("infergate.compute.duration")
    batch = observed.points("infergate.batch.size")
    ok, invalid = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for model in ("matmul16", "batch4"):
        stats = statistics[model]
        stats_kw = {"model": model, "model_version": "1"}
        inference = stats.inference_stats
        assert _one(requests, **{"rpc.grpc.status_code": ok}, **stats_kw).value == (inference.success.count)
        assert sum(p.value for p in _where(requests, model=model)) == inference.success.count + inference.fail.count
        assert _one(queue, **stats_kw).count == inference.queue.count
        assert _one(batch, **stats_kw).count == _one(compute, **stats_kw).count == stats.execution_count
        assert _one(batch, **stats_kw).sum == stats.inference_count
    assert statistics["matmul16"].inference_stats.success.count == 10
    assert statistics["matmul16"].inference_count == 17
    assert statistics["batch4"].execution_count == 1
    assert _one(requests, model="matmul16", **{"rpc.grpc.status_code": invalid}).value == 1
    assert statistics["matmul16"].inference_stats.fail.count == 1


async def test_model_loads_are_counted_by_outcome(observed: Observed) -> None:
    loads = observed.points("infergate.model.loads")
    assert _one(loads, model="matmul16", outcome="success").value == 1
    assert _one(loads, model="batch4", outcome="success").value == 1
    assert _one(loads, model="broken", outcome="failure").value == 1
    assert not _where(loads, model="broken", outcome="success")


async def test_queue_depth_and_requests_in_flight_are_gauged(observed: Observed) -> None:
    def depth() -> int:
        return int(_one(observed.points("infergate.queue.depth"), model="batch4", model_version="1").value)

    def active() -> int:
        return int(_one(observed.points("infergate.requests.active"), **{"rpc.method": "ModelInfer"}).value)

    client = aioclient.InferenceServerClient(observed.url)
    try:
        assert depth() == 0
        waiting = [asyncio.create_task(client.infer("batch4", _x())) for _ in range(3)]  # short of a batch of 4
        await eventually(lambda: depth() == 3, "three requests queued")
        assert active() == 3
        await asyncio.gather(client.infer("batch4", _x()), *waiting)  # the fourth completes the batch
    finally:
        await client.close()
    assert depth() == 0
    assert active() == 0


async def test_process_cpu_and_memory_are_reported(observed: Observed) -> None:
    cpu = observed.points("process.cpu.time")
    assert {p.attributes["cpu.mode"] for p in cpu} == {"user", "system"}
    assert sum(p.value for p in cpu) > 0
    (memory,) = observed.points("process.memory.usage")
    assert memory.value > 10 * 1024 * 1024  # a Python process with onnxruntime loaded


async def test_model_names_a_caller_invents_add_no_series_without_end(observed: Observed) -> None:
    async with aioclient.InferenceServerClient(observed.url) as client:
        for i in range(20):
            with pytest.raises(InferenceServerException, match="unknown model"):
                await client.infer(f"no-such-model-{i}", _x())

    def not_found() -> list[tuple[str, int]]:
        points = _where(observed.points("infergate.request.duration"), **{"rpc.grpc.status_code": 5})
        return [(p.attributes["model"], p.count) for p in points]

    # A call is counted when it ends on the server, which may be just after its client has the answer.
    await eventually(lambda: sum(count for _, count in not_found()) >= 20, "the 20 refused calls counted")
    assert not_found() == [("", 20)]  # one series counts them all

    metrics = observed.server.telemetry.metrics
    assert metrics is not None
    sources = [_Depth() for _ in range(MAX_MODEL_LABELS + 50)]
    for i, source in enumerate(sources):  # a repository that served more versions than labels allow
        metrics.watch_queue("mlp", i, source)
        metrics.request_started("ModelInfer")
        metrics.request_finished("ModelInfer", "mlp", str(i), 0, 0.001)
    points = observed.points("infergate.request.duration")
    labels = {(p.attributes["model"], p.attributes["model_version"]) for p in points}
    assert len(labels) <= MAX_MODEL_LABELS + 2 and (OTHER_MODELS, "") in labels  # + no model, + the rest
    assert sum(p.count for p in _where(points, model=OTHER_MODELS)) >= 50  # counted all the same


class _Depth:
    def queue_depth(self) -> int:
        return 0


async def test_auth_refusals_and_shadow_comparisons_have_recorders(observed: Observed) -> None:
    metrics = observed.server.telemetry.metrics
    assert metrics is not None
    metrics.record_auth_refusal("expired")
    metrics.record_auth_refusal("expired")
    metrics.record_auth_refusal("missing_token")
    metrics.record_shadow("mlp", agreement=True, max_abs_diff=1e-7, error=False, dropped=False)
    metrics.record_shadow("mlp", agreement=False, max_abs_diff=0.5, error=False, dropped=False)
    metrics.record_shadow("mlp", agreement=None, max_abs_diff=None, error=False, dropped=False)
    metrics.record_shadow("mlp", agreement=None, max_abs_diff=None, error=True, dropped=False)
    metrics.record_shadow("mlp", agreement=None, max_abs_diff=None, error=False, dropped=True)

    refusals = observed.points("infergate.auth.refusals")
    assert {p.attributes["reason"]: p.value for p in refusals} == {"expired": 2, "missing_token": 1}
    comparisons = observed.points("infergate.shadow.comparisons")
    assert {p.attributes["agreement"]: p.value for p in comparisons} == {"true": 1, "false": 1, "unknown": 1}
    metrics.record_shadow(
        "mlp", agreement=False, max_abs_diff=float("inf"), error=False, dropped=False
    )  # shapes differ
    (diff,) = observed.points("infergate.shadow.max_abs_diff")
    assert diff.count == 2 and diff.max == 0.5 and diff.sum == pytest.approx(0.5 + 1e-7)  # the sum stays finite
    assert _one(observed.points("infergate.shadow.errors"), model="mlp").value == 1
    assert _one(observed.points("infergate.shadow.dropped"), model="mlp").value == 1


async def test_names_that_are_no_served_model_or_version_label_no_new_series(repository: Path) -> None:
    async with observed_server(repository, {"shared_memory": {"system": {"enabled": True}}}) as observed:
        await _call_with_names_the_server_lacks(observed)


async def _call_with_names_the_server_lacks(observed: Observed) -> None:
    def series() -> int:
        return len(observed.points("infergate.request.duration")) + len(observed.points("infergate.requests"))

    def counted() -> int:
        return sum(p.count for p in observed.points("infergate.request.duration"))

    async def calls(client: aioclient.InferenceServerClient, name: str, version: str) -> None:
        assert not await client.is_model_ready(name)  # answered OK
        with pytest.raises(InferenceServerException, match="unknown model"):
            await client.get_model_metadata(name)
        await client.unregister_system_shared_memory(name)  # a region name, no model's
        with pytest.raises(InferenceServerException):
            await client.register_system_shared_memory(name, f"/no-such-key-{name}", 8)
        for bad in (f"v{version}", str(1000 + len(version))):  # not a number; a version matmul16 lacks
            with pytest.raises(InferenceServerException):
                await client.infer("matmul16", _x(), model_version=bad)

    async with aioclient.InferenceServerClient(observed.url) as client:
        await client.infer("matmul16", _x())
        assert await client.is_model_ready("matmul16")
        await calls(client, "first-name", "first")  # each method and status has its series now
        await eventually(lambda: counted() == 8, "the first calls counted")
        before = series()
        for i in range(30):
            await calls(client, f"name-{i}", str(i))
        await eventually(lambda: counted() == 8 + 30 * 6, "every call counted")
    assert series() == before

    points = observed.points("infergate.request.duration")
    labels = {(p.attributes["rpc.method"], p.attributes["model"], p.attributes["model_version"]) for p in points}
    assert labels == {
        ("ModelInfer", "matmul16", "1"),  # answered: the model and version that answered
        ("ModelReady", "matmul16", ""),
        ("ModelInfer", "matmul16", ""),  # a version it lacks, or not a number: the model alone
        ("ModelReady", "", ""),
        ("ModelMetadata", "", ""),
        ("SystemSharedMemoryUnregister", "", ""),
        ("SystemSharedMemoryRegister", "", ""),
    }
