"""``--workers N``: N server processes sharing one port, supervised.

Each worker is an ordinary ``infergate serve`` process with its own event
loop, batchers and sessions; the kernel spreads connections over them
(SO_REUSEPORT, Linux). The supervisor reserves the port first (so ``--port 0``
works), starts the workers, restarts one that dies, and on SIGTERM or Ctrl-C
(during start-up too) forwards SIGTERM to all of them, started or still
starting, and exits 0 once every worker drained and exited 0.

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
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from infergate.netaddr import host_port
from infergate.telemetry.logs import LISTENING, METRICS, announced, announcement
from infergate.telemetry.providers import sdk_disabled
from infergate.workers.control import ControlHub
from infergate.workers.metrics import WorkerMetrics

__all__ = ["supervise"]

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 10.0  # seconds between restarts of a worker that keeps dying
# A worker's stdout lines are read whole (span lines of OTEL_TRACES_EXPORTER=console are long); a
# longer line is dropped, not split, so lines of different workers never interleave.
LINE_LIMIT = 1 << 20
FORWARD_TIMEOUT = 5.0  # seconds an exited worker's pipe may take to reach EOF
# Seconds a worker gets after the drain's grace to end before it is SIGKILLed: its telemetry flush
# (telemetry/flush.py) and log lines still queued (telemetry/logs.py) have budgets that fit in it.
EXIT_MARGIN_S = 10.0


@dataclass
class _Worker:
    index: int
    command: list[str]
    # Its latest process, from the moment it is spawned: a stop must signal a worker still starting too.
    process: asyncio.subprocess.Process | None = None
    listening: bool = False  # that process finished its handshake
    spawning: asyncio.Task[asyncio.subprocess.Process] | None = None  # its latest spawn (see _start)
    backoff: float = field(default=0.5)
    forwarder: asyncio.Task[None] | None = None  # copies the worker's stdout after the handshake


class _StoppedBeforeListening(RuntimeError):
    """A worker exited 0 before its handshake: it was told to stop (Ctrl-C reaches the whole process group,
    systemd's stop the whole control group), so this is a stop, not a failed start."""


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
    """Start the worker and read its handshake (``_handshake``). From then on its stdout is forwarded.

    Cancelled part-way (a stop), the process is on ``worker`` all the same, for ``_stop`` to signal.
    """
    # Shielded: cancelled while spawning, asyncio would SIGKILL the child; the stop SIGTERMs it instead.
    worker.spawning = asyncio.create_task(_spawn(worker), name=f"worker {worker.index} spawn")
    process = await asyncio.shield(worker.spawning)
    assert process.stdout is not None
    listening, metrics = await _handshake(process.stdout, shared.metrics is not None)
    if listening is None or metrics is None:
        _signal(process, signal.SIGKILL)  # a line other than the handshake's: it may still run
        code = await process.wait()
        if code == 0:
            raise _StoppedBeforeListening(f"worker {worker.index} stopped before it listened")
        raise RuntimeError(f"worker {worker.index} failed to start (exit {code})")
    worker.listening = True
    worker.forwarder = asyncio.create_task(
        _forward(process.stdout, shared.announced), name=f"worker {worker.index} stdout"
    )
    if shared.metrics is not None:
        shared.metrics.worker_started(worker.index, metrics, restarted)
    log.info("worker %d started (pid %d)", worker.index, process.pid)


async def _spawn(worker: _Worker) -> asyncio.subprocess.Process:
    """Start the worker's process and put it on ``worker`` at once: a stop must signal a worker still starting."""
    process = await asyncio.create_subprocess_exec(*worker.command, stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
    worker.process, worker.listening, worker.forwarder = process, False, None
    return process


async def _handshake(stdout: asyncio.StreamReader, metrics: bool) -> tuple[str | None, str | None]:
    """The worker's "listening on" address, then with ``metrics`` its "metrics on" URL ("" without); None for
    a line that is not the one expected (text or JSON, as ``--log-format`` says), or for its end of output."""
    listening = announced((await stdout.readline()).decode(), LISTENING)
    if not metrics or listening is None:
        return listening, ""
    return listening, announced((await stdout.readline()).decode(), METRICS)


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


async def _drain(stdout: asyncio.StreamReader) -> None:
    """Read a worker's stdout to its end, dropping it: one stopped before its handshake was read, whose
    output (if any) must not precede the supervisor's own lines, nor fill its pipe and block its drain."""
    while await stdout.read(LINE_LIMIT):
        pass


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
        if stopping.is_set():  # set during the backoff: a worker started now would serve a draining pod
            return
        worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF_MAX)
        try:
            await _start(worker, shared, restarted=True)
        except RuntimeError as exc:
            log.error("%s", exc)
            continue
        except OSError as exc:  # the spawn itself failed (out of file descriptors, memory): try again later
            log.error("worker %d could not be restarted: %s", worker.index, exc)
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
    """SIGTERM every worker process still running, started or still starting; wait for the drain and its
    last output; True if each of them stopped cleanly (``_stopped_cleanly``).

    Only these count: a worker already dead (crashed, its restart not yet spawned) had nothing left to
    drain, so the result does not hang on where in its restart the stop found it.
    """
    # Spawns still under way (their starts were cancelled, not they) end first: their processes count too.
    await asyncio.gather(*(w.spawning for w in workers if w.spawning is not None), return_exceptions=True)
    live = [(w, w.process) for w in workers if w.process is not None and w.process.returncode is None]
    for worker, process in live:
        _signal(process, signal.SIGTERM)
        if not worker.listening and process.stdout is not None:
            worker.forwarder = asyncio.create_task(_drain(process.stdout), name=f"worker {worker.index} stdout")
    clean = True
    try:
        async with asyncio.timeout(grace + EXIT_MARGIN_S):
            await asyncio.gather(*(p.wait() for _, p in live))
    except TimeoutError:
        for _, process in live:
            _signal(process, signal.SIGKILL)
        await asyncio.gather(*(p.wait() for _, p in live))
        clean = False
    await asyncio.gather(*(_forwarded(w) for w in workers))
    return clean and all(_stopped_cleanly(p.returncode, w.listening) for w, p in live)


def _signal(process: asyncio.subprocess.Process, sig: int) -> None:
    """Send ``sig`` unless the process is known to have exited.

    Not ``Process.send_signal`` or ``kill``: they poll the child first (bpo-38630), which reaps one that
    has just exited before asyncio's child watcher does; the watcher then reports its exit status as 255,
    so a worker that exited 0 (Ctrl-C reaches the whole process group) would read as failed.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited, reaped by the watcher, not yet reported
            os.kill(process.pid, sig)


def _stopped_cleanly(code: int | None, listening: bool) -> bool:
    """Exited 0; or, not listening yet, died of the stop's signal before it could handle it (it had taken
    no call, so it lost none)."""
    return code == 0 or (not listening and code in (-signal.SIGTERM, -signal.SIGINT))


async def _start_all(workers: list[_Worker], shared: _Shared, stopping: asyncio.Event) -> bool:
    """Start every worker; False when the start-up ends in a stop instead: ``stopping`` was set (the supervisor
    does not wait for a handshake then), or a worker stopped before it listened. Raises RuntimeError when a
    worker failed to start. Either way no start is left running, and each process spawned is on its worker.
    """
    starts = [asyncio.create_task(_start(w, shared), name=f"worker {w.index} start") for w in workers]
    stop = asyncio.create_task(stopping.wait())
    pending: set[asyncio.Task[Any]] = set(starts)
    try:
        while pending:
            done, pending = await asyncio.wait({*pending, stop}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stop)
            if stopping.is_set() or not _started(done - {stop}):
                return False
        return True
    finally:
        for task in (*starts, stop):
            task.cancel()
        await asyncio.gather(*starts, stop, return_exceptions=True)


def _started(starts: set[asyncio.Task[Any]]) -> bool:
    """Whether these finished starts succeeded: False for a worker stopped before it listened; a failed
    start raises its RuntimeError."""
    try:
        for start in starts:
            start.result()
    except _StoppedBeforeListening:
        return False
    return True


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
    Returns 0 when stopped cleanly (at start-up too: Ctrl-C then is no failure), else 1.
    """
    # Before anything starts: a SIGTERM during start-up (or just after the "listening on" line) stops the
    # workers and ends in 0 like any other, instead of killing the supervisor with the signal's default.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if metrics_address is not None and sdk_disabled():
        # Workers then build no registry and print no "metrics on" line, which the handshake would wait
        # for in vain; like a single server (docs/observability.md), no endpoint at all.
        log.warning("OTEL_SDK_DISABLED=true: no metrics endpoint, whatever --metrics-port says")
        metrics_address = None
    reserved = _reserve_port(host, port)
    port = reserved.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="infergate-"))  # mode 0700: only this user reaches the socket
    hub = ControlHub(directory / "control.sock", stopping)  # a call cut short by the stop is not answered OK
    shared = _Shared(hub, WorkerMetrics(count) if metrics_address else None)
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
            started = await _start_all(workers, shared, stopping)
        except Exception:  # a worker failed to start (RuntimeError), or could not be spawned (OSError)
            shared.announced.set()  # what the workers printed may say why
            await _stop(workers, grace)
            raise
        finally:
            reserved.close()
        if not started:  # told to stop during start-up: a stop like any other
            log.info("stopping %d workers during start-up", count)
            shared.announced.set()
            return 0 if await _stop(workers, grace) else 1
        await shared.hub.all_listen()  # before "listening on": from that line on, every worker is SERVING
        address = host_port(host, port)
        print(announcement(LISTENING + address, log_format, address=address), flush=True)
        if shared.metrics is not None and metrics_address is not None:
            http = _serve_metrics(shared.metrics, *metrics_address)
            url = f"http://{host_port(metrics_address[0], http[0].server_port)}/metrics"
            print(announcement(METRICS + url, log_format, url=url), flush=True)
        shared.announced.set()
        log.info("%d workers serving on %s", count, host_port(host, port))
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
    # The keepers first, so that none starts a worker from now on. One cancelled part-way through a restart
    # leaves that process on its worker, for _stop to signal with the others.
    for keeper in keepers:
        keeper.cancel()
    await asyncio.gather(*keepers, return_exceptions=True)
    return 0 if await _stop(workers, grace) else 1
