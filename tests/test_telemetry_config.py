"""The telemetry and logging configuration blocks, their flags, and the text log format."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from infergate.config import ConfigError, TelemetryConfig, load_server_config
from infergate.telemetry import Telemetry, configure_logging


def test_flags_override_single_keys_of_the_file_block(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("telemetry: {traces: true, sample_ratio: 0.25, metrics_port: 9000}\nlogging: {format: json}\n")
    config = load_server_config(
        path, {"telemetry": {"metrics_port": 9100, "traces": None}, "logging": {"format": None}}
    )
    assert config.telemetry.metrics_port == 9100
    assert config.telemetry.traces and config.telemetry.sample_ratio == 0.25
    assert config.logging.format == "json"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("telemetry: {sample_ratio: 1.5}", "telemetry.sample_ratio: Input should be less than or equal to 1"),
        ("telemetry: {metrics_prot: 9000}", "telemetry.metrics_prot: Extra inputs are not permitted"),
        ("logging: {format: xml}", "logging.format: Input should be 'text' or 'json'"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_server_config(path, {})


def test_everything_off_means_no_interceptor_and_no_hooks() -> None:
    telemetry = Telemetry.from_config(TelemetryConfig())
    assert telemetry.interceptors() == [] and telemetry.observer is None and telemetry.metrics is None


def test_an_unknown_trace_exporter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'"):
        Telemetry.from_config(TelemetryConfig(traces=True))


def test_text_lines_inside_a_span_end_with_its_ids() -> None:
    stream = io.StringIO()
    logs = configure_logging("info", "text", stream)
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("infergate.test")
    log.info("outside")
    with tracer.start_as_current_span("request") as span:
        log.info("inside")
    logs.close()  # lines are written by a thread of their own: every one is written once it stops
    ids = span.get_span_context()
    outside, inside = stream.getvalue().splitlines()
    assert outside.endswith("INFO infergate.test: outside")
    assert inside.endswith(f"inside trace_id={ids.trace_id:032x} span_id={ids.span_id:016x}")
