"""Telemetry overhead: infergate with tracing and metrics off versus on, in one run.

Each round starts infergate once per variant on the same demo repository and
loads each in turn with the same closed-loop client (matmul16, batch 1, 64 in
flight by default: the overhead-bound case, where per-request costs show most),
``slices`` times with the order rotating (``interleave``), so drift on a shared
machine hits them alike. The table's "paired ÷ off" is the ratio to ``off``
paired slot by slot (``ratios``: the geometric mean of the slots' ratios, ± the
half-width of its 95% interval over rounds).

Variants:

* ``off``: the default server (no interceptor, no hooks);
* ``metrics``: ``--metrics-port 0`` (the Prometheus reader on a free port; nobody scrapes during the run);
* ``traces100+metrics``: ``--traces --metrics-port``, every request sampled, spans
  sent by the real OTLP gRPC exporter to a sink in another process (it answers
  and drops them, like a collector elsewhere would);
* ``traces10+metrics``, ``traces1+metrics``: the same with ``sample_ratio`` 0.1 and 0.01.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

from .costs import Step, step_costs
from .interleave import OverheadRun, SlotFigures, Variant, measured
from .report import LoadResult, format_table, parse_variants
from .servers import free_port
from .suite import REPO_ROOT, environment

__all__ = ["VARIANTS", "OverheadConfig", "OverheadReport", "run_overhead", "serve_sink", "variants"]

VARIANTS = ("off", "metrics", "traces100+metrics", "traces10+metrics", "traces1+metrics")


@dataclass(frozen=True)
class OverheadConfig(OverheadRun):
    variants: tuple[str, ...] = VARIANTS


@dataclass
class OverheadReport(SlotFigures):
    config: OverheadConfig
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)  # per slot, in slot order
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # server CPU µs per request, per slot
    client_cpu_us: dict[str, list[float]] = field(default_factory=dict)  # the client's, per slot

    def mean_rps(self, variant: str) -> float:
        return statistics.fmean(r.requests_per_s for r in self.runs[variant])

    def table(self) -> str:
        base = self.mean_rps("off") if "off" in self.runs else float("nan")
        ratios = self.paired_rates()
        rows = []
        for variant, runs in self.runs.items():
            mean = self.mean_rps(variant)
            per_slot = " / ".join(f"{r.requests_per_s:,.0f}" for r in runs)
            p50 = statistics.fmean(r.p50_ms for r in runs)
            cpu = statistics.fmean(self.cpu_us[variant])
            cpu_base = statistics.fmean(self.cpu_us["off"]) if "off" in self.cpu_us else float("nan")
            pairs = str(ratios[variant]) if variant in ratios else "-"
            rows.append(
                [variant, f"{mean:,.0f}", per_slot, f"{mean / base:.3f}", pairs, f"{p50:.2f}", f"{cpu:.0f}",
                 f"{cpu / cpu_base:.3f}", self.mean_client_cpu(variant)]
            )  # fmt: skip
        headers = ["variant", "mean req/s", "per slot", "÷ off", "paired ÷ off", "mean p50 ms", "server CPU µs/req",
                   "÷ off", "client CPU µs/req"]  # fmt: skip
        return format_table(headers, ["<", ">", ">", ">", ">", ">", ">", ">", ">"], rows) + self.config.pinning()


def serve_sink(port: int) -> None:
    """An OTLP gRPC receiver that accepts and drops spans and metrics (blocking)."""
    import grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Sink(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: object, context: object) -> object:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                return trace_service_pb2.ExportTraceServiceResponse()
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Sink(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


@contextlib.contextmanager
def _sink(port: int) -> Iterator[None]:
    code = f"from load_tests.telemetry import serve_sink; serve_sink({port})"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def _variant(name: str, repo: pathlib.Path, sink_port: int, folder: pathlib.Path) -> Variant:
    serve: tuple[str, ...] = (sys.executable, "-m", "infergate", "serve", "--model-repository", str(repo))
    if name == "off":
        return Variant(name, serve)
    serve += ("--metrics-port", "0")
    if name == "metrics":
        return Variant(name, serve)
    config = folder / f"{name}.yaml"
    ratio = int(name.removeprefix("traces").removesuffix("+metrics")) / 100
    config.write_text(f"telemetry: {{traces: true, sample_ratio: {ratio}}}\n")
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"}
    return Variant(name, (*serve, "--config", str(config)), env)


def run_overhead(config: OverheadConfig) -> OverheadReport:
    """Every variant in every slot of every round (see ``interleave``); writes overhead.json and overhead.md."""
    from infergate.demo import write_demo_repository  # type: ignore[import-untyped,unused-ignore]

    report = OverheadReport(config, {v: [] for v in config.variants}, {v: [] for v in config.variants})
    config.out.mkdir(parents=True, exist_ok=True)
    sink_port = free_port()
    with tempfile.TemporaryDirectory() as tmp, _sink(sink_port):
        folder = pathlib.Path(tmp)
        repo = folder / "models"
        write_demo_repository(repo)
        variants = [_variant(name, repo, sink_port, folder) for name in config.variants]
        for slot, sample in measured(variants, config, REPO_ROOT):
            report.add(slot, sample)
    _write(report)
    return report


def _write(report: OverheadReport) -> None:
    data = {
        "environment": environment(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: str(v) for k, v in vars(report.config).items()},
        **report.figures_json(),
        "mean_rps": {v: report.mean_rps(v) for v in report.runs},
        "paired_ratio_to_off": {v: vars(r) for v, r in report.paired_rates().items()},
    }
    (report.config.out / "overhead.json").write_text(json.dumps(data, indent=2, default=str))
    (report.config.out / "overhead.md").write_text(report.table() + "\n")


def variants(text: str) -> tuple[str, ...]:
    """``--variants``: a comma list of :data:`VARIANTS`."""
    return parse_variants(text, VARIANTS)


def per_call_costs(calls: int = 20_000, cold: bool = False) -> dict[str, float]:
    """CPU µs per call of each telemetry step, measured in-process, warm or with ``cold`` caches
    (``costs.step_costs``).

    No server and no network: these isolate what telemetry adds to a request
    when the machine is too busy for a throughput comparison to resolve a few percent.
    """
    return step_costs(per_call_steps(), calls, cold)


def per_call_steps() -> dict[str, Step]:
    """Each telemetry step as a call that runs it once (the interceptor's is a coroutine function)."""
    import grpc
    from opentelemetry import trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    from infergate._proto import grpc_service_pb2 as pb  # type: ignore[import-untyped,unused-ignore]
    from infergate.telemetry.aggregate import Histograms  # type: ignore[import-untyped,unused-ignore]
    from infergate.telemetry.interceptor import TelemetryInterceptor  # type: ignore[import-untyped,unused-ignore]
    from infergate.telemetry.metrics import ServerMetrics  # type: ignore[import-untyped,unused-ignore]
    from infergate.telemetry.providers import build_tracer_provider  # type: ignore[import-untyped,unused-ignore]

    meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("costs")  # a reader: the SDK aggregates
    sdk_counter, sdk_histogram = meter.create_counter("c"), meter.create_histogram("h")
    metrics = ServerMetrics(meter, Histograms("costs"))
    sampled = build_tracer_provider(1.0, Resource.create(), []).get_tracer("costs")
    unsampled = build_tracer_provider(0.0, Resource.create(), []).get_tracer("costs")

    def request_metrics() -> None:  # what one request records (a batch of one)
        metrics.request_started("ModelInfer")
        metrics.request_finished("ModelInfer", "matmul16", "1", 0, 0.001)
        metrics.record_batch("matmul16", 1, 1, [0.0001], 0.0002)

    def spans(tracer: trace.Tracer) -> None:  # the RPC span and, when it records, its queue span
        span = tracer.start_span("rpc", kind=trace.SpanKind.SERVER, attributes={"rpc.system": "grpc"})
        if span.is_recording():
            tracer.start_span("queue", trace.set_span_in_context(span)).end()
        span.end()

    class _Context:  # the two methods the interceptor calls; a stand-in, since no RPC runs here
        def code(self) -> None:
            return None

        def invocation_metadata(self) -> tuple[()]:
            return ()

    class _Details:
        method = "/inference.GRPCInferenceService/ModelInfer"
        invocation_metadata = ()

    response = pb.ModelInferResponse(model_name="matmul16", model_version="1")

    async def behavior(request: object, context: object) -> object:
        return response

    interceptor = TelemetryInterceptor(None, metrics)
    handler = grpc.unary_unary_rpc_method_handler(behavior)
    details = _Details()

    async def continuation(details: object) -> object:
        return handler

    request, context = pb.ModelInferRequest(model_name="matmul16", id="x"), _Context()

    async def intercepted() -> None:
        await (await interceptor.intercept_service(continuation, details)).unary_unary(request, context)

    async def bare() -> None:
        await handler.unary_unary(request, context)

    return {
        "OpenTelemetry SDK Counter.add (2 attributes)": lambda: sdk_counter.add(1, {"a": "b", "c": "d"}),
        "OpenTelemetry SDK Histogram.record (1 attribute)": lambda: sdk_histogram.record(0.005, {"a": "b"}),
        "infergate metrics for one request (aggregated)": request_metrics,
        "interceptor + metrics around one unary call": intercepted,
        "the same unary call without the interceptor (subtract it)": bare,
        "RPC span + queue span, sampled (no exporter)": lambda: spans(sampled),
        "RPC span, not sampled": lambda: spans(unsampled),
    }
