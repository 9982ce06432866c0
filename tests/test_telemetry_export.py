"""Telemetry leaving a real server process: OTLP to a receiver, a Prometheus scrape, JSON logs.

The OTLP receiver is a plain gRPC server made from opentelemetry-proto's
TraceService and MetricsService definitions, started here on 127.0.0.1:0; the
server process finds it through the standard OTEL_* variables and sends with
the real OTLP exporter. The scrape is parsed with prometheus_client's parser
and linted with ``promtool check metrics`` (``make tools`` unpacks Debian's
promtool into .tools/).
"""

from __future__ import annotations

import json
import queue
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, launch_server
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from telemetry_support import TRACEPARENT, TRACEPARENT_TRACE_ID
from tools import PROMTOOL, require

RECEIVE_TIMEOUT = 60.0
SECRET = "Bearer not-a-real-token-7f3a"


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """Keeps every export request it is sent."""

    def __init__(self) -> None:
        self.traces: queue.Queue[trace_service_pb2.ExportTraceServiceRequest] = queue.Queue()
        self.metrics: queue.Queue[metrics_service_pb2.ExportMetricsServiceRequest] = queue.Queue()

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.traces.put(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metrics.put(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[_Receiver, int]]:
    servicer = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)


def _infer(url: str, headers: dict[str, str] | None = None) -> None:
    client = grpcclient.InferenceServerClient(url)
    try:
        x = grpcclient.InferInput("x", [1, 16], "FP32")
        x.set_data_from_numpy(np.full((1, 16), 0.25, np.float32))
        client.infer("matmul16", [x], headers=headers)
    finally:
        client.close()


def _stop(server: ServerProcess) -> None:
    code = server.terminate()
    assert code == 0, f"server exited {code}\n{server.log()}"


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in items}


def test_spans_and_metrics_reach_an_otlp_receiver(
    receiver: tuple[_Receiver, int], demo_repository: Path, log_dir: Path
) -> None:
    servicer, port = receiver
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "infergate-under-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    }
    server = launch_server(demo_repository, log_dir, "--traces", env=env)
    try:
        _infer(server.url, {"traceparent": TRACEPARENT})
    finally:
        _stop(server)  # shutdown flushes spans and pushes the last metrics

    spans = []
    while not servicer.traces.empty() or not spans:
        export = servicer.traces.get(timeout=RECEIVE_TIMEOUT)
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            assert resource["service.name"] == "infergate-under-test"
            assert resource["deployment.environment"] == "test"
            spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
    names = {s.name for s in spans}
    assert {"inference.GRPCInferenceService/ModelInfer", "queue", "batch matmul16"} <= names
    (rpc,) = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelInfer"]
    assert rpc.trace_id.hex() == TRACEPARENT_TRACE_ID
    assert _attributes(rpc.attributes)["rpc.grpc.status_code"] == 0

    metric_names = set()
    while not servicer.metrics.empty() or "infergate.requests" not in metric_names:
        export = servicer.metrics.get(timeout=RECEIVE_TIMEOUT)
        metric_names |= {
            m.name for rm in export.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }  # fmt: skip
    assert {"infergate.requests", "infergate.queue.duration", "infergate.batch.size"} <= metric_names


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=RECEIVE_TIMEOUT) as response:
        assert response.status == 200
        return str(response.read().decode())


def test_the_prometheus_endpoint_serves_a_valid_exposition(demo_repository: Path, log_dir: Path) -> None:
    server = launch_server(demo_repository, log_dir, "--metrics-port", "0")
    try:
        assert server.metrics_url is not None and server.metrics_url.startswith("http://127.0.0.1:")
        for _ in range(3):
            _infer(server.url)
        text = _scrape(server.metrics_url)
    finally:
        _stop(server)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["infergate_requests"]
    assert requests.type == "counter"
    (served,) = [s for s in requests.samples if s.labels["model"] == "matmul16"]
    assert served.labels["rpc_method"] == "ModelInfer" and served.labels["rpc_grpc_status_code"] == "0"
    assert served.value == 3
    for histogram in ("infergate_request_duration_seconds", "infergate_queue_duration_seconds",
                      "infergate_compute_duration_seconds", "infergate_batch_size"):  # fmt: skip
        assert families[histogram].type == "histogram"
    buckets = [s for s in families["infergate_queue_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert float(buckets[0].labels["le"]) < 0.001  # sub-millisecond resolution
    assert families["infergate_queue_depth"].type == "gauge"
    assert {"process_cpu_time_seconds", "process_memory_usage_bytes", "infergate_model_loads"} <= set(families)

    promtool = require(PROMTOOL, "install_promtool.sh")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    # Exit 3 is "lint problems only". Triton's own names break Prometheus' naming advice (``_us``, a
    # gauge named ``_count``); they are kept as Triton spells them, for its users' dashboards.
    problems = [line for line in (lint.stdout + lint.stderr).splitlines() if not line.startswith("nv_inference_")]
    assert lint.returncode in (0, 3) and not problems, lint.stdout + lint.stderr


def test_json_logs_carry_trace_ids_and_no_secrets(demo_repository: Path, log_dir: Path) -> None:
    server = launch_server(
        demo_repository,
        log_dir,
        *("--log-format", "json", "--log-level", "debug", "--traces"),
        env={"OTEL_TRACES_EXPORTER": "none"},  # spans are made (their ids go in the logs) but not sent
    )
    try:
        _infer(server.url, {"traceparent": TRACEPARENT, "authorization": SECRET})
    finally:
        _stop(server)

    log = server.log()
    assert SECRET.split()[1] not in log
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    (access,) = [e for e in entries if e["logger"] == "infergate.access"]
    assert access["trace_id"] == TRACEPARENT_TRACE_ID and len(access["span_id"]) == 16
    assert access["rpc_method"] == "ModelInfer" and access["grpc_status"] == "OK"
    assert access["model"] == "matmul16" and access["model_version"] == "1"
    assert next(e for e in entries if e["logger"] == "infergate.server")["trace_id"] == ""  # outside a request
