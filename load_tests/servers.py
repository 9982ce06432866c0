"""Server subprocesses: a free loopback port, start, wait for ServerReady, stop.

A server runs in its own session (process group) with stdout and stderr in a
log file. :func:`running_server` always stops it on the way out, error or not:
SIGTERM to the server, then SIGKILL to its whole group if it is not gone within
the grace period (so worker processes it forked cannot outlive it), and to any
process it started that left the group.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate.telemetry.logs import announced

from .procfs import descendants, listeners, process_tree

__all__ = [
    "ServerFailed",
    "check_loopback_only",
    "free_port",
    "running_server",
    "stop_process",
    "wait_ready",
]

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


def _ready(stub: pb_grpc.GRPCInferenceServiceStub, models: Sequence[str], token: str) -> bool:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        if not stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0, metadata=metadata).ready:
            return False
        ready = (stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=1.0, metadata=metadata) for name in models)
        return all(answer.ready for answer in ready)
    except grpc.RpcError:
        return False


def wait_ready(
    target: str,
    process: subprocess.Popen[bytes] | None,
    timeout: float,
    models: Sequence[str] = (),
    token: str = "",
) -> None:
    """Poll ServerReady, then ModelReady for each of ``models``, at ``target`` until all answer true.

    ``token`` is sent as a bearer token (a server with auth on answers ModelReady only to a caller).
    ``process`` is the server's, when this process started it (None: a server started elsewhere).

    Raises ServerFailed if ``process`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ServerFailed(f"exited with code {process.returncode} before it was ready")
            if _ready(stub, models, token):
                return
            time.sleep(_POLL_S)
    waited_for = f" (models: {', '.join(models)})" if models else ""
    raise ServerFailed(f"not ready at {target} within {timeout:.0f}s{waited_for}")


def wait_announced(log_path: pathlib.Path, prefix: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the log at ``log_path`` has a line announcing ``prefix`` (text or JSON); ServerFailed if
    ``process`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(announced(line, prefix) is not None for line in log_path.read_text(errors="replace").splitlines()):
            return
        if process.poll() is not None:
            raise ServerFailed(f"exited with code {process.returncode} before it printed {prefix!r}")
        time.sleep(_POLL_S)
    raise ServerFailed(f"printed no {prefix!r} line within {timeout:.0f}s")


def check_loopback_only(name: str, process: subprocess.Popen[bytes]) -> list[str]:
    """The ``address:port`` pairs that ``process`` and its descendants listen on, all loopback.

    Raises ServerFailed naming any socket bound to another address (0.0.0.0, ::, a LAN address).
    """
    found = listeners(process_tree(process.pid))
    exposed = [str(s) for s in found if not s.loopback]
    if exposed:
        raise ServerFailed(f"{name} listens beyond loopback on {', '.join(exposed)}; it must bind 127.0.0.1 only")
    return [str(s) for s in found]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_survivors(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


def stop_process(process: subprocess.Popen[bytes], grace: float = _STOP_GRACE_S) -> None:
    """SIGTERM ``process``; SIGKILL its process group if anything is left after ``grace``.

    Processes it started that left the group (a new session of their own) are
    noted before the SIGTERM and SIGKILLed last if they are still there.
    """
    pgid = process.pid  # it leads its own session, see running_server
    tree = descendants(process.pid) if process.poll() is None else []
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
    _kill_survivors([pid for pid in tree if _alive_outside(pid, pgid)])


def _alive_outside(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) != pgid
    except ProcessLookupError:
        return False


@contextlib.contextmanager
def running_server(
    name: str,
    argv: Sequence[str],
    target: str,
    log_path: pathlib.Path,
    cwd: pathlib.Path,
    ready_timeout: float = 60.0,
    *,
    env: Mapping[str, str] | None = None,
    models: Sequence[str] = (),
    token: str = "",
    announces: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv``, wait until ``target`` (and each of ``models``) is ready, yield the process, always stop it.

    ``env`` adds to (or overrides) this process's environment; ``token`` is the
    bearer token the readiness calls send. ``announces``: first wait for the server to
    print a line starting so (text or JSON); infergate's ``LISTENING`` line, which under
    ``--workers N`` comes once every worker listens, while the first worker alone already
    answers readiness and would take every connection opened before the others bind.
    Raises ServerFailed (with the log's last lines) if it never becomes ready.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        for key, value in (env or {}).items():
            log.write(f"$ export {key}={value}\n".encode())
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **env} if env is not None else None,
        )
    try:
        try:
            if announces is not None:
                wait_announced(log_path, announces, process, ready_timeout)
            wait_ready(target, process, ready_timeout, models, token)
        except ServerFailed as exc:
            raise ServerFailed(f"{name}: {exc}; last lines of {log_path}:\n{_log_tail(log_path)}") from None
        yield process
    finally:
        stop_process(process)
