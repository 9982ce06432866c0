"""The audit trail: every event is one JSON line with the same keys; writing never raises or blocks.

Unit tests drive :class:`AuditLog` through its public methods and read the
lines it wrote; the last test runs a real server with ``--audit-log FILE``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from infergate.audit import AUDIT_LOGGER, AuditLog
from infergate.security.auth import Principal, reset_principal, use_principal
from tests.conftest import eventually, running_server

KEYS = {"time", "event", "model", "version", "principal", "source", "outcome", "reason", "detail"}
NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# (what the call site does, the line it must produce: only the keys that matter)
EVENTS: list[tuple[str, Callable[[AuditLog], None], dict[str, Any]]] = [
    ("load", lambda a: a.loaded("fraud", 2, source="poll"), {"event": "load", "version": "2", "source": "poll"}),
    (
        "failed load",
        lambda a: a.load_failed("fraud", 3, "sha256 mismatch", source="api"),
        {"event": "load_failed", "version": "3", "outcome": "failed", "reason": "sha256 mismatch"},
    ),
    ("unload", lambda a: a.unloaded("fraud", source="api"), {"event": "unload", "version": ""}),
    (
        "swapped in",
        lambda a: a.version_swapped_in("fraud", 2, source="startup"),
        {"event": "version_swapped_in", "source": "startup"},
    ),
    (
        "retired",
        lambda a: a.version_retired("fraud", 1, source="poll", reason="replaced by 2"),
        {"event": "version_retired", "version": "1", "reason": "replaced by 2"},
    ),
    (
        "routing applied",
        lambda a: a.routing_applied("fraud", {"weights": {1: 90, 2: 10}}, source="api"),
        {"event": "routing_applied", "detail": {"routing": {"weights": {"1": 90, "2": 10}}}},
    ),
    (
        "routing rejected",
        lambda a: a.routing_rejected("fraud", "routing.weights.7: version 7 is not loaded", source="poll"),
        {"event": "routing_rejected", "outcome": "rejected"},
    ),
    (
        "canary step",
        lambda a: a.canary_step("fraud", 2, 1, 25.0),
        {"event": "canary_step", "source": "runtime", "detail": {"step": 1, "weight": 25.0}},
    ),
    ("canary done", lambda a: a.canary_completed("fraud", 2, 50.0), {"event": "canary_completed"}),
    (
        "rollback",
        lambda a: a.canary_rolled_back("fraud", 2, "error rate 5% > 1%"),
        {"event": "canary_rollback", "outcome": "failed", "reason": "error rate 5% > 1%"},
    ),
    (
        "shadow pause",
        lambda a: a.shadow_paused("fraud", 3, 2.0, "10 consecutive errors"),
        {"event": "shadow_paused", "detail": {"seconds": 2.0}},
    ),
    (
        "drift in",
        lambda a: a.drift_alert_entered("fraud", 2, "psi 0.31 > 0.2", {"feature": "amount"}),
        {"event": "drift_alert_entered", "detail": {"feature": "amount"}},
    ),
    ("drift out", lambda a: a.drift_alert_left("fraud", 2), {"event": "drift_alert_left", "source": "runtime"}),
    (
        "admin call",
        lambda a: a.admin_call("RepositoryModelLoad", "PERMISSION_DENIED", model="fraud", principal="bob"),
        {"event": "admin", "outcome": "PERMISSION_DENIED", "principal": "bob", "source": "api"},
    ),
]


@pytest.mark.parametrize(("call", "expected"), [pytest.param(c, e, id=name) for name, c, e in EVENTS])
async def test_each_event_is_one_json_line_with_every_key(
    tmp_path: Path, call: Callable[[AuditLog], None], expected: dict[str, Any]
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, clock=lambda: NOON)
    audit.start()
    call(audit)
    await audit.aclose()
    [line] = _lines(path)
    assert set(line) == KEYS
    assert line["time"] == "2026-11-30T12:00:00.000+00:00"
    assert line["model"] in ("fraud", "")
    assert {key: line[key] for key in expected} == expected


async def test_the_principal_is_the_callers_subject_else_anonymous(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.start()
    audit.unloaded("fraud", source="api")
    token = use_principal(Principal("alice"))
    try:
        audit.unloaded("fraud", source="api")
    finally:
        reset_principal(token)
    await audit.aclose()
    assert [line["principal"] for line in _lines(path)] == ["anonymous", "alice"]


async def test_what_the_server_decides_while_serving_a_call_is_not_that_callers(tmp_path: Path) -> None:
    """A canary step is judged inside the request that completes its window: the server's decision."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.start()
    token = use_principal(Principal("alice"))
    try:
        audit.canary_step("fraud", 2, step=1, weight=0.2)
        audit.canary_rolled_back("fraud", 2, "error rate 0.5")
    finally:
        reset_principal(token)
    await audit.aclose()
    assert [(line["source"], line["principal"]) for line in _lines(path)] == [("runtime", "anonymous")] * 2


async def test_a_name_that_is_not_utf8_is_written_escaped_and_the_writer_goes_on(tmp_path: Path) -> None:
    """A model directory named with bytes that are not UTF-8 reaches Python as a lone surrogate."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.start()
    audit.load_failed(os.fsdecode(b"caf\xe9"), 1, "no model file", source="poll")
    audit.unloaded("next", source="api")
    await audit.aclose()
    first, second = _lines(path)
    assert first["event"] == "load_failed" and first["model"] == os.fsdecode(b"caf\xe9")  # escaped, read back
    assert second["model"] == "next"  # the writer outlived it


async def test_every_line_is_ascii_so_no_name_a_caller_sends_can_split_it(tmp_path: Path) -> None:
    """U+2028, U+2029 and U+0085 end a line for str.splitlines() and some log readers; a caller picks a
    model name that is written even when refused."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.start()
    name = "fraud\u2028{forged}\u2029\x85\u00e9"
    audit.load_failed(name, 1, "no such model", source="api")
    await audit.aclose()
    raw = path.read_bytes()
    assert raw.isascii() and len(raw.decode().splitlines()) == 1
    assert json.loads(raw)["model"] == name


async def test_lines_are_appended_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for model in ("a", "b"):
        audit = AuditLog(path)
        audit.start()
        audit.unloaded(model, source="api")
        await audit.aclose()
    assert [line["model"] for line in _lines(path)] == ["a", "b"]
    assert os.stat(path).st_mode & 0o777 == 0o640


async def test_a_line_left_unfinished_in_the_file_is_cut_before_the_next_one(tmp_path: Path) -> None:
    """A write cut short that could not be taken back (in another worker, say) leaves a line without its
    end: the next writer removes it rather than gluing its own line to it."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event": "load"}\n{"time": "2026-11-30T12:00:00.000+00:00", "eve')
    audit = AuditLog(path)
    audit.start()
    audit.unloaded("fraud", source="api")
    await audit.aclose()
    assert [line["event"] for line in _lines(path)] == ["load", "unload"]


async def test_without_a_file_events_go_to_the_audit_logger(caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog()
    audit.start()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        audit.loaded("fraud", 1, source="startup")
    await audit.aclose()
    [record] = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    assert json.loads(record.getMessage())["event"] == "load"


async def test_a_value_json_cannot_encode_still_gets_its_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.start()
    audit.drift_alert_entered("fraud", 1, "drift", {"window": object()})
    await audit.aclose()
    assert _lines(path)[0]["detail"]["window"].startswith("<object object")


async def test_a_failing_disk_is_logged_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(Path("/dev/full"))  # every write fails with ENOSPC
    audit.start()
    audit.unloaded("fraud", source="api")
    await audit.aclose()
    assert any("cannot write the audit log /dev/full" in r.getMessage() for r in caplog.records)


async def test_a_stuck_disk_drops_events_instead_of_blocking_the_caller(tmp_path: Path) -> None:
    """A FIFO nobody reads stands for a stuck disk: the writer blocks once the pipe is full."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open succeeds; never read until later
    audit = AuditLog(fifo, queue_size=4)
    audit.start()
    sent = 0
    while audit.dropped == 0 and sent < 100_000:  # the pipe holds 64 KiB; then the queue of 4 fills
        audit.load_failed("fraud", 1, "x" * 1000, source="poll")
        sent += 1
    assert audit.dropped > 0, "nothing was dropped: the caller must have waited for the writer"
    drained = threading.Event()

    def drain() -> None:
        with os.fdopen(os.dup(reader), "rb", buffering=0) as pipe:
            os.set_blocking(pipe.fileno(), True)
            while pipe.read(65536):
                pass
        drained.set()

    thread = threading.Thread(target=drain)
    thread.start()
    await audit.aclose()  # closes the writing end, so the reader sees end of file
    thread.join(60)
    os.close(reader)
    assert drained.is_set()


async def test_a_server_with_audit_log_records_its_start_and_stop(tmp_path: Path, log_dir: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    path = tmp_path / "audit.jsonl"
    with running_server(repository, log_dir, "--audit-log", str(path)) as server:
        await eventually(lambda: path.exists() and path.read_text(), "the server_started line")
        [started] = _lines(path)
        assert started["event"] == "server_started"
        assert started["detail"]["address"] == f"127.0.0.1:{server.port}"
    assert [line["event"] for line in _lines(path)] == ["server_started", "server_stopped"]
