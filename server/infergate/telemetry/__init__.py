"""Telemetry: OpenTelemetry traces and metrics, the Prometheus endpoint, structured logs.

:class:`Telemetry` is built by the composition root (``server.py``) from the
``telemetry:`` config block and the OTEL_* variables, or from providers a test
passes in (e.g. with an ``InMemorySpanExporter`` and ``InMemoryMetricReader``);
nothing here touches OpenTelemetry's global providers. It hands out:

* ``interceptors()``: the RPC interceptor (outermost; empty when all is off);
* ``observer``: the repository's hooks (model loads; per-version queue spans,
  batch spans and metrics from the batcher's events), or None;
* ``metrics``: :class:`ServerMetrics`, whose ``record_auth_refusal`` and
  ``record_shadow`` the auth and routing layers call;
* ``serve_triton_metrics(rows)``: Triton's ``nv_inference_*`` metrics on the
  Prometheus endpoint, read from the models' statistics (``triton.py``).

``shutdown`` flushes what is still queued for export, within ``FLUSH_BUDGET_SECONDS``
(``flush.py``): a collector that is down costs the stop that much, then is given up.

See docs/observability.md for the metric names and the exporter variables.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, start_http_server

from infergate.config import TelemetryConfig
from infergate.models.stats import RepositoryObserver
from infergate.netaddr import host_port
from infergate.telemetry.aggregate import Histograms
from infergate.telemetry.flush import FLUSH_BUDGET_SECONDS, run_within
from infergate.telemetry.hooks import RepositoryHooks
from infergate.telemetry.interceptor import TelemetryInterceptor
from infergate.telemetry.logs import configure_logging
from infergate.telemetry.metrics import ServerMetrics
from infergate.telemetry.providers import (
    build_meter_provider,
    build_resource,
    build_tracer_provider,
    check_trace_exporters,
    otlp_destination,
    otlp_metrics_requested,
    sdk_disabled,
    traces_requested,
)
from infergate.telemetry.sampling import TraceSampler
from infergate.telemetry.shadows import ShadowTracer
from infergate.telemetry.triton import TritonMetrics, TritonRow

__all__ = ["ServerMetrics", "Telemetry", "check_exporters", "configure_logging"]

log = logging.getLogger(__name__)

_SCOPE = "infergate"


def check_exporters(config: TelemetryConfig) -> None:
    """Raise ConfigError for an exporter ``from_config`` would refuse (checked without building one)."""
    if not sdk_disabled() and (config.traces or os.environ.get("OTEL_TRACES_EXPORTER", "").strip()):
        check_trace_exporters()


class Telemetry:
    """The server's tracer, meter, interceptor, hooks and Prometheus endpoint; ``shutdown`` flushes them.

    ``collector``: where OTLP exports go (``otlp_destination``), named in the warning when the
    flush at shutdown does not finish; None when nothing goes to OTLP.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        histograms: Histograms | None = None,
        prometheus: CollectorRegistry | None = None,
        access_log: bool = False,
        collector: str | None = None,
    ):
        self.config = config
        self._collector = collector
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._registry = prometheus
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.metrics_port: int | None = None
        tracer = tracer_provider.get_tracer(_SCOPE) if tracer_provider is not None else None
        self._tracer = tracer
        self.histograms = histograms or Histograms(_SCOPE)  # readers of ``meter_provider`` must add these
        self.metrics = (
            ServerMetrics(meter_provider.get_meter(_SCOPE), self.histograms) if meter_provider is not None else None
        )
        on = tracer is not None or self.metrics is not None
        self.observer: RepositoryObserver | None = RepositoryHooks(tracer, self.metrics) if on else None
        self._interceptor = (
            TelemetryInterceptor(
                tracer, self.metrics, trace_health=config.trace_health, sample_ratio=config.sample_ratio
            )
            if on or access_log
            else None
        )
        # What writes the access log while LogSettings has verbose lines on, when the interceptor above does
        # not exist: one stage, so that a settings call that leaves verbose on keeps the pipeline as it is.
        self._late_access_log = TelemetryInterceptor(None, None) if self._interceptor is None else None

    @classmethod
    def from_config(cls, config: TelemetryConfig, *, access_log: bool = False) -> Telemetry:
        """Providers as ``config`` and the OTEL_* variables ask (none at all when everything is off)."""
        wants_metrics = config.metrics or config.metrics_port is not None or otlp_metrics_requested()
        wants_traces = config.traces or traces_requested()
        check_exporters(config)
        if sdk_disabled() or not (wants_traces or wants_metrics):
            return cls(config, access_log=access_log)
        resource = build_resource()
        # Roots are sampled by the interceptor (telemetry/sampling.py), so the SDK keeps what it starts.
        tracer_provider = build_tracer_provider(1.0, resource) if wants_traces else None
        registry = CollectorRegistry(auto_describe=True) if config.metrics_port is not None else None
        histograms = Histograms(_SCOPE)
        meter_provider = build_meter_provider(resource, histograms, registry) if wants_metrics else None
        return cls(
            config,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            histograms=histograms,
            prometheus=registry,
            access_log=access_log,
            collector=otlp_destination(wants_traces, wants_metrics),
        )

    @property
    def tracing(self) -> bool:
        """Spans are made (``telemetry.traces``, or OTEL_TRACES_EXPORTER naming an exporter)."""
        return self._tracer_provider is not None

    def serve_triton_metrics(self, rows: Callable[[], Iterable[TritonRow]]) -> bool:
        """Serve Triton's metrics for the versions ``rows()`` lists, when the Prometheus endpoint
        is configured and ``triton_metrics`` is on; True if they will be served."""
        if self._registry is None or not self.config.triton_metrics:
            return False
        self._registry.register(TritonMetrics(rows))
        return True

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self._interceptor] if self._interceptor is not None else []

    @property
    def trace_sampler(self) -> TraceSampler | None:
        """Which calls without a caller's decision are traced (TraceSetting changes it); None without tracing."""
        return self._interceptor.sampler if self._interceptor is not None and self._tracer is not None else None

    def shadow_spans(self) -> ShadowTracer | None:
        """What traces shadow calls (a span per shadow call of a traced request); None without tracing."""
        return ShadowTracer(self._tracer) if self._tracer is not None else None

    def access_log_when(self, verbose: bool) -> grpc.aio.ServerInterceptor | None:
        """The stage that writes the access log while DEBUG lines are on, for a server whose logging turned
        verbose after it started (LogSettings); None when not ``verbose``, or when :meth:`interceptors`
        already writes it (they write it whenever DEBUG lines are on)."""
        return self._late_access_log if verbose else None

    def start(self) -> None:
        """Open the Prometheus endpoint (when configured); ``metrics_port`` is then the bound port."""
        if self._registry is None or self.config.metrics_port is None:
            return
        server, thread = start_http_server(self.config.metrics_port, self.config.metrics_host, self._registry)
        self._http = (server, thread)
        self.metrics_port = server.server_port
        log.info("metrics on http://%s/metrics", host_port(self.config.metrics_host, self.metrics_port))

    def shutdown(self) -> None:
        """Close the endpoint and flush spans and metrics (blocking: call from a thread).

        Returns within ``FLUSH_BUDGET_SECONDS`` (and the endpoint's close): what is not exported by
        then is dropped, with one warning. Nothing is left on the caller's thread or executor.
        """
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join()
            self._http = None
        flushes: dict[str, Callable[[], object]] = {}
        if self._tracer_provider is not None:
            flushes["spans"] = self._tracer_provider.shutdown  # takes no timeout (SDK 1.45): waited for below
        if (meters := self._meter_provider) is not None:
            flushes["metrics"] = lambda: meters.shutdown(timeout_millis=FLUSH_BUDGET_SECONDS * 1000)
        if late := run_within(flushes, FLUSH_BUDGET_SECONDS):
            why = f"is the collector at {self._collector} up?" if self._collector else "its exporter did not return"
            log.warning(
                "telemetry: %s not exported within %.1f s of shutdown (%s); dropped",
                " and ".join(late),
                FLUSH_BUDGET_SECONDS,
                why,
            )
