"""``--workers N``: N server processes sharing one port, supervised.

Each worker is an ordinary ``infergate serve`` process with its own event
loop, batchers and sessions; the kernel spreads connections over them
(SO_REUSEPORT, Linux). The supervisor reserves the port first (so ``--port 0``
works), starts the workers, restarts one that dies, and on SIGTERM or Ctrl-C
forwards SIGTERM to all of them and exits 0 once every worker drained and
exited 0.

The supervisor is also what makes N processes one server:

* **model control**: it is the one control point; a load or unload asked of
  any worker is applied in every worker before the call returns, and replayed
  to a worker restarted after a crash (``control.py``);
* **metrics**: with ``--metrics-port`` it serves the one Prometheus endpoint,
  merging every worker's series (``metrics.py``);
* **readiness**: a worker reports SERVING only once every worker listens
  (``ControlHub.all_listen``), so a readiness probe never admits the port
  while one worker would take every new connection.

Note that a gRPC client keeps one connection, so one client lands on one
worker; spread calls over several channels (or clients) to use them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from infergate.telemetry.logs import LISTENING, METRICS, announced, announcement
from infergate.workers.control import ControlHub
from infergate.workers.metrics import WorkerMetrics

__all__ = ["supervise"]

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 10.0  # seconds between restarts of a worker that keeps dying
# A worker's stdout lines are read whole (span lines of OTEL_TRACES_EXPORTER=console are long); a
# longer line is dropped, not split, so lines of different workers never interleave.
LINE_LIMIT = 1 << 20
FORWARD_TIMEOUT = 5.0  # seconds an exited worker's pipe may take to reach EOF


@dataclass
class _Worker:
    index: int
    command: list[str]
    process: asyncio.subprocess.Process | None = None
    backoff: float = field(default=0.5)
    forwarder: asyncio.Task[None] | None = None  # copies the worker's stdout after the handshake


@dataclass
class _Shared:
    """What every worker reports to: model control and, with metrics on, the merged endpoint."""

    hub: ControlHub
    metrics: WorkerMetrics | None
    # Set once the supervisor printed its own "listening on" line: workers' lines follow it, never precede it.
    announced: asyncio.Event = field(default_factory=asyncio.Event)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so the port is ours and known; workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, port))
    return reserved


async def _start(worker: _Worker, shared: _Shared, restarted: bool = False) -> None:
    """Start the worker and read its handshake: the "listening on" line, then with metrics on the
    "metrics on" line (text or JSON, as ``--log-format`` says). From then on its stdout is forwarded."""
    process = await asyncio.create_subprocess_exec(*worker.command, stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
    assert process.stdout is not None
    listening = announced((await process.stdout.readline()).decode(), LISTENING)
    metrics = announced((await process.stdout.readline()).decode(), METRICS) if shared.metrics is not None else ""
    if listening is None or metrics is None:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise RuntimeError(f"worker {worker.index} failed to start (exit {process.returncode})")
    worker.process = process
    worker.forwarder = asyncio.create_task(
        _forward(process.stdout, shared.announced), name=f"worker {worker.index} stdout"
    )
    if shared.metrics is not None:
        shared.metrics.worker_started(worker.index, metrics, restarted)
    log.info("worker %d started (pid %d)", worker.index, process.pid)


async def _forward(stdout: asyncio.StreamReader, announced: asyncio.Event) -> None:
    """Copy a worker's stdout to the supervisor's, line by line, until the worker closes it.

    Why: a worker writes more than its handshake to stdout (spans with
    OTEL_TRACES_EXPORTER=console, the health port's line); a pipe nobody reads
    fills up and then blocks the worker. Each line is written whole, in a thread
    so that a slow reader of the supervisor's stdout never stalls its event
    loop; it slows that worker's writes, as it would a single server's. When
    the supervisor's stdout is gone, the lines are read and dropped. Nothing is
    copied before ``announced`` is set, so the supervisor's "listening on" line
    stays the first line of its stdout (scripts and tests read it).
    """
    await announced.wait()
    writing = True
    while True:
        try:
            line = await stdout.readline()
        except ValueError:  # longer than LINE_LIMIT: dropped by the reader
            log.warning("dropped a worker's stdout line longer than %d bytes", LINE_LIMIT)
            continue
        if not line:
            return
        if writing:
            try:
                await asyncio.to_thread(_write_line, line)
            except OSError:  # the supervisor's stdout was closed: keep draining the pipe
                writing = False


def _write_line(line: bytes) -> None:
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()


async def _keep_alive(worker: _Worker, shared: _Shared, stopping: asyncio.Event) -> None:
    """Restart the worker whenever it exits, until the supervisor is stopping."""
    while True:
        assert worker.process is not None
        code = await worker.process.wait()
        await _forwarded(worker)
        if shared.metrics is not None:
            shared.metrics.worker_exited(worker.index)
        if stopping.is_set():
            return
        log.error("worker %d (pid %d) exited with %s; restarting", worker.index, worker.process.pid, code)
        await asyncio.sleep(worker.backoff)  # a crash loop must not spin
        worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF_MAX)
        try:
            await _start(worker, shared, restarted=True)
        except RuntimeError as exc:
            log.error("%s", exc)
            continue
        log.info("worker %d restarted (pid %d)", worker.index, worker.process.pid)


async def _forwarded(worker: _Worker) -> None:
    """Wait until the exited worker's last stdout lines are forwarded (its pipe reached EOF).

    ``asyncio.wait`` does not cancel the forwarder when this waiter is cancelled (a keeper at stop).
    """
    if worker.forwarder is not None:
        _, pending = await asyncio.wait({worker.forwarder}, timeout=FORWARD_TIMEOUT)
        if pending:  # a process it started still holds the pipe open
            log.warning("worker %d: its stdout is still open after it exited", worker.index)


async def _stop(workers: list[_Worker], grace: float) -> bool:
    """SIGTERM every worker, wait for the drain and its last output; True if all exited 0."""
    live = [w.process for w in workers if w.process is not None and w.process.returncode is None]
    for process in live:
        process.send_signal(signal.SIGTERM)
    clean = True
    try:
        async with asyncio.timeout(grace + 10):
            await asyncio.gather(*(p.wait() for p in live))
    except TimeoutError:
        for process in live:
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*(p.wait() for p in live))
        clean = False
    await asyncio.gather(*(_forwarded(w) for w in workers))
    return clean and all(w.process is not None and w.process.returncode == 0 for w in workers)


def _serve_metrics(metrics: WorkerMetrics, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return start_http_server(port, host, registry)


async def supervise(
    host: str,
    port: int,
    count: int,
    worker_args: list[str],
    grace: float,
    metrics_address: tuple[str, int] | None = None,
    log_format: Literal["text", "json"] = "text",
) -> int:
    """Run ``count`` workers of ``infergate serve <worker_args>`` on one port until signalled.

    ``metrics_address`` (host, port): serve the workers' merged metrics there. ``log_format``: the
    format of the "listening on" and "metrics on" lines printed once the workers are up.
    """
    # Before anything starts: a SIGTERM during start-up (or just after the "listening on" line) stops the
    # workers and ends in 0 like any other, instead of killing the supervisor with the signal's default.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reserved = _reserve_port(host, port)
    port = reserved.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="infergate-"))  # mode 0700: only this user reaches the socket
    shared = _Shared(ControlHub(directory / "control.sock"), WorkerMetrics(count) if metrics_address else None)
    command = [sys.executable, "-m", "infergate", "serve", *worker_args, "--port", str(port), "--reuse-port"]
    if metrics_address is not None:
        command += ["--metrics-port", "0"]  # each worker's own endpoint, on 127.0.0.1
    workers = [
        _Worker(i, [*command, "--worker-index", str(i), "--worker-count", str(count), "--control-socket",
                    str(shared.hub.path)])
        for i in range(count)
    ]  # fmt: skip
    http: tuple[WSGIServer, threading.Thread] | None = None
    try:
        await shared.hub.start()
        try:
            await asyncio.gather(*(_start(w, shared) for w in workers))
        except RuntimeError:
            shared.announced.set()  # what the workers printed may say why
            await _stop(workers, grace)
            raise
        finally:
            reserved.close()
        await shared.hub.all_listen()  # before "listening on": from that line on, every worker is SERVING
        address = f"{host}:{port}"
        print(announcement(LISTENING + address, log_format, address=address), flush=True)
        if shared.metrics is not None and metrics_address is not None:
            http = _serve_metrics(shared.metrics, *metrics_address)
            url = f"http://{metrics_address[0]}:{http[0].server_port}/metrics"
            print(announcement(METRICS + url, log_format, url=url), flush=True)
        shared.announced.set()
        log.info("%d workers serving on %s:%d", count, host, port)
        return await _run(workers, shared, grace, stopping)
    finally:
        if http is not None:
            http[0].shutdown()
            http[0].server_close()
        if shared.metrics is not None:
            shared.metrics.close()
        await shared.hub.aclose()
        shutil.rmtree(directory, ignore_errors=True)


async def _run(workers: list[_Worker], shared: _Shared, grace: float, stopping: asyncio.Event) -> int:
    """Keep the workers alive until ``stopping`` (SIGTERM or Ctrl-C), then stop them; 0 when all drained cleanly."""
    keepers = [asyncio.create_task(_keep_alive(w, shared, stopping)) for w in workers]
    await stopping.wait()
    log.info("stopping %d workers", len(workers))
    clean = await _stop(workers, grace)
    for keeper in keepers:
        keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*keepers, return_exceptions=True)
    return 0 if clean else 1
