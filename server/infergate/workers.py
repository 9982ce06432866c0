"""``--workers N``: N server processes sharing one port, supervised.

Each worker is an ordinary ``infergate serve`` process with its own event
loop, batchers and sessions; the kernel spreads connections over them
(SO_REUSEPORT, Linux). The supervisor reserves the port first (so ``--port 0``
works), starts the workers, restarts one that dies, and on SIGTERM or Ctrl-C
forwards SIGTERM to all of them and exits 0 once every worker drained and
exited 0.

Note that a gRPC client keeps one connection, so one client lands on one
worker; spread calls over several channels (or clients) to use them all.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Literal

from infergate.telemetry.logs import LISTENING, announcement, listening_address

__all__ = ["supervise"]

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 10.0  # seconds between restarts of a worker that keeps dying


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    backoff: float = field(default=0.5)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so the port is ours and known; workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, port))
    return reserved


async def _start(worker: _Worker, command: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    line = (await process.stdout.readline()).decode()
    if listening_address(line) is None:
        await process.wait()
        raise RuntimeError(f"worker {worker.index} failed to start (exit {process.returncode})")
    worker.process = process
    log.info("worker %d started (pid %d)", worker.index, process.pid)


async def _keep_alive(worker: _Worker, command: list[str], stopping: asyncio.Event) -> None:
    """Restart the worker whenever it exits, until the supervisor is stopping."""
    while True:
        assert worker.process is not None
        code = await worker.process.wait()
        if stopping.is_set():
            return
        log.error("worker %d (pid %d) exited with %s; restarting", worker.index, worker.process.pid, code)
        await asyncio.sleep(worker.backoff)  # a crash loop must not spin
        worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF_MAX)
        try:
            await _start(worker, command)
        except RuntimeError as exc:
            log.error("%s", exc)
            continue
        log.info("worker %d restarted (pid %d)", worker.index, worker.process.pid)


async def _stop(workers: list[_Worker], grace: float) -> bool:
    """SIGTERM every worker, wait for the drain; True if all exited 0."""
    live = [w.process for w in workers if w.process is not None and w.process.returncode is None]
    for process in live:
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace + 10):
            await asyncio.gather(*(p.wait() for p in live))
    except TimeoutError:
        for process in live:
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*(p.wait() for p in live))
        return False
    return all(w.process is not None and w.process.returncode == 0 for w in workers)


async def supervise(
    host: str,
    port: int,
    count: int,
    worker_args: list[str],
    grace: float,
    log_format: Literal["text", "json"] = "text",
) -> int:
    """Run ``count`` workers of ``infergate serve <worker_args>`` on one port until signalled."""
    reserved = _reserve_port(host, port)
    port = reserved.getsockname()[1]
    command = [sys.executable, "-m", "infergate", "serve", *worker_args, "--port", str(port), "--reuse-port"]
    workers = [_Worker(i) for i in range(count)]
    try:
        await asyncio.gather(*(_start(w, command) for w in workers))
    except RuntimeError:
        await _stop(workers, grace)
        raise
    finally:
        reserved.close()
    address = f"{host}:{port}"
    print(announcement(LISTENING + address, log_format, address=address), flush=True)
    log.info("%d workers serving on %s:%d", count, host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    keepers = [asyncio.create_task(_keep_alive(w, command, stopping)) for w in workers]
    await stopping.wait()
    log.info("stopping %d workers", count)
    clean = await _stop(workers, grace)
    for keeper in keepers:
        keeper.cancel()
    await asyncio.gather(*keepers, return_exceptions=True)
    return 0 if clean else 1
