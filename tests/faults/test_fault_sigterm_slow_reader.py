"""SIGTERM while an answer waits in the server's send queue: the client still gets all of it.

The client reaches the server through a TCP proxy in this test whose
server-to-client direction can be held: while it is held, the proxy reads
nothing and its socket toward the server has a small receive buffer, so an
answer the server has already finished (every byte handed to the kernel) waits
unacknowledged in the server's send queue, as on a slow link or with a client
slow to read. The server is then told to stop, while the client keeps
sending it the small frames a client sends (window updates, as on a busy
connection). It once drained (no call left in progress) and ended at once:
closing a socket with unread bytes, the kernel reset the connection and
dropped the queued answer, and the client got UNAVAILABLE for a call that had
run.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, launch_server, wait_until
from onnx import TensorProto, helper

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.unsent import unacknowledged_bytes

ELEMENTS = 3_000  # 12 KB of answer: within HTTP/2's first window and the server's send buffer, not the proxy's
GUARD_S = 60.0  # a hang guard for a busy machine, not a duration under test


class HeldProxy:
    """Forwards one connection between a client and ``port``; :attr:`flowing` cleared holds the answers."""

    def __init__(self, port: int):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._upstream_port = port
        self.flowing = threading.Event()
        self.flowing.set()
        self.nudging = threading.Event()
        self._upstream_lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        upstream.connect(("127.0.0.1", self._upstream_port))
        self._sockets += [client, upstream]
        for source, sink, gate in ((client, upstream, None), (upstream, client, self.flowing)):
            thread = threading.Thread(target=self._pump, args=(source, sink, gate), daemon=True)
            thread.start()
            self._threads.append(thread)
        nudger = threading.Thread(target=self._nudge, args=(upstream,), daemon=True)
        nudger.start()
        self._threads.append(nudger)

    def _nudge(self, upstream: socket.socket) -> None:
        """Once :attr:`nudging` is set, send the server a connection window update (HTTP/2 WINDOW_UPDATE on
        stream 0, increment 1) every millisecond, as a client's frames keep coming on a busy connection;
        only while the client itself sends nothing (it waits for its answer)."""
        self.nudging.wait()
        frame = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x01"
        while True:
            try:
                with self._upstream_lock:
                    upstream.sendall(frame)
            except OSError:
                return
            time.sleep(0.001)  # the pace of the frames, not a wait for some state

    def _pump(self, source: socket.socket, sink: socket.socket, gate: threading.Event | None) -> None:
        while gate is None or gate.wait(GUARD_S):
            try:
                data = source.recv(65536)
                if not data:
                    break
                with self._upstream_lock if gate is None else contextlib.nullcontext():
                    sink.sendall(data)
            except OSError:  # a reset: pass it on as one
                sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.flowing.set()
        for sock in [self._listener, *self._sockets]:
            sock.close()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    (root / "wide" / "1").mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (root / "wide" / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (root / "wide" / "config.yaml").write_text("max_batch_size: 8\n")
    return root


@pytest.fixture
def server(repository: Path, log_dir: Path) -> Iterator[ServerProcess]:
    server = launch_server(repository, log_dir)
    try:
        yield server
    finally:
        server.terminate(timeout=GUARD_S)


def request(values: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="wide",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, values.size])],
        raw_input_contents=[values.astype(np.float32).tobytes()],
    )


def test_an_answer_still_in_the_send_queue_at_sigterm_reaches_its_client(server: ServerProcess) -> None:
    proxy = HeldProxy(server.port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(request(np.zeros(4)), timeout=GUARD_S)  # the connection is up
            proxy.flowing.clear()
            values = np.arange(ELEMENTS, dtype=np.float32)
            call = stub.ModelInfer.future(request(values), timeout=GUARD_S)
            wait_until(lambda: unacknowledged_bytes(server.process.pid) > ELEMENTS, "the answer in the send queue")
            proxy.nudging.set()
            server.process.send_signal(signal.SIGTERM)
            wait_until(
                lambda: server.process.poll() is not None or "waiting for" in server.log_path.read_text(),
                "the server exited, or waits for its answers to be delivered",
            )
            proxy.flowing.set()
            reply = call.result(timeout=GUARD_S)
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == values.tolist()
        assert server.process.wait(GUARD_S) == 0
    finally:
        proxy.close()
