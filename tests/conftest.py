"""Shared fixtures: real infergate servers in their own processes, on 127.0.0.1.

``launch_server`` runs ``python -m infergate serve`` on port 0, reads the port
it printed (and the metrics address, with ``--metrics-port``), and waits for
grpc.health.v1 to report SERVING (a Watch stream, no polling). Servers are
stopped with SIGTERM and must exit 0.

Where a test must wait for state that has no event to wait on (a queue depth
in a scrape, another process's log line), it polls with :func:`eventually`
(in a coroutine) or :func:`wait_until` (in plain code): the only two pollers,
with one timeout that is a hang guard, never a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.config import ServerConfig
from infergate.demo import write_demo_repository
from infergate.server import InferGateServer
from infergate.serving.shared_memory import SHM_ROOT
from infergate.telemetry.logs import METRICS, announced, listening_address

sys.path.insert(0, str(Path(__file__).parent))

STARTUP_TIMEOUT = 60.0
WAIT_S = 60.0  # how long the pollers wait before they fail: a hang guard for a busy machine


@dataclass(frozen=True)
class Scrape:
    """The samples of one scrape."""

    samples: list[Any]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    log_path: Path
    metrics_url: str | None = None  # http://host:port/metrics when started with --metrics-port

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``, from a real scrape (0 if none)."""
        return self.scrape().metric(name, **labels)

    def queued(self, model: str) -> float:
        """Requests waiting in ``model``'s batch queue, from a real scrape."""
        return self.metric("infergate_queue_depth", model=model)

    def scrape(self) -> Scrape:
        """One real scrape of the metrics endpoint: several figures read from it agree with each other."""
        assert self.metrics_url is not None, "start the server with --metrics-port"
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return Scrape([sample for family in text_string_to_metric_families(text) for sample in family.samples])

    def log(self) -> str:
        """The server's log so far. While it runs, only up to the last complete line: a read may
        land in the middle of the server writing one (seen in CI as half a JSON audit record)."""
        text = self.log_path.read_text()
        if self.process.poll() is not None:
            return text
        return text[: text.rfind("\n") + 1]

    def logged(self, text: str, times: int = 1) -> str:
        """The log once ``text`` is in it ``times`` times or more; fails if it never is. The server writes
        its lines on a thread of its own (telemetry/logs.py): a line logged before an answer may reach
        the file just after the answer reaches the test. Lines are written in the order logged, so
        whatever one process logged before ``text`` is in the log too."""
        wait_until(lambda: self.log().count(text) >= times, f"{text!r} {times} time(s) in the server's log")
        return self.log()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the drain; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def _wait_serving(url: str, process: subprocess.Popen[str], log_path: Path) -> None:
    """Watch health until SERVING. A watch the server ends with UNAVAILABLE while it still runs (a
    ``connections.max_age_seconds`` shorter than its start-up sends GOAWAY) is opened again."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=deadline - time.monotonic())
            try:
                for update in watch:
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                ended = exc.code() == grpc.StatusCode.UNAVAILABLE and process.poll() is None
                if not ended or time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"server never became SERVING ({exc.code()}); exit={process.poll()}\n{log_path.read_text()}"
                    ) from None
            finally:
                watch.cancel()


def launch_server(
    repository: Path,
    log_dir: Path,
    *args: str,
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start a server process on a free port; with ``wait``, block until SERVING."""
    log_path = log_dir / f"server-{os.getpid()}-{len(list(log_dir.glob('server-*')))}.log"
    with log_path.open("w") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "infergate", "serve", "--model-repository", str(repository), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env={**os.environ, **(env or {})},
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    address = listening_address(line)  # text or, with --log-format json, a JSON object
    if address is None:
        process.kill()
        process.wait()
        process.stdout.close()
        raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text()}")
    server = ServerProcess(process, int(address.rsplit(":", 1)[1]), log_path)
    if "--metrics-port" in args:
        line = process.stdout.readline()
        metrics_url = announced(line, METRICS)  # the next line, in the same format
        if metrics_url is None:
            server.terminate(timeout=10)
            raise RuntimeError(f"server printed no metrics address: {line!r}\n{log_path.read_text()}")
        server.metrics_url = metrics_url
    if wait:
        try:
            _wait_serving(server.url, process, log_path)
        except BaseException:
            server.terminate(timeout=10)  # a server that never became SERVING must not outlive the test
            raise
    return server


@contextlib.contextmanager
def running_server(repository: Path, log_dir: Path, *args: str, wait: bool = True) -> Iterator[ServerProcess]:
    server = launch_server(repository, log_dir, *args, wait=wait)
    try:
        yield server
    finally:
        code = server.terminate()
        assert code == 0, f"server exited {code}\n{server.log()}"


@contextlib.asynccontextmanager
async def embedded_server(repository: Path) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """A server embedded in this process, as a program that owns its own logging would run one
    (``InferGateServer`` on 127.0.0.1:0, no telemetry): a stub over a real channel to it."""
    server = InferGateServer(ServerConfig(model_repository=repository, port=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await server.stop()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo what a test set up in this process's logging: ``configure_logging``, called directly or by
    the CLI run in-process (``check``, ``batch``), installs a root handler whose writer thread writes to
    the stream of that moment, often the test's captured stderr, which is closed once the test ends.
    Each handler a test added is closed (its writer thread writes what it holds and ends)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-models")
    write_demo_repository(root)
    return root


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


MakeFile = Callable[[bytes], str]


@pytest.fixture
def make_file() -> Iterator[MakeFile]:
    """``make_file(data)`` writes a new /dev/shm file holding ``data`` and returns its key."""
    made: list[Path] = []

    def make(data: bytes) -> str:
        name = f"infergate-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        path = SHM_ROOT / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        made.append(path)
        return "/" + name

    yield make
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def demo_server(demo_repository: Path, log_dir: Path) -> Iterator[ServerProcess]:
    """One server over the demo repository, shared by the contract tests."""
    with running_server(demo_repository, log_dir) as server:
        yield server


class TritonClient:
    """A tritonclient client of either flavour; every method is awaited.

    Synchronous methods run inline (blocking the test's loop is harmless here);
    asyncio ones are awaited. Nothing is re-implemented: calls go straight through.
    """

    def __init__(self, flavour: str, url: str):
        self.flavour = flavour
        self.raw: Any = (grpcclient if flavour == "sync" else aiogrpcclient).InferenceServerClient(url)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.raw, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return call


@pytest.fixture(params=["sync", "aio"])
async def client(request: pytest.FixtureRequest, demo_server: ServerProcess) -> AsyncIterator[TritonClient]:
    c = TritonClient(request.param, demo_server.url)
    try:
        yield c
    finally:
        await c.close()


POLL_S = 0.02


async def eventually(check: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``check`` (sync or async) until truthy; fail naming ``what`` after ``timeout`` s.

    The timeout is a hang guard for a busy machine, never a measurement.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for: {what}")


def wait_until(check: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    """:func:`eventually` for plain (not async) tests."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for: {what}")
