"""The README's examples run as written against ``make demo``.

Every fenced block the README marks with an HTML comment right above it runs here, in
README order (the marker is documented in the README's Development section):

* ``<!-- runnable -->``: a ``bash`` block runs with ``bash -euo pipefail``, a ``python``
  block with this interpreter; each must exit 0. Variables a shell block exports reach
  the blocks after it, as in one terminal session.
* ``<!-- runnable: server -->``: a block that starts a server in the foreground. It runs
  in the background until the last block is done; the test waits until the server's
  ``--port`` reports grpc.health.v1 SERVING, then goes on.

The demo server is started as ``make demo`` starts it (``infergate serve --model-repository
demo-models --host 127.0.0.1 --port 8001 --metrics-port 8002``, over a copy of the demo
repository that ``infergate demo-repository`` writes) in a temporary directory that is every
block's working directory, with the virtual environment first on PATH (the README says to
activate it) and the clone on PYTHONPATH (``python -m load_tests`` runs from the clone).
Only the port numbers are substituted: each 80xx port the blocks name becomes a free
port, in the server command and the blocks alike.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from load_tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- runnable(?:: (?P<kind>server))? -->\n```(?P<language>\w+)\n(?P<code>.*?)```", re.S)
PORT = re.compile(r"\b80\d\d\b")
BLOCK_TIMEOUT_S = 120.0  # a hang guard for a busy machine, not a performance bound
DEMO_PORT, DEMO_METRICS_PORT = "8001", "8002"


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    code: str
    server: bool

    def __str__(self) -> str:
        return f"README.md line {self.line} ({self.language}{', server' if self.server else ''})"


def runnable_blocks(text: str) -> list[Block]:
    return [
        Block(text.count("\n", 0, m.start()) + 2, m["language"], m["code"], m["kind"] == "server")
        for m in BLOCK.finditer(text)
    ]


class Session:
    """The README's terminal: one working directory, exported variables carried from block to block."""

    def __init__(self, directory: Path, ports: dict[str, str]):
        self.directory = directory
        self.ports = ports
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
        self.servers: list[subprocess.Popen[bytes]] = []

    def localize(self, code: str) -> str:
        return PORT.sub(lambda m: self.ports[m.group()], code)

    def run(self, block: Block) -> None:
        code = self.localize(block.code)
        if block.server:
            self._serve(block, code)
            return
        log = self.directory / f"block-{block.line}.log"
        env_file = self.directory / "env"
        if block.language == "bash":
            command = ["bash", "-euo", "pipefail", "-c", f"{code}\nenv -0 > {env_file}"]
        else:
            assert block.language == "python", block
            command = [sys.executable, "-c", code]
        with log.open("wb") as output:
            done = subprocess.run(
                command, cwd=self.directory, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                timeout=BLOCK_TIMEOUT_S, check=False,
            )  # fmt: skip
        assert done.returncode == 0, f"{block} exited {done.returncode}:\n{code}\n--- output:\n{log.read_text()}"
        if block.language == "bash":
            pairs = (item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
            self.env = dict(pairs)

    def _serve(self, block: Block, code: str) -> None:
        port = re.search(r"--port (\d+)", code)
        assert port, f"{block}: a server block must name its --port"
        log = self.directory / f"server-{block.line}.log"
        command = ["bash", "-euo", "pipefail", "-c", code]
        with log.open("wb") as output:  # the server keeps its own descriptor
            server = subprocess.Popen(
                command,
                cwd=self.directory,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.servers.append(server)
        wait_serving(f"127.0.0.1:{port[1]}", f"{block} did not become SERVING; see {log}")

    def close(self) -> None:
        for server in self.servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in self.servers:
            assert server.wait(BLOCK_TIMEOUT_S) == 0, f"a README server exited {server.returncode}"


def wait_serving(address: str, what: str) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=BLOCK_TIMEOUT_S)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=BLOCK_TIMEOUT_S)
        try:
            assert any(u.status == health_pb2.HealthCheckResponse.SERVING for u in watch), what
        finally:
            watch.cancel()


@pytest.fixture
def session(tmp_path: Path, demo_repository: Path) -> Iterator[Session]:
    blocks = runnable_blocks(README.read_text())
    named = {port for block in blocks for port in PORT.findall(block.code)} | {DEMO_PORT, DEMO_METRICS_PORT}
    session = Session(tmp_path, {port: str(free_port()) for port in sorted(named)})
    shutil.copytree(demo_repository, tmp_path / "demo-models")
    serve = "infergate serve --model-repository demo-models --host 127.0.0.1"
    session.run(Block(0, "bash", f"{serve} --port {DEMO_PORT} --metrics-port {DEMO_METRICS_PORT}", True))  # make demo
    try:
        yield session
    finally:
        session.close()


def test_the_markers_are_found_and_every_runnable_block_is_bash_or_python() -> None:
    text = README.read_text()
    blocks = runnable_blocks(text)
    markers = re.findall(r"^<!-- runnable", text, re.M)
    assert len(blocks) >= 10 and len(markers) == len(blocks)  # no marker lost its block
    assert {b.language for b in blocks} == {"bash", "python"}
    absolute = [path for b in blocks for path in re.findall(r"(?<![\w.:/])/[\w.-]+(?:/[\w.-]+)+", b.code)]
    assert not absolute, f"README examples must use paths inside the repository or the demo: {absolute}"


def test_every_runnable_block_of_the_readme_runs_against_the_demo(session: Session) -> None:
    for block in runnable_blocks(README.read_text()):
        session.run(block)
