"""Traces: one server span per RPC, a queue span per request, a batch span linked to its requests.

Each test runs a real server in-process (port 0, real gRPC clients) whose
tracer provider writes to OpenTelemetry's in-memory span exporter.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import eventually
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from telemetry_support import (
    TRACEPARENT,
    TRACEPARENT_SPAN_ID,
    TRACEPARENT_TRACE_ID,
    Observed,
    observed_server,
    telemetry_repository,
)
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return telemetry_repository(demo_repository, tmp_path_factory.mktemp("traces"))


@pytest.fixture
async def observed(repository: Path) -> AsyncIterator[Observed]:
    async with observed_server(repository) as observed:
        yield observed


def _x(rows: int = 1) -> list[InferInput]:
    x = InferInput("x", [rows, 16], "FP32")
    x.set_data_from_numpy(np.ones((rows, 16), np.float32))
    return [x]


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_the_rpc_span_follows_grpc_conventions_under_the_callers_traceparent(observed: Observed) -> None:
    client = aioclient.InferenceServerClient(observed.url)
    try:
        await client.infer("matmul16", _x(), request_id="req-7", headers={"traceparent": TRACEPARENT})
    finally:
        await client.close()

    (span,) = _named(observed.finished_spans(), INFER_SPAN)
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACEPARENT_TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == TRACEPARENT_SPAN_ID
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0,
        "infergate.model.name": "matmul16",
        "infergate.model.version": "1",  # the version served, though the request named none
        "infergate.request.id": "req-7",
        "infergate.batch.size": 1,
        "infergate.route": "default",  # the router's decision (no routing block: the newest version)
        "infergate.shadowed": False,
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_queue_wait_is_a_child_span_and_one_batch_span_links_every_request(observed: Observed) -> None:
    client = aioclient.InferenceServerClient(observed.url)
    try:
        await asyncio.gather(*(client.infer("batch4", _x()) for _ in range(4)))
    finally:
        await client.close()

    spans = observed.finished_spans()
    requests = _named(spans, INFER_SPAN)
    (batch,) = _named(spans, "batch batch4")
    assert len(requests) == 4
    assert {link.context.span_id for link in batch.links} == {r.context.span_id for r in requests}
    assert batch.parent is None  # a root: it belongs to four traces at once
    assert batch.attributes is not None and batch.attributes["infergate.batch.size"] == 4
    assert batch.attributes["infergate.batch.requests"] == 4
    for request in requests:
        assert request.attributes is not None and request.attributes["infergate.batch.size"] == 4
        (queue,) = _children(spans, request)
        assert queue.name == "queue"
        assert queue.start_time is not None and queue.end_time is not None and batch.start_time is not None
        assert request.start_time is not None and request.start_time <= queue.start_time
        assert queue.start_time <= queue.end_time == batch.start_time


async def test_a_refused_call_is_traced_with_its_status(observed: Observed) -> None:
    client = aioclient.InferenceServerClient(observed.url)
    try:
        with pytest.raises(InferenceServerException, match="unknown model"):
            await client.infer("no_such_model", _x())
    finally:
        await client.close()

    # A refused call's status leaves with its abort, before the span around it ends: wait for the span.
    await eventually(lambda: _named(observed.finished_spans(), INFER_SPAN), "the refused call's span")
    (span,) = _named(observed.finished_spans(), INFER_SPAN)
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.attributes["infergate.model.name"] == "no_such_model"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "NOT_FOUND"


async def _health_check(url: str) -> None:
    async with grpc.aio.insecure_channel(url) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_checks_are_not_traced_by_default(observed: Observed) -> None:
    await _health_check(observed.url)
    client = aioclient.InferenceServerClient(observed.url)
    try:
        assert await client.is_server_live()
    finally:
        await client.close()
    names = [s.name for s in observed.finished_spans()]
    assert names == ["inference.GRPCInferenceService/ServerLive"]


async def test_trace_health_traces_health_checks_too(repository: Path) -> None:
    async with observed_server(repository, trace_health=True) as observed:
        await _health_check(observed.url)
        names = [s.name for s in observed.finished_spans()]
    assert names == ["grpc.health.v1.Health/Check"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, []),  # a root request loses the 0% draw: nothing is recorded, nothing is linked
        ({"traceparent": TRACEPARENT}, [INFER_SPAN, "queue", "batch batch4"]),  # sampled by the caller: kept
        ({"traceparent": TRACEPARENT[:-2] + "00"}, []),  # the caller decided not to sample
        # No parent to follow: roots, so the draw decides (they were recorded whatever the ratio).
        ({"tracestate": "vendor=1"}, []),
        ({"traceparent": "00-not-a-trace-context"}, []),
    ],
)
async def test_sampling_is_parent_based_with_a_ratio_for_roots(
    repository: Path, headers: dict[str, str] | None, expected: list[str]
) -> None:
    async with observed_server(repository, sample_ratio=0.0) as observed:
        client = aioclient.InferenceServerClient(observed.url)
        try:
            await asyncio.gather(
                client.infer("batch4", _x(), headers=headers), *(client.infer("batch4", _x()) for _ in range(3))
            )
        finally:
            await client.close()
        assert sorted(s.name for s in observed.finished_spans()) == sorted(expected)


async def test_a_stream_gets_one_span_and_its_requests_queue_under_it(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioclient.InferenceServerClient(observed.url)
    answers: asyncio.Queue[object] = asyncio.Queue()

    async def requests() -> AsyncIterator[dict[str, object]]:
        for i in range(4):
            yield {"model_name": "batch4", "inputs": _x(), "request_id": f"s{i}"}
        for _ in range(4):
            await answers.get()  # keep the stream open until every answer came back

    try:
        async for result, error in client.stream_infer(requests()):
            assert error is None
            answers.put_nowait(result)
    finally:
        await client.close()

    spans = observed.finished_spans()
    (stream,) = _named(spans, "inference.GRPCInferenceService/ModelStreamInfer")
    assert stream.attributes is not None and stream.attributes["rpc.grpc.status_code"] == 0
    assert [s.name for s in _children(spans, stream)] == ["queue"] * 4
    (batch,) = _named(spans, "batch batch4")
    assert [link.context.span_id for link in batch.links] == [stream.context.span_id] * 4
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]  # e.g. "Failed to detach context"


MIRRORED_CONFIG = """\
max_batch_size: 8
version_policy: {all: {}}
routing:
  weights: {1: 100}
  shadow: {version: 2, fraction: 1.0, max_busy_fraction: 1.0}
"""
UNSAMPLED = f"00-{TRACEPARENT_TRACE_ID}-{TRACEPARENT_SPAN_ID}-00"  # the caller decided not to sample


@pytest.fixture
async def mirrored(demo_repository: Path, tmp_path: Path) -> AsyncIterator[Observed]:
    """``mirrored``: matmul16 as version 1, answering, and again as version 2, its shadow."""
    for version in ("1", "2"):
        shutil.copytree(demo_repository / "matmul16" / "1", tmp_path / "mirrored" / version)
    (tmp_path / "mirrored" / "config.yaml").write_text(MIRRORED_CONFIG)
    async with observed_server(tmp_path) as observed:
        yield observed


async def test_a_traced_requests_shadow_call_is_a_span_of_its_own_linked_to_it(mirrored: Observed) -> None:
    client = aioclient.InferenceServerClient(mirrored.url)
    try:
        await client.infer("mirrored", _x(), headers={"traceparent": TRACEPARENT})
        await eventually(lambda: _named(mirrored.finished_spans(), "shadow mirrored"), "the shadow call's span")
        await client.infer("mirrored", _x(), headers={"traceparent": UNSAMPLED})
        await eventually(lambda: _compared(mirrored) == 2, "the second shadow call compared")
    finally:
        await client.close()

    spans = mirrored.finished_spans()
    (request,) = _named(spans, INFER_SPAN)  # the unsampled request made none
    (shadow,) = _named(spans, "shadow mirrored")  # nor did its shadow call
    assert shadow.parent is None  # a root: it runs after the request's trace ended
    assert [link.context.span_id for link in shadow.links] == [request.context.span_id]
    assert dict(shadow.attributes or {}) == {
        "infergate.model.name": "mirrored",
        "infergate.model.version": "2",
        "infergate.shadow.agreed": True,  # the same model twice
        "infergate.shadow.max_abs_diff": 0.0,
        "infergate.batch.size": 1,  # the shadow version's batch that ran it, as for a request
    }
    assert shadow.status.status_code is StatusCode.UNSET
    shadow_batches = [
        s for s in _named(spans, "batch mirrored") if (s.attributes or {})["infergate.model.version"] == "2"
    ]
    assert [link.context.span_id for b in shadow_batches for link in b.links] == [shadow.context.span_id]


def _compared(observed: Observed) -> float:
    return sum(p.value for p in observed.points("infergate.shadow.comparisons") if p.attributes["model"] == "mirrored")
