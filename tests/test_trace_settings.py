"""Triton's trace extension: tritonclient reads and changes which calls are traced, server-wide or per model.

* The sampler: a model's rule overrides the server-wide one field by field,
  ``trace_count`` runs out, a cleared field follows the server again.
* Through a real server whose spans land in memory: ``trace_level: OFF`` for
  one model stops its spans and no other's; clearing it brings them back; a
  count runs out; a caller that sent a sampled ``traceparent`` is traced
  whatever the settings say.
* A request that cannot be applied is refused naming what, and changes
  nothing; an unknown model is NOT_FOUND; a server without tracing reads OFF
  and refuses changes (FAILED_PRECONDITION, naming ``--traces``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import embedded_server
from telemetry_support import TRACEPARENT, Observed, observed_server, telemetry_repository
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument, Unimplemented
from infergate.serving.trace_settings import TraceChange, requested_trace_change
from infergate.telemetry.sampling import UNLIMITED, TraceRule, TraceSampler

INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"
SERVER_WIDE = {
    "trace_level": ["TIMESTAMPS"],
    "trace_rate": ["1"],
    "trace_count": ["-1"],
    "trace_mode": ["opentelemetry"],
}

# --------------------------------------------------------------------------- the sampler


def test_a_models_rule_overrides_the_server_wide_one_field_by_field() -> None:
    sampler = TraceSampler(1.0, random.Random(3))
    sampler.update("a", TraceRule(level="OFF"))
    assert [sampler.sample("a"), sampler.sample("b"), sampler.sample("")] == [False, True, True]
    sampler.update("", TraceRule(ratio=0.5))
    assert sampler.rule("a") == TraceRule("OFF", 0.5, UNLIMITED)  # its level, the server's rate
    sampler.update("a", TraceRule(), cleared=frozenset({"level"}))
    assert sampler.rule("a") == sampler.rule("") == TraceRule("TIMESTAMPS", 0.5, UNLIMITED)
    drawn = sum(sampler.sample("a") for _ in range(2000))
    assert 850 < drawn < 1150  # about half: the server-wide rate now applies to it


def test_a_count_runs_out_in_its_own_scope() -> None:
    sampler = TraceSampler(1.0)
    sampler.update("a", TraceRule(count=2))
    sampler.update("", TraceRule(count=1))
    assert [sampler.sample("a") for _ in range(3)] == [True, True, False]
    assert [sampler.sample("b") for _ in range(2)] == [True, False]  # the server-wide budget
    assert sampler.rule("a").count == 0 and sampler.rule("").count == 0
    sampler.update("a", TraceRule(), cleared=frozenset({"count"}))
    assert sampler.sample("a") is False  # now on the server-wide budget, which is spent


def test_a_ratio_of_zero_at_start_reads_as_off() -> None:
    sampler = TraceSampler(0.0)
    assert sampler.rule("") == TraceRule("OFF", 1.0, UNLIMITED)
    assert sampler.sample("a") is False
    sampler.update("", TraceRule(level="TIMESTAMPS"))
    assert sampler.sample("a") is True


def test_changes_of_one_scope_merge_into_one_for_a_worker_that_joins_later() -> None:
    first = TraceChange("a", TraceRule(level="OFF", count=5))
    later = TraceChange("a", TraceRule(ratio=0.1), frozenset({"count"}))
    merged = first.then(later)
    assert merged == TraceChange("a", TraceRule(level="OFF", ratio=0.1), frozenset({"count"}))
    assert TraceChange.from_message(merged.as_message()) == merged


def _values(**settings: list[str]) -> dict[str, pb.TraceSettingRequest.SettingValue]:
    return {name: pb.TraceSettingRequest.SettingValue(value=values) for name, values in settings.items()}


@pytest.mark.parametrize(
    ("model", "settings", "error", "fragment"),
    [
        ("m", _values(trace_levle=["OFF"]), InvalidArgument, "unknown setting 'trace_levle'"),
        ("m", _values(trace_level=["TENSORS"]), InvalidArgument, "TENSORS is not supported"),
        ("m", _values(trace_level=["LOUD"]), InvalidArgument, "OFF or TIMESTAMPS; got 'LOUD'"),
        ("m", _values(trace_rate=["0"]), InvalidArgument, "trace_rate is an integer from 1"),
        ("m", _values(trace_rate=["ten"]), InvalidArgument, "got 'ten'"),
        ("m", _values(trace_count=["-2"]), InvalidArgument, "trace_count is an integer from -1"),
        ("m", _values(trace_rate=["1", "2"]), InvalidArgument, "takes one value"),
        ("", _values(trace_rate=[]), InvalidArgument, "cleared for a model only"),
        ("m", _values(trace_mode=["triton"]), InvalidArgument, "always 'opentelemetry'"),
        ("m", _values(trace_file=["/tmp/t.json"]), Unimplemented, "trace_file is Triton's own"),
        ("m", _values(log_frequency=["10"]), Unimplemented, "log_frequency is Triton's own"),
    ],
)
def test_a_setting_that_cannot_be_applied_is_refused_by_name(
    model: str, settings: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment.replace("(", r"\(")):
        requested_trace_change(model, settings)


def test_a_rate_is_one_call_in_n_and_an_empty_value_clears() -> None:
    change = requested_trace_change("m", _values(trace_rate=["4"], trace_count=[], trace_mode=["opentelemetry"]))
    assert change == TraceChange("m", TraceRule(ratio=0.25), frozenset({"count"}))


# --------------------------------------------------------------------------- through a server


@pytest.fixture(scope="module")
def repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return telemetry_repository(demo_repository, tmp_path_factory.mktemp("trace-settings"))


@pytest.fixture
async def observed(repository: Path) -> AsyncIterator[Observed]:
    async with observed_server(repository) as observed:
        yield observed


@pytest.fixture
async def client(observed: Observed) -> AsyncIterator[aioclient.InferenceServerClient]:
    client = aioclient.InferenceServerClient(observed.url)
    yield client
    await client.close()


def _x() -> list[InferInput]:
    x = InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    return [x]


def _traced_models(observed: Observed) -> list[str]:
    return [
        str((s.attributes or {}).get("infergate.model.name")) for s in observed.finished_spans() if s.name == INFER_SPAN
    ]


def _settings(response: Any) -> dict[str, list[str]]:
    return {name: list(value.value) for name, value in response.settings.items()}


async def test_the_server_wide_settings_read_back_from_the_sample_ratio(
    client: aioclient.InferenceServerClient,
) -> None:
    assert _settings(await client.get_trace_settings()) == SERVER_WIDE
    assert _settings(await client.get_trace_settings(model_name="matmul16")) == SERVER_WIDE  # nothing of its own
    assert "trace" in (await client.get_server_metadata()).extensions


async def test_off_for_one_model_stops_its_spans_only_until_cleared(
    observed: Observed, client: aioclient.InferenceServerClient
) -> None:
    answer = await client.update_trace_settings(model_name="matmul16", settings={"trace_level": "OFF"})
    assert _settings(answer) == {**SERVER_WIDE, "trace_level": ["OFF"]}
    assert _settings(await client.get_trace_settings()) == SERVER_WIDE  # the server-wide ones are untouched
    await client.infer("matmul16", _x())
    await asyncio.gather(*(client.infer("batch4", _x()) for _ in range(4)))  # it runs batches of exactly four
    await client.infer("matmul16", _x(), headers={"traceparent": TRACEPARENT})  # the caller's decision wins
    assert _traced_models(observed).count("matmul16") == 1
    assert _traced_models(observed).count("batch4") == 4

    answer = await client.update_trace_settings(model_name="matmul16", settings={"trace_level": None})
    assert _settings(answer) == SERVER_WIDE
    await client.infer("matmul16", _x())
    assert _traced_models(observed).count("matmul16") == 2


async def test_a_count_runs_out_and_reads_back_as_zero(
    observed: Observed, client: aioclient.InferenceServerClient
) -> None:
    answer = await client.update_trace_settings(settings={"trace_count": "2"})
    assert _settings(answer)["trace_count"] == ["2"]
    for _ in range(3):
        await client.infer("matmul16", _x())
    assert _traced_models(observed) == ["matmul16", "matmul16"]
    assert _settings(await client.get_trace_settings())["trace_count"] == ["0"]


async def test_a_refused_request_changes_nothing_and_an_unknown_model_is_not_found(
    client: aioclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        await client.update_trace_settings(model_name="matmul16", settings={"trace_level": "OFF", "trace_rate": "zero"})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "trace_rate" in str(refused.value.message())
    assert _settings(await client.get_trace_settings(model_name="matmul16")) == SERVER_WIDE
    with pytest.raises(InferenceServerException) as unknown:
        await client.get_trace_settings(model_name="nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and "nope" in str(unknown.value.message())


async def test_a_server_without_tracing_reads_off_and_refuses_changes(demo_repository: Path) -> None:
    async with embedded_server(demo_repository) as stub:
        read = await stub.TraceSetting(pb.TraceSettingRequest(), timeout=30)
        assert _settings(read) == {**SERVER_WIDE, "trace_level": ["OFF"]}
        change = pb.TraceSettingRequest(settings=_values(trace_level=["TIMESTAMPS"]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.TraceSetting(change, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--traces" in str(refused.value.details())
