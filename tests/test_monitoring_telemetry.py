"""Drift as operators see it: the ``infergate_drift_*`` gauges and the DriftStatus admin RPC.

A real server runs in-process (``observed_server``: OpenTelemetry's in-memory reader) with a monitored
classifier; requests are answered by the served version and handed to its monitor exactly as the
inference handler hands them over. DriftStatus is called with the real stub over 127.0.0.1 on an admin
servicer (serving/admin.py) on its own port.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import eventually
from monitoring_support import reference_rows, spec, tensor, write_monitored_repository
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from telemetry_support import Observed, observed_server

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate.models.version import ModelVersion
from infergate.monitoring.config import DriftConfig
from infergate.monitoring.metrics import DriftReadings
from infergate.monitoring.monitor import DriftMonitor, ModelMonitor
from infergate.monitoring.profile import build_profile
from infergate.serving.admin import AdminServicer
from infergate.telemetry.aggregate import Histograms
from infergate.telemetry.metrics import ServerMetrics

WINDOW = 400
DRIFT = f"drift: {{sample_fraction: 1.0, window: {WINDOW}, update_every: 5, update_interval_seconds: 0.05}}"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("drift-telemetry")
    write_monitored_repository(root, DRIFT, name="classifier")
    write_monitored_repository(root, "", profile=False, name="plain")
    return root


@pytest.fixture
async def observed(repository: Path) -> AsyncIterator[Observed]:
    async with observed_server(repository) as observed:
        yield observed


@pytest.fixture
async def admin(observed: Observed) -> AsyncIterator[apb_grpc.InferGateAdminStub]:
    server = grpc.aio.server()
    apb_grpc.add_InferGateAdminServicer_to_server(AdminServicer(observed.server.repository.catalog), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield apb_grpc.InferGateAdminStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await server.stop(None)


async def answer(model: ModelVersion, rows: np.ndarray) -> None:
    assert model.monitor is not None
    for start in range(0, len(rows), 8):
        inputs = {"x": rows[start : start + 8]}
        model.monitor.record(inputs, await model.infer(inputs, len(inputs["x"]), None, None))


async def drifted(observed: Observed) -> ModelVersion:
    """Reference traffic, then a window with feature 2 moved by two sigmas; returns the version once scored."""
    model = observed.server.repository.catalog.get("classifier")
    await answer(model, reference_rows(WINDOW, seed=5))
    await answer(model, reference_rows(WINDOW, seed=6, shift={2: 2.0}))
    assert model.monitor is not None and model.monitor.drift is not None
    drift = model.monitor.drift
    await eventually(lambda: drift.snapshot().scored_rows == 2 * WINDOW, "the shifted window scored")
    return model


async def test_every_feature_has_a_score_gauge_and_the_version_an_alert_gauge(observed: Observed) -> None:
    await drifted(observed)
    points = observed.points("infergate.drift.score")
    scores = {(p.attributes["io"], p.attributes["input"], p.attributes["feature"]): p for p in points}
    assert set(scores) == {("input", "x", str(j)) for j in range(4)} | {("output", "probabilities", "class")}
    shifted = scores[("input", "x", "2")]
    assert dict(shifted.attributes) == {
        "model": "classifier", "version": "1", "input": "x", "feature": "2", "method": "psi", "io": "input",
    }  # fmt: skip
    assert shifted.value > 0.2
    assert [(dict(p.attributes), p.value) for p in observed.points("infergate.drift.alert")] == [
        ({"model": "classifier", "version": "1"}, 1)
    ]


async def test_the_gauges_of_an_unloaded_version_disappear(observed: Observed) -> None:
    await drifted(observed)
    assert observed.points("infergate.drift.score")
    await observed.server.repository.unload("classifier")
    assert observed.points("infergate.drift.score") == []
    assert observed.points("infergate.drift.alert") == []


def test_the_gauges_hold_no_reference_to_a_retired_monitor() -> None:
    """ServerMetrics with the real SDK reader and DriftReadings over a table of served versions: once a
    version leaves the table its series are gone, and nothing the gauges hold keeps its monitor alive."""

    @dataclass
    class Served:  # what DriftReadings reads of a ModelVersion: its monitor
        monitor: ModelMonitor | None

    reader = InMemoryMetricReader()
    metrics = ServerMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"), Histograms("t"))
    model = spec(tensor("x", "FP32", -1, 1))
    profile = build_profile(model, {"x": np.zeros((10, 1))}, {}, source="s")
    served = {1: Served(ModelMonitor(DriftMonitor("m", 1, profile, DriftConfig(window=10), batches=True), None))}
    metrics.watch_drift(DriftReadings(lambda: list(served.values())))

    def alerts() -> list[Any]:
        data = reader.get_metrics_data()
        assert data is not None
        return [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == "infergate.drift.alert" for p in m.data.data_points]  # fmt: skip

    assert [dict(p.attributes) for p in alerts()] == [{"model": "m", "version": "1"}]
    monitor = weakref.ref(served[1].monitor)  # type: ignore[arg-type]
    del served[1]
    assert alerts() == []
    gc.collect()
    assert monitor() is None


# --- DriftStatus --------------------------------------------------------------------------------


async def test_drift_status_reports_scores_window_and_the_top_drifting_features(
    observed: Observed, admin: apb_grpc.InferGateAdminStub
) -> None:
    await drifted(observed)
    status = await admin.DriftStatus(apb.DriftStatusRequest(name="classifier", top=2))
    (model,) = status.models
    assert (model.name, model.version, model.method, model.threshold) == ("classifier", "1", "psi", pytest.approx(0.2))
    assert (model.window, model.window_fill, model.min_rows) == (WINDOW, WINDOW, WINDOW)
    assert model.rows == model.scored_rows == 2 * WINDOW
    assert (model.requests, model.sampled, model.dropped) == (100, 100, 0)
    assert model.alert and model.last_update_unix_seconds > 0
    assert [(f.io, f.tensor, f.feature) for f in model.features] == [
        ("input", "x", "0"), ("input", "x", "1"), ("input", "x", "2"), ("input", "x", "3"),
        ("output", "probabilities", "class"),
    ]  # fmt: skip
    assert len(model.top) == 2 and (model.top[0].feature, model.top[0].alert) == ("2", True)
    assert model.top[0].score >= model.top[1].score


async def test_drift_status_without_a_name_lists_the_monitored_versions_only(
    observed: Observed, admin: apb_grpc.InferGateAdminStub
) -> None:
    status = await admin.DriftStatus(apb.DriftStatusRequest())
    assert [(m.name, m.version, m.window_fill, m.alert) for m in status.models] == [("classifier", "1", 0, False)]


@pytest.mark.parametrize(
    ("request_", "code", "details"),
    [
        (apb.DriftStatusRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (apb.DriftStatusRequest(name="classifier", version="7"), grpc.StatusCode.NOT_FOUND, "has no version '7'"),
        (apb.DriftStatusRequest(name="plain"), grpc.StatusCode.FAILED_PRECONDITION, "has no drift monitoring"),
    ],
)
async def test_drift_status_refusals_say_what_was_wrong(
    admin: apb_grpc.InferGateAdminStub, request_: apb.DriftStatusRequest, code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.DriftStatus(request_)
    assert refused.value.code() == code and details in (refused.value.details() or "")
