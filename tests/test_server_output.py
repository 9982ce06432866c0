"""What ``infergate serve`` writes: JSON on every line when asked, exporters chosen the OpenTelemetry
way, and a configuration error reported exactly once.

Real server processes; their stdout and stderr are read whole after they stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from conftest import launch_server

from infergate.config import TelemetryConfig
from infergate.telemetry import Telemetry
from infergate.telemetry.logs import LISTENING, METRICS, listening_address

HANG_GUARD_S = 60.0  # how long a process may take before the test calls it a hang; not a performance bound


def _infer(url: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    client.infer("matmul16", [x])
    client.close()


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed as a JSON object; fails naming the first line that is not one."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "infergate", "serve", "--port", "0", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, **(env or {})}
    )


# --------------------------------------------------------------------------- JSON lines


def test_json_logs_make_every_line_json_including_the_listening_lines(
    demo_repository: Path, log_dir: Path, tmp_path: Path
) -> None:
    """stdout (listening, metrics, console spans) and stderr (logs): one JSON object per line."""
    config = tmp_path / "server.yaml"  # metrics from the file: launch_server reads a --metrics-port line itself
    config.write_text(yaml.safe_dump({"telemetry": {"metrics_port": 0}}))
    server = launch_server(
        demo_repository,
        log_dir,
        *("--log-format", "json", "--config", str(config)),
        env={"OTEL_TRACES_EXPORTER": "console"},
    )
    _infer(server.url)
    assert server.process.stdout is not None
    stdout = server.process.stdout  # the listening line was read by launch_server: read the rest after the stop
    assert server.process.poll() is None
    server.process.terminate()
    assert server.process.wait(HANG_GUARD_S) == 0, server.log()
    rest = stdout.read()
    stdout.close()

    printed = _json_lines(rest)
    assert printed[0]["message"].startswith(METRICS + "http://127.0.0.1:") and printed[0]["level"] == "INFO"
    spans = [entry for entry in printed[1:] if "context" in entry]
    assert "inference.GRPCInferenceService/ModelInfer" in {span["name"] for span in spans}
    logged = _json_lines(server.log())
    assert any(entry["message"].startswith("listening on") for entry in logged)
    assert logged[-1]["message"] == "stopped"


def test_the_listening_line_is_read_in_either_format() -> None:
    json_line = json.dumps({"message": LISTENING + "0.0.0.0:8001", "level": "INFO"})
    assert listening_address(LISTENING + "127.0.0.1:8001\n") == "127.0.0.1:8001"
    assert listening_address(json_line) == "0.0.0.0:8001"
    assert listening_address(json.dumps({"message": "stopped"})) is None
    assert listening_address("{not json") is None
    assert listening_address("infergate metrics on http://127.0.0.1:8002/metrics") is None


def test_workers_print_their_listening_line_as_json_too(demo_repository: Path, log_dir: Path) -> None:
    server = launch_server(demo_repository, log_dir, "--workers", "2", "--log-format", "json")
    try:
        _infer(server.url)
    finally:
        assert server.terminate() == 0, server.log()
    assert {entry["process"] for entry in _json_lines(server.log())} >= {server.process.pid}


# --------------------------------------------------------------------------- exporters


@pytest.mark.parametrize(
    ("exporter", "traced"),
    [(None, False), ("none", False), ("otlp", True), ("console", True), ("console,otlp", True)],
)
def test_otel_traces_exporter_naming_an_exporter_turns_traces_on(
    monkeypatch: pytest.MonkeyPatch, exporter: str | None, traced: bool
) -> None:
    if exporter is None:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", exporter)
    telemetry = Telemetry.from_config(TelemetryConfig())  # traces: false, as without --traces
    try:
        assert telemetry.tracing is traced
    finally:
        telemetry.shutdown()


def test_console_exporter_alone_traces_a_real_server(demo_repository: Path, log_dir: Path) -> None:
    server = launch_server(demo_repository, log_dir, env={"OTEL_TRACES_EXPORTER": "console"})  # no --traces
    _infer(server.url)
    assert server.process.stdout is not None
    server.process.terminate()
    assert server.process.wait(HANG_GUARD_S) == 0, server.log()
    spans = _json_lines(server.process.stdout.read())
    server.process.stdout.close()
    assert {"inference.GRPCInferenceService/ModelInfer", "queue", "batch matmul16"} <= {s["name"] for s in spans}


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("telemetry: {metrics_prot: 9000}\n", "telemetry.metrics_prot: Extra inputs are not permitted"),
        (
            "auth: {enabled: true, algorithms: [HS256], secret_env: INFERGATE_TEST_UNSET_SECRET}\n",
            "auth.secret_env: environment variable INFERGATE_TEST_UNSET_SECRET is not set",
        ),
        ("tls: {cert_file: /nonexistent/tls.crt, key_file: /nonexistent/tls.key}\n", "cannot read /nonexistent"),
    ],
    ids=["schema", "secret", "certificate"],
)
def test_a_configuration_error_is_reported_once(
    demo_repository: Path, tmp_path: Path, workers: str, config: str, message: str
) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(config)
    done = _serve("--model-repository", str(demo_repository), "--config", str(path), "--workers", workers)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count(message) == 1, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, nothing else (no worker noise)
    assert listening_address(done.stdout) is None


def test_a_configuration_error_is_one_json_line_with_json_logs(demo_repository: Path, tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("tls: {cert_file: /nonexistent/tls.crt, key_file: /nonexistent/tls.key}\nlogging: {format: json}\n")
    done = _serve("--model-repository", str(demo_repository), "--config", str(path))
    assert done.returncode == 2
    (entry,) = _json_lines(done.stderr)
    assert entry["level"] == "ERROR" and "cannot read /nonexistent/tls.crt" in entry["message"]
