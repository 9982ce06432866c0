"""The Node/TypeScript client (clients/node), compiled with tsc, against a real server.

The client runs as ``node dist/cli.js REQUEST_JSON``; its numbers must equal
what the Python SDK gets for the same inputs. ``scripts/build_node_client.sh``
runs ``npm ci`` (once per package-lock.json) and ``tsc`` first. Its retries
follow the Python SDK's policy: UNAVAILABLE only, within ``maxAttempts``, the
client's budget and the call's deadline; the CLI reports each on stderr.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ServerProcess, launch_server
from test_sdk_client import slow_server  # noqa: F401 -- a fixture
from test_sdk_connection import EchoServer, echo  # noqa: F401 -- a fixture
from test_tls import Pki, mtls_server, pki, tls_server  # noqa: F401 -- fixtures

from infergate_client import Client
from load_tests.servers import free_port

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
    assert "retry" not in done.stderr  # only UNAVAILABLE is retried


def _matmul16(url: str, **extra: Any) -> dict[str, Any]:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    return {"url": url, "model": "matmul16", "inputs": {"x": _tensor(x, "FP32")}, **extra}


@pytest.mark.parametrize(
    ("retry", "retried"),
    [
        ({"maxAttempts": 3, "initialBackoffMs": 10}, [1, 2]),  # attempts 1 and 2 are retried, 3 is the last
        ({"maxAttempts": 100, "initialBackoffMs": 10, "budgetTokens": 4}, [1]),  # 4 tokens: 3 left, then 2 (half)
        ({"maxAttempts": 1}, []),
    ],
)
def test_node_retries_unavailable_within_max_attempts_and_its_budget(
    node_client: Path, retry: dict[str, Any], retried: list[int]
) -> None:
    nothing_listens = f"127.0.0.1:{free_port()}"
    done = _node(node_client, _matmul16(nothing_listens, retry=retry))
    assert done.returncode == 4 and "UNAVAILABLE" in done.stderr
    reported = [line.split()[1].rstrip(":") for line in done.stderr.splitlines() if line.startswith("retry ")]
    assert [int(attempt) for attempt in reported] == retried


def test_node_retries_until_a_server_comes_up(node_client: Path, demo_repository: Path, log_dir: Path) -> None:
    port = free_port()
    retry = {"maxAttempts": 1000, "initialBackoffMs": 50, "maxBackoffMs": 500, "budgetTokens": 10_000}
    request = _matmul16(f"127.0.0.1:{port}", retry=retry, deadlineMs=120_000)
    call = subprocess.Popen(["node", str(node_client), json.dumps(request)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert call.stdout is not None and call.stderr is not None
    first_retry = threading.Event()
    errors: list[str] = []

    def read_stderr() -> None:
        assert call.stderr is not None
        for line in call.stderr:
            errors.append(line)
            if line.startswith("retry 1:"):
                first_retry.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    server = None
    try:
        assert first_retry.wait(60), f"the call never failed over to a retry: {errors}"
        server = launch_server(demo_repository, log_dir, "--port", str(port))
        out = call.stdout.read()  # stderr is the reader's
        assert call.wait(timeout=120) == 0, errors
        with Client(server.url) as client:
            want = client.infer("matmul16", {"x": np.arange(16, dtype=np.float32).reshape(1, 16)})["y"]
    finally:
        if call.poll() is None:
            call.kill()
            call.wait()
        reader.join(timeout=10)
        call.stdout.close()
        call.stderr.close()
        if server is not None:
            assert server.terminate() == 0
    assert json.loads(out)["outputs"]["y"]["data"] == want.reshape(-1).tolist()


def test_node_calls_have_a_deadline(node_client: Path, slow_server: ServerProcess) -> None:  # noqa: F811
    x = np.zeros((1, 4), np.float32)
    request = {"url": slow_server.url, "model": "slow", "deadlineMs": 200, "inputs": {"x": _tensor(x, "FP32")}}
    done = _node(node_client, request)
    assert done.returncode == 4 and "DEADLINE_EXCEEDED" in done.stderr


# --------------------------------------------------------------------------- TLS


def test_node_infers_over_tls_trusting_the_servers_ca(
    node_client: Path,
    tls_server: ServerProcess,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    done = _node(node_client, _matmul16(tls_server.url, tls={"rootCertificates": pki.path("ca.crt")}))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["y"]["shape"] == [1, 16]


def test_node_refuses_a_server_whose_certificate_it_does_not_trust(
    node_client: Path,
    tls_server: ServerProcess,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    untrusted = {"rootCertificates": pki.path("client-ca.crt")}  # another CA signed the server's certificate
    done = _node(node_client, _matmul16(tls_server.url, tls=untrusted, retry={"maxAttempts": 1}))
    assert done.returncode == 4 and "UNAVAILABLE" in done.stderr


def test_node_presents_a_client_certificate_for_mutual_tls(
    node_client: Path,
    mtls_server: ServerProcess,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    mutual = {
        "rootCertificates": pki.path("ca.crt"),
        "privateKey": pki.path("client.key"),
        "certificateChain": pki.path("client.crt"),
    }
    done = _node(node_client, _matmul16(mtls_server.url, tls=mutual))
    assert done.returncode == 0, done.stderr
    anonymous = {"rootCertificates": pki.path("ca.crt")}
    done = _node(node_client, _matmul16(mtls_server.url, tls=anonymous, retry={"maxAttempts": 1}))
    assert done.returncode == 4 and "UNAVAILABLE" in done.stderr


def test_node_checks_the_server_name_it_is_given(
    node_client: Path,
    tls_server: ServerProcess,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    """The server's certificate names localhost and 127.0.0.1: a name it does not carry is refused."""
    tls = {"rootCertificates": pki.path("ca.crt"), "serverName": "localhost"}
    done = _node(node_client, _matmul16(tls_server.url, tls=tls))
    assert done.returncode == 0, done.stderr
    wrong = {"rootCertificates": pki.path("ca.crt"), "serverName": "someone-else"}
    done = _node(node_client, _matmul16(tls_server.url, tls=wrong, retry={"maxAttempts": 1}))
    assert done.returncode == 4 and "UNAVAILABLE" in done.stderr


def test_node_refuses_a_key_without_its_certificate_chain(node_client: Path, pki: Pki) -> None:  # noqa: F811
    half = {"rootCertificates": pki.path("ca.crt"), "privateKey": pki.path("client.key")}
    done = _node(node_client, _matmul16("127.0.0.1:1", tls=half))
    assert done.returncode != 0
    assert "privateKey and certificateChain go together" in done.stderr


# --------------------------------------------------------------------------- the examples in docs/client.md

TYPESCRIPT_BLOCK = re.compile(r"```typescript\n(.*?)```", re.S)
# Strip the types (typescript's own transpileModule) and run with top-level await, from the repository
# root, so that the examples' "./clients/node/dist" imports resolve.
RUN_TYPESCRIPT = """
const ts = require("./clients/node/node_modules/typescript");
const source = require("fs").readFileSync(0, "utf8");
const options = { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2020 };
const js = ts.transpileModule(source, { compilerOptions: options }).outputText;
eval("(async () => {" + js + "\\n})()").catch((error) => {
  console.error(error);
  process.exit(1);
});
"""


def _docs_examples() -> list[str]:
    blocks = TYPESCRIPT_BLOCK.findall((ROOT / "docs" / "client.md").read_text())
    assert len(blocks) == 4, "docs/client.md's TypeScript examples changed: update this test's count"
    return list(blocks)


def _run_example(source: str) -> None:
    done = subprocess.run(["node", "-e", RUN_TYPESCRIPT], input=source, capture_output=True, text=True, cwd=ROOT,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example printed nothing"


TLS_EXAMPLE = 2  # the others run against the plaintext demo server


@pytest.mark.parametrize("index", [0, 1, 3])
def test_the_docs_node_examples_run(node_client: Path, demo_server: ServerProcess, index: int) -> None:
    _run_example(_docs_examples()[index].replace("127.0.0.1:8001", demo_server.url))


def test_the_docs_node_tls_example_runs_against_a_mutual_tls_server(
    node_client: Path,
    mtls_server: ServerProcess,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    source = _docs_examples()[TLS_EXAMPLE].replace("127.0.0.1:8443", mtls_server.url)
    for name, file in [("ca.pem", "ca.crt"), ("client.key", "client.key"), ("client.pem", "client.crt")]:
        source = source.replace(f'"{name}"', json.dumps(pki.path(file)))
    _run_example(source)


STREAM = """
import { InferenceClient, InferenceFailed } from "./clients/node/dist";
const client = new InferenceClient("URL");
const shapes: number[][] = SHAPES;
const requests = shapes.map((shape, i) => ({
  model: "matmul16",
  inputs: { x: { data: new Float32Array(shape[0] * shape[1]).fill(i), shape } },
  options: { requestId: `r${i}` },
}));
const results: Record<string, number[]> = {};
try {
  for await (const result of client.streamInfer(requests)) {
    results[result.id] = Array.from(result.outputs.y.data as Float32Array);
  }
  console.log(JSON.stringify({ results }));
} catch (error) {
  const failed = error as InferenceFailed;
  console.log(JSON.stringify({ results, error: failed.name, requestId: failed.requestId, details: failed.details }));
} finally {
  client.close();
}
"""


def _stream(demo_server: ServerProcess, shapes: list[list[int]]) -> dict[str, Any]:
    source = STREAM.replace("URL", demo_server.url).replace("SHAPES", json.dumps(shapes))
    done = subprocess.run(["node", "-e", RUN_TYPESCRIPT], input=source, capture_output=True, text=True, cwd=ROOT,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_node_streams_requests_on_one_stream_and_matches_the_python_sdk(
    node_client: Path, demo_server: ServerProcess
) -> None:
    streamed = _stream(demo_server, [[1, 16]] * 3)
    assert "error" not in streamed, streamed
    with Client(demo_server.url) as client:
        for i in range(3):
            expected = client.infer("matmul16", {"x": np.full((1, 16), i, np.float32)})["y"]
            np.testing.assert_array_equal(np.float32(streamed["results"][f"r{i}"]), expected.reshape(-1))


def test_a_failed_request_of_a_node_stream_throws_inference_failed_naming_it(
    node_client: Path, demo_server: ServerProcess
) -> None:
    # The first has the wrong shape: its refusal is the first reply (replies come in the requests' order).
    streamed = _stream(demo_server, [[1, 15], [1, 16]])
    assert streamed["error"] == "InferenceFailed" and streamed["requestId"] == "r0", streamed
    assert "'x'" in streamed["details"] and "[1, 15]" in streamed["details"], streamed
