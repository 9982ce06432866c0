"""A model version's metrics live exactly as long as it serves, and telemetry never keeps it alive.

After an unload, the version's own series (queue-depth gauge; queue, compute and
batch-size histograms) leave the next collection, its batches still draining do
not bring them back, and the ``ModelVersion`` is garbage collected. A reload that
replaces a version keeps its series and lets the old object go. The request
counts stay: they are per RPC (docs/observability.md). Servers are real, on
127.0.0.1, with real tritonclient clients: in-process (with OpenTelemetry's
in-memory reader, so the test can hold a weak reference to the version) and one
end to end through a Prometheus scrape.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import urllib.request
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import eventually, running_server
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families
from telemetry_support import BATCH4_CONFIG, Observed, observed_server
from tritonclient.grpc import InferInput

from infergate.models.config import ModelConfig
from infergate.models.stats import ModelObserver
from infergate.models.version import ModelVersion, load_model_version
from infergate.telemetry.aggregate import Histograms
from infergate.telemetry.hooks import RepositoryHooks
from infergate.telemetry.metrics import ServerMetrics

# A version's own series, by OpenTelemetry name.
VERSION_SERIES = {
    "infergate.queue.depth",
    "infergate.queue.duration",
    "infergate.compute.duration",
    "infergate.batch.size",
}
EXPLICIT = {"model_control_mode": "explicit", "load_models": ["*"]}


@pytest.fixture
def repository(demo_repository: Path, tmp_path: Path) -> Path:
    """matmul16 as in the demo and ``batch4``, matmul16 batching exactly four (a request waits in its queue)."""
    repo = tmp_path / "models"
    shutil.copytree(demo_repository / "matmul16", repo / "matmul16")
    shutil.copytree(demo_repository / "matmul16" / "1", repo / "batch4" / "1")
    (repo / "batch4" / "config.yaml").write_text(BATCH4_CONFIG)
    return repo


def _x() -> list[InferInput]:
    x = InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    return [x]


def _series(observed: Observed, model: str, version: str = "1") -> dict[str, Any]:
    """Metric name -> the point labelled with ``model`` and ``version``, for every metric that has one."""
    found: dict[str, Any] = {}
    for name in (*VERSION_SERIES, "infergate.requests"):
        for point in observed.points(name):
            if point.attributes.get("model") == model and point.attributes.get("model_version") == version:
                found[name] = point
    return found


async def _collected(version: weakref.ref[ModelVersion]) -> bool:
    gc.collect()
    return version() is None


def _referrers(version: weakref.ref[ModelVersion]) -> str:
    alive = version()
    return "collected" if alive is None else repr([type(r) for r in gc.get_referrers(alive)])


async def test_an_unloaded_version_leaves_the_metrics_and_is_collected(repository: Path) -> None:
    async with observed_server(repository, EXPLICIT) as observed:
        client = aioclient.InferenceServerClient(observed.url)
        try:
            await client.infer("matmul16", _x())
            queued = asyncio.create_task(client.infer("batch4", _x()))  # waits for three more that never come

            async def one_waiting() -> bool:
                depth = _series(observed, "batch4").get("infergate.queue.depth")
                return depth is not None and depth.value == 1

            await eventually(one_waiting, "batch4's queue depth reports the waiting request")
            version = weakref.ref(observed.server.repository.catalog.get("batch4"))

            await client.unload_model("batch4")
            assert not VERSION_SERIES & set(_series(observed, "batch4"))  # gone from the next collection
            await queued  # the draining version still answers it, and it is counted per RPC only:
            assert set(_series(observed, "batch4")) == {"infergate.requests"}  # its batch brought nothing back
            await eventually(lambda: _collected(version), "the unloaded version garbage collected")
            assert set(_series(observed, "matmul16")) == {*VERSION_SERIES, "infergate.requests"}  # the rest stays
        finally:
            await client.close()


async def test_a_reloaded_version_keeps_its_series_a_superseded_one_loses_them_and_both_objects_go(
    repository: Path,
) -> None:
    async with observed_server(repository, EXPLICIT) as observed:
        client = aioclient.InferenceServerClient(observed.url)
        try:
            await client.infer("matmul16", _x())
            old = weakref.ref(observed.server.repository.catalog.get("matmul16"))
            model_file = repository / "matmul16" / "1" / "model.onnx"
            os.utime(model_file, ns=(model_file.stat().st_atime_ns, model_file.stat().st_mtime_ns + 10**9))
            await client.load_model("matmul16")  # the file changed: version 1 reloads, load before unload
            assert observed.server.repository.catalog.get("matmul16") is not old()
            await client.infer("matmul16", _x())

            series = _series(observed, "matmul16")
            assert set(series) == {*VERSION_SERIES, "infergate.requests"}
            assert series["infergate.queue.duration"].count == 2  # one series across the reload
            await eventually(lambda: _collected(old), f"the replaced version collected ({_referrers(old)})")
            assert series["infergate.queue.depth"].value == 0

            reloaded = weakref.ref(observed.server.repository.catalog.get("matmul16"))
            shutil.copytree(repository / "matmul16" / "1", repository / "matmul16" / "2")
            await client.load_model("matmul16")  # the version policy serves the latest: 2 supersedes 1
            await client.infer("matmul16", _x())
            assert set(_series(observed, "matmul16", "1")) == {"infergate.requests"}
            assert set(_series(observed, "matmul16", "2")) == {*VERSION_SERIES, "infergate.requests"}
            await eventually(lambda: _collected(reloaded), "the superseded version collected")
        finally:
            await client.close()


def _scraped(url: str, model: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == model and sample.labels.get("model_version") == "1"
    }


async def test_a_scrape_after_an_unload_has_no_series_of_the_unloaded_version(repository: Path, tmp_path: Path) -> None:
    args = ("--metrics-port", "0", "--model-control-mode", "explicit", "--load-model", "*")
    with running_server(repository, tmp_path, *args) as server:
        assert server.metrics_url is not None
        client = aioclient.InferenceServerClient(server.url)
        try:
            await client.infer("matmul16", _x())
            before = _scraped(server.metrics_url, "matmul16")
            assert {"infergate_queue_depth", "infergate_queue_duration_seconds_count"} <= before
            await client.unload_model("matmul16")
            after = _scraped(server.metrics_url, "matmul16")
        finally:
            await client.close()
    assert not {name for name in after if not name.startswith("infergate_request")}, after


def _observer(hooks: RepositoryHooks, model: ModelVersion) -> ModelObserver:
    """As the repository does it: the depth reader's closure holds the version (and the version its observer)."""
    return hooks.for_model(model.name, model.version, lambda: model.batcher.depth, model)


class TelemetryOnly:
    """Only the telemetry is under test: real ModelVersions, started and closed without a repository."""

    def __init__(self, repository: Path) -> None:
        self._directory = repository / "matmul16" / "1"
        self._reader = InMemoryMetricReader()
        metrics = ServerMetrics(MeterProvider(metric_readers=[self._reader]).get_meter("test"), Histograms("test"))
        self.hooks = RepositoryHooks(None, metrics)

    async def load(self) -> ModelVersion:
        return await asyncio.to_thread(load_model_version, self._directory, "matmul16", 1, ModelConfig())

    def depths(self) -> list[str]:
        """The versions the queue-depth gauge reports."""
        data = self._reader.get_metrics_data()
        return [
            point.attributes["model_version"]
            for rm in (data.resource_metrics if data is not None else ())
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "infergate.queue.depth"
            for point in metric.data.data_points
        ]


async def test_the_metrics_never_keep_a_version_alive_even_when_nobody_forgets_it(repository: Path) -> None:
    telemetry = TelemetryOnly(repository)
    model = await telemetry.load()
    model.start(_observer(telemetry.hooks, model))
    assert telemetry.depths() == ["1"]
    await model.aclose()
    version = weakref.ref(model)
    del model  # retired without forget(): a bug elsewhere must not pin it
    await eventually(lambda: _collected(version), f"the version collected ({_referrers(version)})")
    assert telemetry.depths() == []


async def test_forgetting_a_version_that_never_started_leaves_the_one_serving_alone(repository: Path) -> None:
    telemetry = TelemetryOnly(repository)
    serving, refused = await telemetry.load(), await telemetry.load()  # e.g. a reload whose config was refused
    serving.start(_observer(telemetry.hooks, serving))
    try:
        telemetry.hooks.forget("matmul16", 1, refused)
        assert telemetry.depths() == ["1"]
        telemetry.hooks.forget("matmul16", 1, serving)
        assert telemetry.depths() == []
    finally:
        await asyncio.gather(serving.aclose(), refused.aclose())
