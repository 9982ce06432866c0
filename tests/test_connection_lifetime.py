"""``connections``: how long a client connection lives, so that new capacity gets its share.

A gRPC client keeps one connection, and a Kubernetes Service or ``--workers``
spreads connections, not calls. With ``max_age_seconds`` the server tells each
connection to go (GOAWAY) after that long; the client reconnects, and the new
connection may land elsewhere, while no call fails. Calls in flight get
``max_age_grace_seconds``; a stream still open after that ends with UNAVAILABLE.
``max_idle_seconds`` closes a connection that carried no call for that long,
and keepalive pings close one whose client stopped answering, freeing its calls.
Each test runs a real server and real clients; what is waited for is observable
(which worker answered, the channel's state, a stream's end), never a sleep.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, running_server, wait_until

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.config import load_server_config
from infergate.configfile import ConfigError

GUARD_S = 60.0  # a hang guard, not a performance bound
CALLERS = 4


def _request() -> pb.ModelInferRequest:
    x = np.ones((1, 16), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])
    return pb.ModelInferRequest(model_name="matmul16", inputs=[tensor], raw_input_contents=[x.tobytes()])


@pytest.fixture
def server(request: pytest.FixtureRequest, demo_repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with the ``connections`` block given as the test's parameter, and its extra flags."""
    connections, *flags = request.param
    config = tmp_path / "server.yaml"
    config.write_text(f"connections: {connections}\n")
    with running_server(demo_repository, tmp_path, "--config", str(config), *flags) as server:
        yield server


@pytest.mark.parametrize("server", [("{max_age_seconds: 0.5, max_age_grace_seconds: 10}", "--workers", "2")],
                         indirect=True)  # fmt: skip
def test_one_client_connection_moves_between_workers_without_a_failed_call(server: ServerProcess) -> None:
    """Four threads share one channel (one connection at a time) and call until both workers answered.

    Each infers, then asks ModelStatistics, whose answer names the worker (``infergate-worker``).
    Without ``max_age_seconds`` that channel would stay on the first worker it reached for good.
    """
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        seen: set[str] = set()
        errors: list[grpc.RpcError] = []
        calls = 0
        done = threading.Event()

        def call() -> None:
            nonlocal calls
            while not done.is_set():
                try:
                    stub.ModelInfer(_request(), timeout=GUARD_S)
                    _, rpc = stub.ModelStatistics.with_call(pb.ModelStatisticsRequest(), timeout=GUARD_S)
                except grpc.RpcError as exc:
                    errors.append(exc)
                    continue
                seen.add(dict(rpc.initial_metadata())["infergate-worker"])
                calls += 1

        callers = [threading.Thread(target=call) for _ in range(CALLERS)]
        for caller in callers:
            caller.start()
        try:
            wait_until(lambda: seen == {"0/2", "1/2"} or errors, "both workers answering one channel")
        finally:
            done.set()
            for caller in callers:
                caller.join(GUARD_S)
    assert not errors, [f"{e.code()}: {e.details()}" for e in errors[:3]]
    assert seen == {"0/2", "1/2"} and calls > 0


@pytest.mark.parametrize("server", [("{max_age_seconds: 0.5, max_age_grace_seconds: 0.5}",)], indirect=True)
def test_a_stream_open_past_max_age_and_grace_ends_with_unavailable(server: ServerProcess) -> None:
    """The grace bounds how long a connection outlives its age: a long stream must be reopened."""
    requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    with grpc.insecure_channel(server.url) as channel:
        replies = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests.get, None), timeout=GUARD_S)
        requests.put(_request())
        assert next(replies).error_message == ""
        with pytest.raises(grpc.RpcError) as ended:
            next(replies)  # nothing more is sent: the stream stays open until the server closes the connection
        requests.put(None)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()


@pytest.mark.parametrize("server", [("{max_idle_seconds: 0.5}",)], indirect=True)
def test_a_connection_without_calls_is_closed_and_the_next_call_reconnects(server: ServerProcess) -> None:
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(server.url) as channel:
        channel.subscribe(states.append)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=GUARD_S).ready
        wait_until(lambda: grpc.ChannelConnectivity.READY in states, "connected")
        ready_at = states.index(grpc.ChannelConnectivity.READY)
        wait_until(lambda: grpc.ChannelConnectivity.IDLE in states[ready_at:], "the idle connection closed")
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=GUARD_S).ready  # a new connection, at once


# A client that opens a stream, gets one answer, says so and then holds the stream open.
STREAMING_CLIENT = textwrap.dedent("""
    import queue, sys
    import grpc, numpy as np
    from infergate._proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])
    request = pb.ModelInferRequest(model_name="matmul16", inputs=[tensor],
                                   raw_input_contents=[np.ones((1, 16), np.float32).tobytes()])
    requests = queue.Queue()
    requests.put(request)
    channel = grpc.insecure_channel(sys.argv[1])
    replies = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests.get, None))
    assert next(replies).error_message == ""
    print("streaming", flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize(
    "server",
    [("{keepalive_time_seconds: 0.5, keepalive_timeout_seconds: 0.5}\nlimits: {max_inference_calls: 1}",)],
    indirect=True,
)
def test_a_client_that_stops_answering_loses_its_stream_and_the_call_slot_it_held(server: ServerProcess) -> None:
    """The client holds the server's one inference call slot with an open stream, then freezes
    (SIGSTOP: its host hung; TCP still answers, gRPC does not). The server's keepalive ping goes
    unanswered, it closes the connection, and the slot serves others again."""
    client = subprocess.Popen(
        [sys.executable, "-c", STREAMING_CLIENT, server.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert client.stdout is not None
    try:
        assert client.stdout.readline() == "streaming\n"
        with grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_request(), timeout=GUARD_S)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the stream holds the one slot
            os.kill(client.pid, signal.SIGSTOP)

            def served() -> bool:
                try:
                    stub.ModelInfer(_request(), timeout=GUARD_S)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    return False
                return True

            wait_until(served, "the frozen client's slot freed")
    finally:
        client.kill()
        client.wait()
        client.stdout.close()
        if client.stdin is not None:
            client.stdin.close()


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("{max_age_seconds: 0}", "connections.max_age_seconds"),
        ("{max_idle_seconds: -1}", "connections.max_idle_seconds"),
        ("{max_age_grace_seconds: -1}", "connections.max_age_grace_seconds"),
        ("{keepalive_timeout_seconds: 0}", "connections.keepalive_timeout_seconds"),
        ("{max_age: 60}", "connections.max_age"),
    ],
)
def test_a_bad_connections_block_is_refused_naming_the_file_and_the_field(
    tmp_path: Path, block: str, field: str
) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"connections: {block}\n")
    with pytest.raises(ConfigError) as refused:
        load_server_config(config, {})
    assert str(config) in str(refused.value) and field in str(refused.value)
