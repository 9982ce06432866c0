"""--workers N: several server processes share one port under a supervisor, and behave as one server.

Each test opens many connections (a new channel with a local subchannel pool is a
new connection, which the kernel gives to either worker) and, where it matters,
keeps opening them until every worker got one, so what is checked held on each.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import launch_server, running_server, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from models import save_model

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.models.cpus import model_cpus
from infergate.workers import metrics as worker_metrics
from infergate.workers.metrics import Families, parse
from load_tests.models import build_slow_model
from load_tests.procfs import descendants
from tests.test_model_control import add_version, write_config


def _worker_pids(log: str) -> dict[int, int]:
    """Latest pid of each worker index, from the supervisor's log lines."""
    pids: dict[int, int] = {}
    for index, pid in re.findall(r"worker (\d+) (?:started|restarted) \(pid (\d+)\)", log):
        pids[int(index)] = int(pid)
    return pids


def _ready(log: str, pid: int) -> bool:
    return re.search(rf"\[{pid}\] .*model\(s\) ready", log) is not None


def _infer_on_fresh_channels(url: str, count: int) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    for _ in range(count):
        # A new client is a new connection, which the kernel may give to either worker.
        client = grpcclient.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        tensor = grpcclient.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("matmul16", [tensor]).as_numpy("y").shape == (1, 16)
        client.close()


def test_workers_share_the_port_restart_after_a_crash_and_drain_on_sigterm(
    demo_repository: Path, log_dir: Path
) -> None:
    server = launch_server(demo_repository, log_dir, "--workers", "2", wait=False)
    try:
        wait_until(lambda: len(_worker_pids(server.log())) == 2, "two workers started")
        for pid in _worker_pids(server.log()).values():
            wait_until(lambda pid=pid: _ready(server.log(), pid), f"worker {pid} ready")
        _infer_on_fresh_channels(server.url, 10)

        crashed = _worker_pids(server.log())[0]
        os.kill(crashed, signal.SIGKILL)
        wait_until(lambda: "worker 0 restarted" in server.log(), "worker 0 restarted")
        replacement = _worker_pids(server.log())[0]
        assert replacement != crashed
        # Its models load again before it may serve: wait for its own "ready" line.
        wait_until(lambda: _ready(server.log(), replacement), "the replacement worker ready")
        _infer_on_fresh_channels(server.url, 10)
        live = list(_worker_pids(server.log()).values())
    finally:
        code = server.terminate()
    assert code == 0, server.log()
    for pid in live:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_worker_takes_connections_only_once_its_models_are_loaded(tmp_path: Path, log_dir: Path) -> None:
    """The kernel spreads new connections over every socket bound to the port, loading or not.

    So a worker binds only after its start-up load: from the supervisor's
    "listening on" line on, every connection reaches a worker whose model is
    ready, and so does every connection opened while a crashed worker reloads.
    The model takes about 0.3 s to load (its warm-up runs 15 times), long enough to be seen.
    """
    config = "max_batch_size: 4\nwarmup: {batch_sizes: [1], iterations: 15}\n"
    save_model(build_slow_model(20), tmp_path / "models", "slow", config_yaml=config)
    server = launch_server(tmp_path / "models", log_dir, "--workers", "2", wait=False)  # returns at "listening on"
    try:
        first = _connections(server.url, {"0/2", "1/2"})
        assert all(c.ready("slow") for c in first), server.log()

        crashed = _worker_pids(server.log())[0]
        os.kill(crashed, signal.SIGKILL)
        during: list[Connection] = []
        while not ("worker 0 restarted" in server.log() and "0/2" in {c.worker for c in during[-8:]}):
            assert len(during) < 2000, "the restarted worker never took a connection"
            try:
                during.append(Connection(server.url))
            except grpc.RpcError as exc:  # a connection the killed worker had queued but not accepted: reset
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and "reset" in str(exc.details()), exc
                continue
            assert during[-1].ready("slow"), f"connection {len(during)} reached a worker still loading"
        for connection in first + during:
            connection.close()
    finally:
        code = server.terminate()
    assert code == 0, server.log()


def _worker_children(supervisor: int) -> dict[int, int]:
    """The supervisor's workers that have started Python (their command line names their index): index -> pid."""
    out: dict[int, int] = {}
    for pid in descendants(supervisor):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except FileNotFoundError:
            continue
        if "--worker-index" in argv:
            out[int(argv[argv.index("--worker-index") + 1])] = pid
    return out


def test_no_worker_reports_serving_before_every_worker_listens(demo_repository: Path, log_dir: Path) -> None:
    """A readiness probe must not admit the port while one worker would get every new connection.

    Worker 1 is held (SIGSTOP) from the moment it runs, long before it can
    listen. Worker 0 loads and listens, and answers NOT_SERVING: the kernel
    would give it every connection opened now, and a gRPC client keeps its
    connection. Once worker 1 runs again and listens, both answer SERVING.
    """
    log_path = log_dir / "server-readiness.log"
    command = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(demo_repository), "--port", "0"]
    with log_path.open("w") as log_file:
        process = subprocess.Popen([*command, "--workers", "2"], stdout=subprocess.PIPE, stderr=log_file, text=True)
    assert process.stdout is not None
    held: int | None = None
    try:
        wait_until(lambda: 1 in _worker_children(process.pid), "worker 1 started")
        held = _worker_children(process.pid)[1]
        os.kill(held, signal.SIGSTOP)
        wait_until(lambda: 0 in _worker_children(process.pid), "worker 0 started")
        first = _worker_children(process.pid)[0]
        listening = rf"\[{first}\] .*listening on 127\.0\.0\.1:(\d+)"
        wait_until(lambda: re.search(listening, log_path.read_text()), "worker 0 listening")
        log = log_path.read_text()
        assert not re.search(rf"\[{held}\] .*listening on", log), "worker 1 was held too late to test anything"
        url = f"127.0.0.1:{int(re.findall(listening, log)[0])}"
        alone = Connection(url)
        assert (alone.worker, alone.serving()) == ("0/2", (NOT_SERVING, False))
        alone.close()

        os.kill(held, signal.SIGCONT)
        assert f"listening on {url}" in process.stdout.readline()  # the supervisor's line: both workers listen
        for connection in _connections(url, {"0/2", "1/2"}):
            assert connection.serving() == (SERVING, True), connection.worker
            connection.close()
    finally:
        if held is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(held, signal.SIGCONT)
        process.terminate()
        code = process.wait(timeout=GUARD_S)
        process.stdout.close()
    assert code == 0, log_path.read_text()


# --------------------------------------------------------------------------- one server, not N


X = np.arange(16, dtype=np.float32).reshape(1, 16)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]  # a new channel is a new connection
GUARD_S = 60.0


class Connection:
    """One connection, which the kernel gave to one worker; the worker says which (infergate-worker)."""

    def __init__(self, url: str):
        self._channel = grpc.insecure_channel(url, options=LOCAL_POOL)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        request = pb.ModelStatisticsRequest()
        _, call = self.stub.ModelStatistics.with_call(request, timeout=GUARD_S)
        self.worker = dict(call.initial_metadata())["infergate-worker"]

    def infer(self, model: str = "matmul16") -> None:
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])
        request = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[X.tobytes()])
        self.stub.ModelInfer(request, timeout=GUARD_S)

    def ready(self, model: str = "matmul16") -> bool:
        return bool(self.stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=GUARD_S).ready)

    def serving(self) -> tuple[int, bool]:
        """What a readiness probe sees: health ("", the server) and ServerReady."""
        health = health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(), timeout=GUARD_S)
        return health.status, bool(self.stub.ServerReady(pb.ServerReadyRequest(), timeout=GUARD_S).ready)

    def successes(self, model: str = "matmul16") -> int:
        reply = self.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=GUARD_S)
        return int(reply.model_stats[0].inference_stats.success.count)

    def close(self) -> None:
        self._channel.close()


def _connections(url: str, workers: set[str], at_least: int = 8) -> list[Connection]:
    """``at_least`` new connections, more until every one of ``workers`` got one (bounded)."""
    out: list[Connection] = []
    while len(out) < at_least or not workers <= {c.worker for c in out}:
        assert len(out) < 128, f"the kernel never gave a connection to {workers - {c.worker for c in out}}"
        out.append(Connection(url))
    return out


def test_workers_load_and_unload_together_and_one_scrape_sums_them(demo_repository: Path, log_dir: Path) -> None:
    args = ("--workers", "2", "--model-control-mode", "explicit", "--metrics-port", "0")
    server = launch_server(demo_repository, log_dir, *args, wait=False)
    both = {"0/2", "1/2"}
    try:
        wait_until(lambda: len(_worker_pids(server.log())) == 2, "two workers started")
        for pid in _worker_pids(server.log()).values():
            wait_until(lambda pid=pid: _ready(server.log(), pid), f"worker {pid} ready")
        # Each worker's models get half the CPUs for onnxruntime's threads, not all of them each.
        shares = re.findall(r"worker (\d) of 2: its models' onnxruntime threads share (\S+) of the", server.log())
        assert sorted(shares) == [(w, str(model_cpus(2) or "all")) for w in ("0", "1")], server.log()

        loader = Connection(server.url)
        loader.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="matmul16"), timeout=GUARD_S)
        with pytest.raises(grpc.RpcError) as refused:
            loader.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), timeout=GUARD_S)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in str(refused.value.details())
        # Loaded through one connection, served on every other, whichever worker has it.
        connections = _connections(server.url, both)
        for connection in connections:
            connection.infer()
        by_worker = {c.worker: c for c in connections}
        per_worker = {w: c.successes() for w, c in by_worker.items()}
        assert sum(per_worker.values()) == len(connections)  # ModelStatistics: the worker that answered

        assert server.metric("nv_inference_request_success", model="matmul16") == len(connections)
        assert server.metric("infergate_requests_total", rpc_method="ModelInfer", model="matmul16") == len(connections)
        assert [server.metric("infergate_worker_up", worker=w) for w in ("0", "1")] == [1, 1]

        # A crashed worker comes back with the model loaded through the API; its counts are kept.
        os.kill(_worker_pids(server.log())[0], signal.SIGKILL)
        wait_until(lambda: "worker 0 restarted" in server.log(), "worker 0 restarted")
        wait_until(lambda: _ready(server.log(), _worker_pids(server.log())[0]), "the replacement worker ready")
        server.logged("worker 0 joined model control (1 call(s) replayed)")
        fresh = _connections(server.url, {"0/2"}, at_least=1)
        assert all(c.ready() for c in fresh)
        fresh[-1].infer()
        assert server.metric("nv_inference_request_success", model="matmul16") == len(connections) + 1
        assert server.metric("infergate_worker_restarts_total", worker="0") == 1

        # Unloaded through one connection, gone on every other.
        loader.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="matmul16"), timeout=GUARD_S)
        after = _connections(server.url, both)
        assert not any(c.ready() for c in after)
        for c in [loader, *connections, *fresh, *after]:
            c.close()
    finally:
        code = server.terminate()
    assert code == 0, server.log()


CANARY_AT_30 = """\
version_policy: {all: {}}
routing:
  weights: {1: 1}
  canary: {version: 2, steps: [30, 60], step_requests: 100000}
"""


def test_one_scrape_of_two_workers_gives_their_canary_step_not_its_double(tmp_path: Path, log_dir: Path) -> None:
    """Both workers run the same canary at its 30% step: the pod's scrape says 30 (a sum said 60), and
    every gauge the workers export is merged by a rule of its own (infergate.workers.metrics.GAUGES)."""
    root = tmp_path / "models"
    for version in (1, 2):
        add_version(root, "scale", version)
    write_config(root, "scale", CANARY_AT_30)
    with running_server(root, log_dir, "--workers", "2", "--metrics-port", "0") as server:
        url = server.metrics_url
        assert url is not None
        scraped: Families = {}

        def both_answered() -> bool:
            with urllib.request.urlopen(url, timeout=GUARD_S) as response:
                scraped.clear()
                scraped.update(parse(response.read().decode()))
            return list(scraped["infergate_worker_up"].samples.values()) == [1.0, 1.0]

        wait_until(both_answered, "a scrape that both workers answered")
        canary = {"model": "scale", "model_version": "2"}

        def values(family: str) -> list[float]:
            samples = scraped[family].samples.items()
            return [v for (_, labels), v in samples if canary.items() <= dict(labels).items()]

        assert values("infergate_canary_weight_percent") == [30.0]
        assert values("infergate_canary_rolled_back") == [0.0]
        gauges = {name for name, family in scraped.items() if not family.cumulative} - {"infergate_worker_up"}
        rules = set(worker_metrics.GAUGES)
        assert "nv_inference_pending_request_count" in gauges and gauges <= rules, gauges - rules


def test_log_and_trace_settings_changed_through_one_worker_hold_in_every_worker_and_a_restarted_one(
    demo_repository: Path, log_dir: Path
) -> None:
    # Traces made but sent nowhere: only their settings are under test.
    env = {"OTEL_TRACES_EXPORTER": "none"}
    server = launch_server(demo_repository, log_dir, "--workers", "2", "--traces", wait=False, env=env)
    both = {"0/2", "1/2"}
    verbose = pb.LogSettingsRequest(settings={"log_verbose_level": pb.LogSettingsRequest.SettingValue(uint32_param=1)})
    off = pb.TraceSettingRequest(
        model_name="matmul16", settings={"trace_level": pb.TraceSettingRequest.SettingValue(value=["OFF"])}
    )

    def verbosity(connection: Connection) -> tuple[int, list[str]]:
        """The worker's log verbosity and matmul16's trace level."""
        reply = connection.stub.LogSettings(pb.LogSettingsRequest(), timeout=GUARD_S)
        traces = connection.stub.TraceSetting(pb.TraceSettingRequest(model_name="matmul16"), timeout=GUARD_S)
        return int(reply.settings["log_verbose_level"].uint32_param), list(traces.settings["trace_level"].value)

    try:
        wait_until(lambda: len(_worker_pids(server.log())) == 2, "two workers started")
        for pid in _worker_pids(server.log()).values():
            wait_until(lambda pid=pid: _ready(server.log(), pid), f"worker {pid} ready")
        changer = Connection(server.url)
        assert changer.stub.LogSettings(verbose, timeout=GUARD_S).settings["log_verbose_level"].uint32_param == 1
        assert list(changer.stub.TraceSetting(off, timeout=GUARD_S).settings["trace_level"].value) == ["OFF"]
        connections = _connections(server.url, both)
        assert {c.worker: verbosity(c) for c in connections} == {"0/2": (1, ["OFF"]), "1/2": (1, ["OFF"])}
        for connection in connections:
            connection.infer()  # every worker writes its access line
        pids = _worker_pids(server.log())
        for pid in pids.values():
            server.logged(f"[{pid}] DEBUG infergate.access: ModelInfer")

        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: "worker 0 restarted" in server.log(), "worker 0 restarted")
        wait_until(lambda: _ready(server.log(), _worker_pids(server.log())[0]), "the replacement worker ready")
        fresh = _connections(server.url, {"0/2"}, at_least=1)
        assert verbosity(fresh[-1]) == (1, ["OFF"])  # replayed to it on joining
        for c in [changer, *connections, *fresh]:
            c.close()
    finally:
        code = server.terminate()
    assert code == 0, server.log()


# --------------------------------------------------------------------------- what workers print


PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity: a writer blocks once this much is unread


def test_workers_keep_serving_and_drain_while_their_spans_fill_stdout(demo_repository: Path, log_dir: Path) -> None:
    """With OTEL_TRACES_EXPORTER=console each worker writes a span per call to stdout. The supervisor
    forwards every line to its own stdout, after its "listening on" line; a worker whose pipe nobody
    read would block in its exporter once the pipe is full, and hang in its last flush at SIGTERM."""
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}  # export every 100 ms
    server = launch_server(demo_repository, log_dir, "--workers", "2", wait=False, env=env)
    assert server.process.stdout is not None
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(server.process.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(_worker_pids(server.log())) == 2, "two workers started")
        for pid in _worker_pids(server.log()).values():
            wait_until(lambda pid=pid: _ready(server.log(), pid), f"worker {pid} ready")
        connections = _connections(server.url, {"0/2", "1/2"}, at_least=2)
        by_worker = {c.worker: c for c in connections}
        calls = 0
        while sum(len(line) for line in printed) < 2 * 2 * PIPE_BUFFER:  # twice a full pipe, each worker
            assert calls < 2000, "the spans never reached the supervisor's stdout"
            for connection in by_worker.values():
                connection.infer()
            calls += 1
            if calls % 50 == 0:
                wait_until(lambda calls=calls: len(_spans(printed)) >= 2 * calls, f"the spans of {calls} calls each")
        for c in connections:
            c.close()
    finally:
        code = server.terminate()
    reader.join(GUARD_S)
    assert code == 0, server.log()  # no worker hung in its last flush
    assert len(_spans(printed)) == 2 * calls  # every call's span, from both workers, once
    assert not any(line.startswith("infergate listening on") for line in printed)  # read by launch_server


def _spans(lines: list[str]) -> list[dict[str, object]]:
    """The ModelInfer server spans among the printed lines (one JSON object per line)."""
    spans = [json.loads(line) for line in list(lines) if line.startswith("{")]
    return [s for s in spans if s.get("name") == "inference.GRPCInferenceService/ModelInfer"]


def test_a_sigterm_while_the_workers_start_stops_them_and_exits_cleanly(demo_repository: Path, log_dir: Path) -> None:
    """Kubernetes may stop a pod that is still starting. The supervisor takes SIGTERM from before its first
    worker starts (it once did only after its "listening on" line, and died of the signal before it)."""
    log = log_dir / "starting-workers.log"
    command = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(demo_repository),
               "--port", "0", "--workers", "2"]  # fmt: skip
    with log.open("w") as stderr:
        supervisor = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: len(_worker_children(supervisor.pid)) == 2, "both workers started")
        workers = list(_worker_children(supervisor.pid).values())
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=120) == 0, log.read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
