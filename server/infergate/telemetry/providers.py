"""Tracer and meter providers built from the server config and the standard OTEL_* variables.

Exporters are chosen the way every OpenTelemetry SDK chooses them:

* ``OTEL_TRACES_EXPORTER``: ``otlp`` (the default), ``console`` or ``none`` (spans
  are made, for logs and links, but not sent); a comma-separated list is allowed.
  Set explicitly to ``otlp`` or ``console``, it turns traces on by itself, as the
  OpenTelemetry conventions have it (``traces_requested``). ``console`` writes one
  JSON object per span and line to stdout.
* ``OTEL_METRICS_EXPORTER``: ``otlp`` turns metrics on and pushes them; unlike the
  SDK's default it is off unless set, because the Prometheus endpoint is the usual way.
* ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or the ``_TRACES_``/``_METRICS_`` forms):
  ``grpc`` (default) or ``http/protobuf``. Endpoint, headers, timeout and
  compression are read by the exporters themselves (``OTEL_EXPORTER_OTLP_ENDPOINT``…).
* ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the resource
  (service name ``infergate`` when unset); ``OTEL_SDK_DISABLED=true`` turns all of it off.

Spans go through a ``BatchSpanProcessor`` with a bounded queue: when the
exporter cannot keep up, spans are dropped, never waited for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, MetricsData, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry

from infergate import __version__
from infergate.config import ConfigError
from infergate.telemetry.aggregate import Histograms, with_histograms

__all__ = [
    "SPAN_QUEUE_SIZE",
    "LinkedOrRatio",
    "OtlpReader",
    "PrometheusReader",
    "build_meter_provider",
    "build_resource",
    "build_tracer_provider",
    "check_trace_exporters",
    "otlp_destination",
    "otlp_metrics_requested",
    "sdk_disabled",
    "traces_requested",
]

_TRACE_EXPORTERS = ("otlp", "console", "none")

SPAN_QUEUE_SIZE = 4096  # spans waiting for export; beyond this they are dropped


def sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def otlp_metrics_requested() -> bool:
    """OTEL_METRICS_EXPORTER names otlp (which also turns metrics on)."""
    return "otlp" in _names("OTEL_METRICS_EXPORTER", "none")


def traces_requested() -> bool:
    """OTEL_TRACES_EXPORTER names a real exporter (otlp, console): traces are on even without --traces."""
    return any(name in ("otlp", "console") for name in _names("OTEL_TRACES_EXPORTER", "none"))


def check_trace_exporters() -> list[str]:
    """The OTEL_TRACES_EXPORTER names (default otlp); ConfigError on one infergate cannot export to."""
    names = _names("OTEL_TRACES_EXPORTER", "otlp")
    for name in names:
        if name not in _TRACE_EXPORTERS:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
    return names


def otlp_destination(traces: bool, metrics: bool) -> str | None:
    """Where the OTLP exporters of ``traces`` and ``metrics`` send (for log lines: " or " between two
    endpoints that differ); None when neither signal goes to OTLP."""
    endpoints = []
    if traces and "otlp" in check_trace_exporters():
        endpoints.append(_endpoint("TRACES"))
    if metrics and otlp_metrics_requested():
        endpoints.append(_endpoint("METRICS"))
    return " or ".join(dict.fromkeys(endpoints)) or None


def build_resource() -> Resource:
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "infergate"}))
    return resource


class LinkedOrRatio(Sampler):
    """A root span is sampled when a span it links to was, else by trace-id ratio.

    A batch span has no parent but links to its requests: it must be kept
    whenever one of them was, or a sampled request would point at nothing.
    """

    def __init__(self, ratio: float):
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"LinkedOrRatio{{{self._ratio.rate}}}"


def build_tracer_provider(
    sample_ratio: float, resource: Resource, processors: Sequence[SpanProcessor] | None = None
) -> TracerProvider:
    """A provider sampling parent-based with ``sample_ratio`` for roots.

    Spans go to ``processors`` when given (tests), else to the OTEL_TRACES_EXPORTER
    exporters, each behind a BatchSpanProcessor.
    """
    provider = TracerProvider(resource=resource, sampler=ParentBased(root=LinkedOrRatio(sample_ratio)))
    if processors is None:
        processors = [BatchSpanProcessor(e, max_queue_size=SPAN_QUEUE_SIZE) for e in _span_exporters()]
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


class PrometheusReader(PrometheusMetricReader):
    """The Prometheus reader, with infergate's pre-aggregated histograms added to each collection."""

    def __init__(self, registry: CollectorRegistry, histograms: Histograms):
        super().__init__(registry=registry)
        self._histograms = histograms

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        super()._receive_metrics(with_histograms(metrics_data, self._histograms), timeout_millis, **kwargs)  # type: ignore[arg-type]


class OtlpReader(PeriodicExportingMetricReader):
    """The periodic OTLP reader, with infergate's pre-aggregated histograms added to each export."""

    def __init__(self, exporter: MetricExporter, histograms: Histograms):
        super().__init__(exporter)
        self._histograms = histograms

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        super()._receive_metrics(with_histograms(metrics_data, self._histograms), timeout_millis, **kwargs)  # type: ignore[arg-type]


def build_meter_provider(
    resource: Resource, histograms: Histograms, registry: CollectorRegistry | None
) -> MeterProvider:
    """A provider for the Prometheus ``registry`` (if any) and OTLP when OTEL_METRICS_EXPORTER says so."""
    readers: list[MetricReader] = []
    if registry is not None:
        readers.append(PrometheusReader(registry, histograms))
    if otlp_metrics_requested():
        readers.append(OtlpReader(_otlp_metric_exporter(), histograms))
    return MeterProvider(resource=resource, metric_readers=readers)


def _names(variable: str, default: str) -> list[str]:
    return [n.strip().lower() for n in os.environ.get(variable, default).split(",") if n.strip()]


def _protocol(signal: str) -> str:
    specific = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
    return (specific or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()


def _endpoint(signal: str) -> str:
    """The collector's address as the exporters read it (without the path the HTTP ones add)."""
    specific = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if specific and specific.strip():
        return specific.strip()
    return "http://localhost:4318" if _protocol(signal) == "http/protobuf" else "http://localhost:4317"


def _span_exporters() -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in check_trace_exporters():
        if name == "otlp":
            exporters.append(_otlp_span_exporter())
        elif name == "console":
            # One line per span (the SDK's default is indented JSON), so stdout stays line-oriented.
            exporters.append(ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n"))
    return exporters


def _otlp_span_exporter() -> SpanExporter:
    if _protocol("TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    return GrpcSpanExporter()


def _otlp_metric_exporter() -> MetricExporter:
    if _protocol("METRICS") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

        return HttpMetricExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

    return GrpcMetricExporter()
