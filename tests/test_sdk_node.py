"""The Node/TypeScript client (clients/node), compiled with tsc, against a real server.

The client runs as ``node dist/cli.js REQUEST_JSON``; its numbers must equal
what the Python SDK gets for the same inputs. ``scripts/build_node_client.sh``
runs ``npm ci`` (once per package-lock.json) and ``tsc`` first.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ServerProcess
from test_sdk_client import slow_server  # noqa: F401 -- a fixture
from test_sdk_connection import EchoServer, echo  # noqa: F401 -- a fixture

from infergate_client import Client

ROOT = Path(__file__).resolve().parent.parent
NODE_CLI = ROOT / "clients" / "node" / "dist" / "cli.js"


@pytest.fixture(scope="module")
def node_client() -> Path:
    built = subprocess.run(
        [str(ROOT / "scripts" / "build_node_client.sh")], capture_output=True, text=True, timeout=600, check=False
    )
    if built.returncode != 0:
        pytest.fail(f"building the Node client failed ({built.returncode}):\n{built.stdout}\n{built.stderr}")
    return NODE_CLI


def _node(cli: Path, request: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(cli), json.dumps(request)], capture_output=True, text=True, timeout=60)


def _tensor(array: np.ndarray[Any, Any], datatype: str) -> dict[str, Any]:
    data = [str(x) for x in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
    return {"datatype": datatype, "shape": list(array.shape), "data": data}


def test_node_infer_matches_the_python_sdk_on_matmul16(node_client: Path, demo_server: ServerProcess) -> None:
    x = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    done = _node(node_client, {"url": demo_server.url, "model": "matmul16", "inputs": {"x": _tensor(x, "FP32")}})
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    with Client(demo_server.url) as client:
        want = client.infer("matmul16", {"x": x})["y"]
    got = np.array(reply["outputs"]["y"]["data"], dtype=np.float32).reshape(reply["outputs"]["y"]["shape"])
    assert reply["modelVersion"] == "1"
    np.testing.assert_array_equal(got, want)  # the same bytes: float32 survives JSON's doubles exactly


def test_node_infer_carries_every_datatype_of_multi_io(node_client: Path, demo_server: ServerProcess) -> None:
    inputs = {
        "a": np.array([[0.5, 1.5, -2.0, 4.0]], np.float32),
        "b": np.array([[1, -2, 3, 2**40]], np.int64),
        "flag": np.array([[True]]),
        "text": np.array([["héllo", "x"]], dtype=object),
    }
    datatypes = {"a": "FP32", "b": "INT64", "flag": "BOOL", "text": "BYTES"}
    request = {"inputs": {name: _tensor(inputs[name], dt) for name, dt in datatypes.items()}}
    done = _node(node_client, {**request, "url": demo_server.url, "model": "multi_io"})
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout)["outputs"]
    with Client(demo_server.url) as client:
        want = client.infer("multi_io", inputs)
    assert outputs["sum"]["data"] == want["sum"].reshape(-1).tolist()
    assert [int(v) for v in outputs["doubled"]["data"]] == want["doubled"].reshape(-1).tolist()
    assert outputs["not_flag"]["data"] == [0] and want["not_flag"].tolist() == [[False]]
    assert outputs["text_out"]["data"] == [b.decode() for b in want["text_out"].reshape(-1)]
    half = np.array(outputs["half"]["data"], dtype=np.uint16).view(np.float16)  # FP16 arrives as raw bits
    np.testing.assert_array_equal(half, want["half"].reshape(-1))


def test_node_sends_the_bearer_token_and_metadata(node_client: Path, echo: EchoServer) -> None:  # noqa: F811
    request = {
        "url": echo.url,
        "model": "any",
        "token": "n0de",
        "metadata": {"x-user-id": "bob"},
        "inputs": {"x": _tensor(np.zeros(1, np.float32), "FP32")},
    }
    done = _node(node_client, request)
    assert done.returncode == 0, done.stderr
    received = dict(item.split("=", 1) for item in json.loads(done.stdout)["outputs"]["metadata"]["data"])
    assert received["authorization"] == "Bearer n0de" and received["x-user-id"] == "bob"


def test_node_errors_carry_the_status_code(node_client: Path, demo_server: ServerProcess) -> None:
    x = np.zeros((1, 3), np.float32)
    done = _node(node_client, {"url": demo_server.url, "model": "matmul16", "inputs": {"x": _tensor(x, "FP32")}})
    assert done.returncode == 4
    assert "INVALID_ARGUMENT" in done.stderr and "expected [-1, 16]" in done.stderr


def test_node_calls_have_a_deadline(node_client: Path, slow_server: ServerProcess) -> None:  # noqa: F811
    x = np.zeros((1, 4), np.float32)
    request = {"url": slow_server.url, "model": "slow", "deadlineMs": 200, "inputs": {"x": _tensor(x, "FP32")}}
    done = _node(node_client, request)
    assert done.returncode == 4 and "DEADLINE_EXCEEDED" in done.stderr
