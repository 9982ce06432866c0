"""``infergate check``, run as the real command on good and broken repositories: exit codes and findings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.test_model_control import add_version

WRONG = "ab" * 32


def _unary_model(op: str, constant: float | None = None) -> bytes:
    """``y = op(x)`` (or ``op(x, constant)``) for ``x`` FP32 [batch, 4]."""
    inputs = ["x"] if constant is None else ["x", "c"]
    initializers = [] if constant is None else [numpy_helper.from_array(np.array(constant, dtype=np.float32), "c")]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])],
        op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "infergate", "check", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def _findings(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    body = json.loads(done.stdout)
    assert body["ok"] is (done.returncode == 0)
    findings: list[dict[str, Any]] = body["findings"]
    return findings


def _errors(findings: list[dict[str, Any]], model: str, check: str) -> list[str]:
    return [f["message"] for f in findings if f["model"] == model and f["check"] == check and f["level"] == "error"]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    root = tmp_path / "good"
    add_version(root, "scale", 1)
    add_version(root, "scale", 2)
    digest = hashlib.sha256((root / "scale" / "2" / "model.onnx").read_bytes()).hexdigest()
    (root / "scale" / "2" / "metadata.yaml").write_text(f"sha256: {digest}\nowner: risk\n")
    (root / "scale" / "config.yaml").write_text("version_policy: {all: {}}\nrouting: {weights: {1: 90, 2: 10}}\n")
    return root


def test_a_good_repository_passes_with_exit_0(good: Path, tmp_path: Path) -> None:
    server = tmp_path / "server.yaml"
    server.write_text("max_receive_message_bytes: 1048576\n")
    done = _check("--model-repository", str(good), "--config", str(server), "--smoke", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    findings = _findings(done)
    checked = {(f["model"], f["version"], f["check"]) for f in findings}
    for version in ("1", "2"):
        assert {("scale", version, "checksum"), ("scale", version, "load"), ("scale", version, "smoke")} <= checked
    assert ("scale", "", "routing") in checked and ("", "", "server-config") in checked
    verified = [f["message"] for f in findings if f["check"] == "checksum" and f["version"] == "2"]
    assert verified and verified[0].endswith("(verified)")


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """One model per failure, so a single run shows that every error is reported at once."""
    root = tmp_path / "broken"
    for name in ("badyaml", "unknown", "routed", "tampered", "badmeta", "nan", "sampled"):
        add_version(root, name, 1)
    (root / "badyaml" / "config.yaml").write_text("max_batch_size: [\n")
    (root / "unknown" / "config.yaml").write_text("max_batch_sise: 8\ninstance_group: {count: 0}\n")
    (root / "routed" / "config.yaml").write_text("routing: {weights: {1: 50, 3: 50}}\n")
    (root / "tampered" / "1" / "metadata.yaml").write_text(f"sha256: {WRONG}\n")
    (root / "badmeta" / "1" / "metadata.yaml").write_text("owner: risk\nlicence: MIT\n")
    add_version(root, "corrupt", 1, b"this is not an onnx graph")
    (root / "nan" / "1" / "model.onnx").write_bytes(_unary_model("Div", 0.0))  # x / 0: Inf (NaN at 0)
    (root / "sampled" / "1" / "model.onnx").write_bytes(_unary_model("Sqrt"))  # fine on [0, 1); NaN below 0
    np.savez(root / "sampled" / "1" / "sample.npz", x=np.full((2, 4), -1.0, dtype=np.float32))
    return root


def test_a_broken_repository_reports_every_problem_with_its_file_and_field(broken: Path, tmp_path: Path) -> None:
    server = tmp_path / "server.yaml"
    server.write_text("port: 70000\nmax_recieve_message_bytes: 10\n")
    done = _check("--model-repository", str(broken), "--config", str(server), "--smoke", "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    findings = _findings(done)

    assert sorted(_errors(findings, "", "server-config")) == [
        f"{server}: max_recieve_message_bytes: Extra inputs are not permitted",
        f"{server}: port: Input should be less than or equal to 65535",
    ]
    [badyaml] = _errors(findings, "badyaml", "config")  # the parser's multi-line excerpt stays one finding
    assert badyaml.startswith(f"{broken / 'badyaml' / 'config.yaml'}: not valid YAML")
    unknown = broken / "unknown" / "config.yaml"
    assert sorted(_errors(findings, "unknown", "config")) == [
        f"{unknown}: instance_group.count: Value error, expected a number of instances from 1 to 64, or auto; got 0",
        f"{unknown}: max_batch_sise: Extra inputs are not permitted",
    ]
    assert _errors(findings, "routed", "routing") == [
        f"{broken / 'routed' / 'config.yaml'}: routing.weights.3: version 3 is not loaded (loaded: 1)"
    ]
    actual = hashlib.sha256((broken / "tampered" / "1" / "model.onnx").read_bytes()).hexdigest()
    [mismatch] = _errors(findings, "tampered", "checksum")
    assert WRONG in mismatch and actual in mismatch
    assert _errors(findings, "badmeta", "metadata") == [
        f"{broken / 'badmeta' / '1' / 'metadata.yaml'}: licence: Extra inputs are not permitted"
    ]
    [corrupt] = _errors(findings, "corrupt", "load")
    assert "onnxruntime cannot load" in corrupt
    [nan] = _errors(findings, "nan", "smoke")
    assert "on generated inputs: y:" in nan and "Inf" in nan
    [sampled] = _errors(findings, "sampled", "smoke")
    assert f"on {broken / 'sampled' / '1' / 'sample.npz'}: y: 8 NaN, 0 Inf of 8 values" == sampled


def test_text_output_ends_with_a_summary_and_model_selects_what_is_checked(broken: Path) -> None:
    done = _check("--model-repository", str(broken), "--model", "nan", "routed")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "CHECK", "RESULT", "DETAIL"]
    assert {line.split()[0] for line in lines[1:] if line.strip() and not line[0].isdigit()} == {"nan", "routed"}
    assert lines[-1] == "1 error(s), 0 warning(s): the repository would NOT serve cleanly"  # no --smoke: nan passes


def test_a_model_that_is_not_there_and_a_bad_directory_are_reported(good: Path, tmp_path: Path) -> None:
    done = _check("--model-repository", str(good), "--model", "nope", "--format", "json")
    assert done.returncode == 1
    assert _errors(_findings(done), "nope", "models") == [f"no model directory {good / 'nope'}"]
    missing = _check("--model-repository", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_a_directory_no_request_can_name_is_an_error_the_server_skips(good: Path) -> None:
    """A backslash in a directory's name: the server skips the directory (and serves the rest); the gate
    says so, since the model the directory holds would never serve."""
    odd = good / "a\\b"
    odd.mkdir()
    shutil.copytree(good / "scale" / "1", odd / "1")
    done = _check("--model-repository", str(good), "--format", "json")
    assert done.returncode == 1
    said = f"{odd}: not a model name (a path separator in it): the server skips it"
    assert _errors(_findings(done), "", "models") == [said]


def test_what_the_server_opens_at_start_is_checked_too(good: Path, tmp_path: Path) -> None:
    """An audit log the server cannot open, or a trace exporter it does not know, stops it at start."""
    server = tmp_path / "server.yaml"
    server.write_text(f"audit_log: {tmp_path}\n")
    done = _check("--model-repository", str(good), "--config", str(server), "--format", "json")
    assert done.returncode == 1
    assert _errors(_findings(done), "", "server-config") == [f"{server}: audit_log: {tmp_path} is a directory"]
    server.write_text(f"audit_log: {tmp_path / 'absent' / 'audit.log'}\n")
    done = _check("--model-repository", str(good), "--config", str(server), "--format", "json")
    assert (
        "is not a directory (the server creates the file, not its folder)"
        in _errors(_findings(done), "", "server-config")[0]
    )
    server.write_text("telemetry: {traces: true}\n")
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"}
    command = [sys.executable, "-m", "infergate", "check", "--model-repository", str(good), "--config", str(server)]
    done = subprocess.run(
        [*command, "--format", "json"], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 1
    assert "unknown exporter 'zipkin'" in _errors(_findings(done), "", "server-config")[0]
