"""Server subprocesses: a free loopback port, start, wait for ServerReady, stop.

A server runs in its own session (process group) with stdout and stderr in a
log file. :func:`running_server` always stops it on the way out, error or not:
SIGTERM to the server, then SIGKILL to its whole group if it is not gone within
the grace period (so worker processes it forked cannot outlive it).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc

__all__ = ["ServerFailed", "free_port", "running_server", "wait_ready"]

_POLL_S = 0.1
_STOP_GRACE_S = 10.0


class ServerFailed(Exception):
    """A server subprocess exited early or never became ready."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(log_path: pathlib.Path, lines: int = 20) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ready(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    try:
        return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready)
    except grpc.RpcError:
        return False


def wait_ready(target: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll ServerReady at ``target`` until it answers true.

    Raises ServerFailed if ``process`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerFailed(f"exited with code {process.returncode} before it was ready")
            if _ready(stub):
                return
            time.sleep(_POLL_S)
    raise ServerFailed(f"not ready at {target} within {timeout:.0f}s")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_process(process: subprocess.Popen[bytes], grace: float = _STOP_GRACE_S) -> None:
    """SIGTERM ``process``; SIGKILL its process group if anything is left after ``grace``."""
    pgid = process.pid  # it leads its own session, see running_server
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    process.wait(timeout=grace)


@contextlib.contextmanager
def running_server(
    name: str,
    argv: Sequence[str],
    target: str,
    log_path: pathlib.Path,
    cwd: pathlib.Path,
    ready_timeout: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv``, wait until ``target`` is ready, yield the process, always stop it.

    Raises ServerFailed (with the log's last lines) if it never becomes ready.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        try:
            wait_ready(target, process, ready_timeout)
        except ServerFailed as exc:
            raise ServerFailed(f"{name}: {exc}; last lines of {log_path}:\n{_log_tail(log_path)}") from None
        yield process
    finally:
        stop_process(process)
