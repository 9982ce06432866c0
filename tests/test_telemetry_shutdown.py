"""A collector that never answers cannot hold up a stop: telemetry gets its flush budget, no more.

The "collector" is a socket on 127.0.0.1 that accepts connections and never
answers. The server sends spans and metrics to it with the real OTLP exporters,
each export allowed ten minutes (OTEL_EXPORTER_OTLP_TIMEOUT=600), so a stop that
waited for them would outlast every guard here. At SIGTERM the server gives its
last flush a fixed budget, logs what it dropped, and goes on: the audit trail
still ends with ``server_stopped`` and the process exits 0. The same holds for
each worker of ``--workers N``, whose supervisor would otherwise SIGKILL it.
One test calls ``run_within`` directly. (A collector that answers still gets every
span: tests/test_telemetry_export.py.)
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import launch_server

from infergate.telemetry import logs
from infergate.telemetry.flush import FLUSH_BUDGET_SECONDS, run_within
from infergate.workers import supervisor

CHART_EXIT_MARGIN_S = 15  # helm/infergate/templates/_helpers.tpl: terminationGracePeriodSeconds adds it

HANG_GUARD_S = 60.0  # did the stop finish at all; the exporters alone would wait 600 s


class SilentCollector:
    """Accepts every connection on 127.0.0.1 and never reads or writes a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="silent collector", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            connection, _ = self._listener.accept()
            if self._closing:
                connection.close()
                return
            self._held.append(connection)  # open, unanswered

    def close(self) -> None:
        self._closing = True
        socket.create_connection(("127.0.0.1", self.port)).close()  # wakes the accept above
        self._thread.join()
        for connection in self._held:
            connection.close()
        self._listener.close()


@pytest.fixture
def collector() -> Iterator[SilentCollector]:
    silent = SilentCollector()
    try:
        yield silent
    finally:
        silent.close()


def _env(collector: SilentCollector) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "600",  # seconds per export: a stop that waits for it takes ten minutes
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
    }


def _infer(url: str, calls: int) -> None:
    client = grpcclient.InferenceServerClient(url)
    try:
        for _ in range(calls):
            x = grpcclient.InferInput("x", [1, 16], "FP32")
            x.set_data_from_numpy(np.full((1, 16), 0.25, np.float32))
            client.infer("matmul16", [x])
    finally:
        client.close()


def _dropped(log: str, collector: SilentCollector) -> list[str]:
    """The signals each shutdown warning names as dropped, one entry per warning."""
    pattern = (
        r"telemetry: (\w+(?: and \w+)?) not exported within [0-9.]+ s of shutdown "
        rf"\(is the collector at {re.escape(collector.url)} up\?\); dropped"
    )
    return re.findall(pattern, log)


def _stopped_events(audit: Path) -> list[str]:
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    return [e for e in events if e == "server_stopped"]


def test_a_collector_that_never_answers_costs_the_stop_its_flush_budget_and_the_audit_trail_still_ends(
    collector: SilentCollector, demo_repository: Path, log_dir: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    server = launch_server(demo_repository, log_dir, "--traces", "--audit-log", str(audit), env=_env(collector))
    try:
        _infer(server.url, 3)  # spans and metrics queued for the collector
    finally:
        code = server.terminate(timeout=HANG_GUARD_S)
    log = server.log()
    assert code == 0, log
    # The spans never come back (the SDK's span shutdown takes no timeout); the metrics' shutdown is given the
    # same 5 s and ends at about the budget's end, late or just in time as the machine's load has it.
    assert _dropped(log, collector) in (["spans"], ["spans and metrics"]), log
    assert _stopped_events(audit) == ["server_stopped"]
    assert json.loads(audit.read_text().splitlines()[-1])["event"] == "server_stopped"


def test_each_worker_gives_its_flush_the_same_budget_and_the_supervisor_never_kills_one(
    collector: SilentCollector, demo_repository: Path, log_dir: Path, tmp_path: Path
) -> None:
    """The supervisor SIGKILLs a worker still running 10 s after the grace (workers/supervisor.py): a
    worker that waited for the collector would be killed, losing its last audit lines, and the exit be 1."""
    audit = tmp_path / "audit.jsonl"
    args = ("--workers", "2", "--traces", "--audit-log", str(audit))
    server = launch_server(demo_repository, log_dir, *args, env=_env(collector))
    try:
        _infer(server.url, 3)
    finally:
        code = server.terminate(timeout=HANG_GUARD_S)
    log = server.log()
    assert code == 0, log
    # The worker that served the calls has spans, which never come back: its warning is certain. A worker
    # with metrics alone has them given the same 5 s, which end late or just in time as the machine's load
    # has it (a CI run saw one worker's metrics end in time).
    dropped = _dropped(log, collector)
    assert 1 <= len(dropped) <= 2 and any(d.startswith("spans") for d in dropped), log
    assert _stopped_events(audit) == ["server_stopped", "server_stopped"]


def test_the_flush_gives_up_on_a_job_still_running_and_a_job_that_raised_is_done_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = threading.Event()
    try:
        assert run_within({"spans": held.wait}, 0.0) == ["spans"]  # left running: nothing waits for it
    finally:
        held.set()

    def fails() -> None:
        raise RuntimeError("a reader failed")

    with caplog.at_level(logging.WARNING, logger="infergate.telemetry"):
        assert run_within({"metrics": fails, "spans": lambda: None}, HANG_GUARD_S) == []
    assert "telemetry: flushing metrics failed: a reader failed" in caplog.messages


def test_the_stop_budgets_after_the_grace_fit_in_what_the_supervisor_and_the_chart_allow() -> None:
    """A collector that is down and a log output that has stalled on the same day: a worker spends the
    flush budget, then the log stop's, and must still exit before its supervisor's margin runs out (it
    would be SIGKILLed: exit 1); the supervisor's own log stop comes on top of that margin, within the
    15 s the chart adds to terminationGracePeriodSeconds. 2 s are kept for the rest of the exit."""
    worker = FLUSH_BUDGET_SECONDS + logs.WRITER_STOP_SECONDS
    assert worker + 2 <= supervisor.EXIT_MARGIN_S
    assert supervisor.EXIT_MARGIN_S + logs.WRITER_STOP_SECONDS + 2 <= CHART_EXIT_MARGIN_S
