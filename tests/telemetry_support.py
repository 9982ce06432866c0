"""In-process servers wired to OpenTelemetry's in-memory exporter and reader, for the telemetry tests.

The server under test is the real one (``InferGateServer`` on 127.0.0.1:0, real
gRPC clients); only the exporters are swapped for in-memory ones, through the
same ``Telemetry`` constructor the composition root uses.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infergate.config import ServerConfig, TelemetryConfig
from infergate.server import InferGateServer
from infergate.telemetry import Telemetry
from infergate.telemetry.aggregate import Histograms, with_histograms
from infergate.telemetry.providers import build_tracer_provider

# A batch of exactly four: it runs the moment the fourth request arrives and not before
# (the queue delay is far longer than any test), so batch contents are deterministic.
BATCH4_CONFIG = """\
max_batch_size: 4
dynamic_batching: {max_queue_delay_microseconds: 10000000, preferred_batch_size: [4]}
"""

TRACEPARENT_TRACE_ID = "0af7651916cd76f183a2b1d2c3e4f500"
TRACEPARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACEPARENT_TRACE_ID}-{TRACEPARENT_SPAN_ID}-01"


def telemetry_repository(demo_repository: Path, root: Path) -> Path:
    """matmul16 as in the demo, ``batch4`` (matmul16 batching exactly four), and a model that cannot load."""
    repo = root / "telemetry-models"
    if repo.exists():
        return repo
    shutil.copytree(demo_repository / "matmul16", repo / "matmul16")
    shutil.copytree(demo_repository / "matmul16" / "1", repo / "batch4" / "1")
    (repo / "batch4" / "config.yaml").write_text(BATCH4_CONFIG)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return repo


@dataclass
class Observed:
    server: InferGateServer
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    histograms: Histograms

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        """Every data point of metric ``name`` (attributes in ``point.attributes``)."""
        data = with_histograms(self.reader.get_metrics_data(), self.histograms)
        assert data is not None
        return [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@contextlib.asynccontextmanager
async def observed_server(
    repository: Path, server_options: dict[str, Any] | None = None, **telemetry: Any
) -> AsyncIterator[Observed]:
    """A started, loaded server whose spans and metrics land in memory (``server_options``: more ServerConfig)."""
    config = TelemetryConfig(traces=True, metrics=True, **telemetry)
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    # As in Telemetry.from_config: the interceptor applies sample_ratio to roots, the provider keeps the rest.
    tracer_provider = build_tracer_provider(1.0, Resource.create(), [SimpleSpanProcessor(spans)])
    meter_provider = MeterProvider(metric_readers=[reader])
    histograms = Histograms("infergate")
    server = InferGateServer(
        ServerConfig.model_validate(
            {"model_repository": repository, "port": 0, "strict_readiness": False, "telemetry": config}
            | (server_options or {})
        ),
        Telemetry(config, tracer_provider=tracer_provider, meter_provider=meter_provider, histograms=histograms),
    )
    await server.start()
    await server.load_models()
    try:
        yield Observed(server, spans, reader, histograms)
    finally:
        await server.stop(grace=5)
