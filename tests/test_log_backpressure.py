"""A log output that does not keep up never holds the server up.

In a container stderr is a pipe read by the runtime's log pipeline; when that
reader stalls, the pipe fills. infergate writes its log lines on a thread of
their own, from a bounded queue: calls keep being answered, lines that do not
fit are dropped and counted, and once the output catches up one line says how
many. Nothing logged before a clean stop is lost.

A real server with its access log on (one line per call), whose stderr is a
pipe this test stops reading once the server is up; and the same logging in
this process, on an output held still, where what is dropped can be counted.
"""

from __future__ import annotations

import io
import logging
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import wait_until

from infergate.telemetry.logs import QUEUED_LINES, configure_logging, listening_address

# Access lines (~150 bytes each) several times over what the pipe (64 KiB) and the queue hold together.
CALLS = 4 * QUEUED_LINES
DEADLINE_S = 10.0  # per call: a server frozen on its log fails the test instead of hanging it
HANG_GUARD_S = 60.0  # how long the stop may take before the test calls it a hang; not a performance bound
DROPPED = re.compile(r"infergate\.logs: (\d+) log line\(s\) dropped: the log output did not keep up")
ACCESS = "infergate.access: ModelInfer model=matmul16"


@pytest.fixture
def unread_server(demo_repository: Path) -> Iterator[subprocess.Popen[str]]:
    """A server whose stderr is a pipe nobody reads until the test does; it is always stopped."""
    process = subprocess.Popen(
        [sys.executable, "-m", "infergate", "serve", "--model-repository", str(demo_repository), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_a_stalled_log_reader_costs_lines_never_answers(unread_server: subprocess.Popen[str]) -> None:
    assert unread_server.stdout is not None and unread_server.stderr is not None
    address = listening_address(unread_server.stdout.readline())  # stdout: the stderr pipe stays unread
    assert address is not None, "the server did not start"
    client = grpcclient.InferenceServerClient(address)
    try:
        wait_until(lambda: client.is_model_ready("matmul16", client_timeout=DEADLINE_S), "matmul16 ready")
        client.update_log_settings({"log_verbose_level": 1}, client_timeout=DEADLINE_S)  # one line per call
        x = grpcclient.InferInput("x", [1, 16], "FP32")
        x.set_data_from_numpy(np.ones((1, 16), np.float32))
        for _ in range(CALLS):
            assert client.infer("matmul16", [x], client_timeout=DEADLINE_S).as_numpy("y") is not None
        assert client.is_server_live(client_timeout=DEADLINE_S)  # a health check, still unread
    finally:
        client.close()

    unread_server.send_signal(signal.SIGTERM)
    _, err = unread_server.communicate(timeout=HANG_GUARD_S)  # reading again: the output catches up
    assert unread_server.returncode == 0, err[-2000:]
    notices = [int(match[1]) for match in DROPPED.finditer(err)]
    assert notices and all(count > 0 for count in notices), err[-2000:]
    written = err.count(ACCESS)
    assert 0 < written < CALLS and written + sum(notices) >= CALLS, (written, notices)
    # The last lines logged before the exit are all written: the audit trail's stop, then the server's.
    stopped = err.rfind("infergate.server: stopped")
    assert 0 < err.rfind('"event": "server_stopped"') < stopped, err[-2000:]


class HeldOutput(io.StringIO):
    """An output whose writes wait until :attr:`moving` is set, as a pipe whose reader stalled."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()  # a write is waiting
        self.moving = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.moving.wait(HANG_GUARD_S), "the output was never let go"
        return super().write(text)


def test_past_the_queue_lines_are_dropped_and_counted_and_the_rest_written_at_the_stop() -> None:
    output = HeldOutput()
    logs = configure_logging("info", "text", output)
    log = logging.getLogger("infergate.test")
    log.info("first")
    assert output.writing.wait(HANG_GUARD_S)  # the writer thread holds "first": the queue is empty
    for n in range(QUEUED_LINES + 10):
        log.info("line %d", n)  # returns at once, written or not
    output.moving.set()
    logs.close()

    lines = output.getvalue().splitlines()
    notices = [line for line in lines if DROPPED.search(line)]
    assert len(notices) == 1 and "WARNING infergate.logs: 10 log line(s) dropped" in notices[0], notices
    written = [line.rsplit(": ", 1)[1] for line in lines if "INFO infergate.test: " in line]
    assert written == ["first", *(f"line {n}" for n in range(QUEUED_LINES))]  # the last ten did not fit
