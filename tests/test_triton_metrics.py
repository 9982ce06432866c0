"""Triton's ``nv_inference_*`` metrics: Triton's names, labels and meanings, equal to ModelStatistics.

A real server with ``--metrics-port``, a tritonclient workload with a failure
in it, then one scrape and one ModelStatistics call with nothing in between.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import launch_server
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from infergate.config import TelemetryConfig
from infergate.telemetry import Telemetry


def _x(rows: int, width: int = 16) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", [rows, width], "FP32")
    x.set_data_from_numpy(np.ones((rows, width), np.float32))
    return [x]


def test_triton_metrics_equal_model_statistics_after_a_workload_with_a_failure(
    demo_repository: Path, log_dir: Path
) -> None:
    server = launch_server(demo_repository, log_dir, "--metrics-port", "0")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for rows in (1, 2, 3, 1):
            client.infer("matmul16", _x(rows))
        with pytest.raises(InferenceServerException, match="shape"):
            client.infer("matmul16", _x(1, width=15))
        assert server.metrics_url is not None
        with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
            text = response.read().decode()
        (stats,) = client.get_inference_statistics("matmul16", as_json=False).model_stats
        client.close()
    finally:
        assert server.terminate() == 0

    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str) -> float:
        (sample,) = [s for s in families[name].samples if s.labels == {"model": "matmul16", "version": "1"}]
        return sample.value

    inference = stats.inference_stats
    assert value("nv_inference_request_success") == inference.success.count == 4
    assert value("nv_inference_request_failure") == inference.fail.count == 1
    assert value("nv_inference_count") == stats.inference_count == 7
    assert value("nv_inference_exec_count") == stats.execution_count == 4
    assert value("nv_inference_request_duration_us") == inference.success.ns // 1000 > 0  # cumulative µs
    assert value("nv_inference_queue_duration_us") == inference.queue.ns // 1000
    assert value("nv_inference_compute_input_duration_us") == inference.compute_input.ns // 1000
    assert value("nv_inference_compute_infer_duration_us") == inference.compute_infer.ns // 1000 > 0
    assert value("nv_inference_compute_output_duration_us") == inference.compute_output.ns // 1000
    assert value("nv_inference_pending_request_count") == 0
    # Triton's exact names: untyped, since OpenMetrics would want a counter to end in _total.
    assert families["nv_inference_request_success"].type == "unknown"
    assert families["nv_inference_pending_request_count"].type == "gauge"


def test_the_triton_metrics_switch_turns_them_off() -> None:
    assert Telemetry.from_config(TelemetryConfig(metrics_port=0)).serve_triton_metrics(list) is True
    assert (
        Telemetry.from_config(TelemetryConfig(metrics_port=0, triton_metrics=False)).serve_triton_metrics(list) is False
    )
    assert Telemetry.from_config(TelemetryConfig()).serve_triton_metrics(list) is False  # no endpoint: nothing to serve
