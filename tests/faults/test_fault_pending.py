"""A backlog in gRPC's core is bounded: calls beyond ``limits.max_pending_calls`` are refused there.

When calls arrive faster than the event loop takes them (a transport-bound model at
ten times its capacity), gRPC's core queues them for the server. With gRPC's own
bounds (1,000, then up to 3,000) that queue held seconds of calls at a few thousand a
second, so every call expired in it and the server answered a quarter of its capacity
(BENCHMARKS.md, "Overload"). ``limits.max_pending_calls`` bounds it.

To build a backlog without depending on speed, the server is stopped (SIGSTOP) while a
client sends its calls, which wait in the kernel, and continued once they are all there:
gRPC's core then reads them at once, before the event loop can take any.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from conftest import launch_server, wait_until

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

CALLS = 200
REQUEST = pb.ModelInferRequest(
    model_name="matmul16",
    inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
    raw_input_contents=[np.ones((1, 16), np.float32).tobytes()],
)


def _queues(port: int) -> tuple[int, int]:
    """(bytes the server's end of its connections holds unread, bytes the clients' ends have not had acked)."""
    unread = unacked = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, remote_port = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            tx, rx = (int(q, 16) for q in fields[4].split(":"))
            if fields[3] != "01":  # ESTABLISHED only
                continue
            if local_port == port:
                unread += rx
            elif remote_port == port:
                unacked += tx
    return unread, unacked


def test_a_backlog_beyond_max_pending_calls_is_refused_by_grpc_and_the_rest_is_served(
    demo_repository: Path, log_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "server.yaml").write_text("limits: {max_pending_calls: 4}\n")
    server = launch_server(demo_repository, log_dir, "--config", str(tmp_path / "server.yaml"))
    channel = grpc.insecure_channel(server.url)
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(REQUEST, timeout=30)  # connected, and the model answers
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            calls = [stub.ModelInfer.future(REQUEST, timeout=60) for _ in range(CALLS)]
            # Every call's bytes delivered into the stopped server's socket: most of them, unread at once.
            wait_until(lambda: _queues(server.port)[0] > 40 * REQUEST.ByteSize(), "the calls wait in the kernel")
            wait_until(lambda: _queues(server.port)[1] == 0, "the client's bytes all delivered")
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        outcomes = Counter(_outcome(call) for call in calls)
        assert set(outcomes) <= {"OK", "CANCELLED"}, outcomes
        assert outcomes["CANCELLED"] > 0, f"gRPC's core refused none of the backlog: {outcomes}"
        assert outcomes["OK"] > 0, outcomes
        stub.ModelInfer(REQUEST, timeout=30)  # and it keeps serving
    finally:
        channel.close()
        assert server.terminate() == 0, server.log()


def _outcome(call: grpc.Future) -> str:
    try:
        call.result()
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"
