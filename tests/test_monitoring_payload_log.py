"""Payload logging: what a record holds (and never holds), redaction, salted hashes, size limits, rotation,
and the bounded hand-off. Real files and the real writer thread; the records come through ``offer`` as the
inference handler calls it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import multiprocessing
import os
import random
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import eventually
from monitoring_support import spec, tensor

from infergate.configfile import ConfigError
from infergate.monitoring.accumulator import Sampler
from infergate.monitoring.config import PayloadLogConfig
from infergate.monitoring.payload_log import REDACTED, TOO_LARGE, PayloadLog, open_payload_log

MODEL = spec(
    tensor("amount", "FP32", -1, 1),
    tensor("user", "BYTES", -1, 1),
    tensor("ssn", "BYTES", -1, 1),
    outputs=(tensor("score", "FP32", -1, 1),),
)
SALT = "a-long-random-test-salt"
DATATYPE_OF = {np.float32: "FP32", np.float64: "FP64", np.int64: "INT64"}
GUARD_S = 120.0  # a hang guard for a busy machine, not a duration under test


@pytest.fixture(autouse=True)
def salt(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("INFERGATE_PAYLOAD_SALT", SALT)
    yield


def config(path: Path, **fields: object) -> PayloadLogConfig:
    return PayloadLogConfig.model_validate({"path": str(path), "sample_fraction": 1.0} | fields)


@pytest.fixture
async def payloads(tmp_path: Path) -> AsyncIterator[PayloadLog]:
    log = open_payload_log(config(tmp_path / "p.jsonl", redact=["ssn"], hash=["user"]), MODEL, Path("config.yaml"))
    log.start()
    try:
        yield log
    finally:
        await log.aclose()


def request(amount: float = 12.5, user: str = "alice") -> dict[str, np.ndarray]:
    return {
        "amount": np.array([[amount]], np.float32),
        "user": np.array([[user]], dtype=object),
        "ssn": np.array([["123-45-6789"]], dtype=object),
    }


def file_sizes(folder: Path, at_most: int = 1024) -> dict[str, int]:
    """Each file's name and ``at_most`` when its size is within it (else its size, so a failure shows it)."""
    return {p.name: at_most if p.stat().st_size <= at_most else p.stat().st_size for p in folder.iterdir()}


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_record_holds_exactly_the_documented_fields(payloads: PayloadLog) -> None:
    payloads.offer(request(), {"score": np.array([[0.25]], np.float32)}, request_id="r1", route="split", trace_id="ab")
    await eventually(lambda: payloads.writer.written == 1, "the record written")
    (record,) = records(payloads.writer.path)
    assert set(record) == {"time", "model", "version", "id", "trace_id", "route", "inputs", "outputs"}
    assert (record["model"], record["version"], record["id"], record["route"]) == ("m", "1", "r1", "split")
    assert record["trace_id"] == "ab"
    assert record["outputs"] == {"score": [[0.25]]}


async def test_redacted_inputs_are_never_written_and_hashed_ones_are_salted_hmacs(payloads: PayloadLog) -> None:
    payloads.offer(request(), {})
    await eventually(lambda: payloads.writer.written == 1, "the record written")
    text = payloads.writer.path.read_text()
    assert "123-45-6789" not in text and "alice" not in text
    inputs = records(payloads.writer.path)[0]["inputs"]
    assert isinstance(inputs, dict)
    assert inputs["ssn"] == REDACTED
    assert inputs["user"] == [[hmac.new(SALT.encode(), b"alice", hashlib.sha256).hexdigest()]]
    assert inputs["amount"] == [[12.5]]


async def test_outputs_named_in_redact_or_hash_are_redacted_or_hashed_like_inputs(tmp_path: Path) -> None:
    """An output can echo an input (a text model answering with its input): naming it is the only way to keep
    the value out of the file. A name that is both an input and an output applies to both."""
    path = tmp_path / "p.jsonl"
    model = spec(
        tensor("text", "BYTES", -1, 1),
        tensor("ssn", "BYTES", -1, 1),
        outputs=(tensor("text", "BYTES", -1, 1), tensor("echo", "BYTES", -1, 1), tensor("score", "FP32", -1, 1)),
    )
    log = open_payload_log(config(path, redact=["echo"], hash=["text"]), model, Path("c.yaml"))
    log.start()
    inputs = {"text": np.array([[b"alice"]], dtype=object), "ssn": np.array([[b"123-45-6789"]], dtype=object)}
    outputs = {
        "text": np.array([[b"alice"]], dtype=object),
        "echo": np.array([[b"123-45-6789"]], dtype=object),
        "score": np.array([[0.5]], np.float32),
    }
    log.offer(inputs, outputs)
    await log.aclose()  # writes what is queued
    (record,) = records(path)
    alice = hmac.new(SALT.encode(), b"alice", hashlib.sha256).hexdigest()
    assert record["inputs"] == {"text": [[alice]], "ssn": [["123-45-6789"]]}
    assert record["outputs"] == {"text": [[alice]], "echo": REDACTED, "score": [[0.5]]}


@pytest.mark.parametrize(
    ("value", "text"),
    [(np.float32(0.1), "0.1"), (np.float32(42), "42.0"), (np.int64(42), "42"), (np.float64(1e-7), "1e-07")],
)
async def test_a_hashed_number_is_the_hmac_of_its_shortest_text_in_its_datatype(
    tmp_path: Path, value: np.generic, text: str
) -> None:
    """What docs/privacy.md tells an operator to compute to find a person's records."""
    path = tmp_path / "p.jsonl"
    model = spec(tensor("account", str(DATATYPE_OF[type(value)]), -1, 1))
    log = open_payload_log(config(path, hash=["account"]), model, Path("c.yaml"))
    log.start()
    log.offer({"account": np.array([[value]])}, {})
    await eventually(lambda: log.writer.written == 1, "the record written")
    await log.aclose()
    [record] = records(path)
    assert record["inputs"] == {"account": [[hmac.new(SALT.encode(), text.encode(), hashlib.sha256).hexdigest()]]}


async def test_the_file_is_readable_by_the_server_user_only(payloads: PayloadLog) -> None:
    assert stat.S_IMODE(payloads.writer.path.stat().st_mode) == 0o600


async def test_non_finite_numbers_are_written_as_strings_so_every_line_is_json(payloads: PayloadLog) -> None:
    payloads.offer(request(amount=float("nan")), {"score": np.array([[np.inf, -np.inf]], np.float32)})
    await eventually(lambda: payloads.writer.written == 1, "the record written")
    record = records(payloads.writer.path)[0]
    assert record["outputs"] == {"score": [["inf", "-inf"]]}


async def test_scalar_tensors_are_written_hashed_and_as_text_like_any_other(payloads: PayloadLog) -> None:
    inputs = {"amount": np.array(2.5, np.float32), "user": np.array(b"alice", dtype=object), "ssn": np.array(b"x")}
    outputs = {"label": np.array("spam", dtype=object), "score": np.array(np.nan, np.float32)}
    payloads.offer(inputs, outputs)
    await payloads.aclose()  # writes what is queued
    (record,) = records(payloads.writer.path)
    user = hmac.new(SALT.encode(), b"alice", hashlib.sha256).hexdigest()
    assert record["inputs"] == {"amount": 2.5, "user": user, "ssn": REDACTED}
    assert record["outputs"] == {"label": "spam", "score": "nan"}


async def test_a_record_that_cannot_be_written_is_dropped_alone_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "p.jsonl"
    log = open_payload_log(config(path), MODEL, Path("c.yaml"))
    log.offer(request(), {}, request_id="before")
    log.offer(request(), {"z": np.array([1j])}, request_id="bad")  # JSON has no complex numbers
    log.offer(request(), {}, request_id="after")
    log.start()  # all three reach the writer in one batch
    await log.aclose()
    assert [r["id"] for r in records(path)] == ["before", "after"]
    assert (log.writer.written, log.writer.failed) == (2, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model m version 1 request bad" in message for message in warnings), warnings


async def test_a_record_over_the_size_limit_keeps_its_fields_but_not_its_values(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    log = open_payload_log(config(path, redact=["ssn", "score"], max_bytes_per_record=400), MODEL, Path("c.yaml"))
    log.start()
    try:
        log.offer(request(user="x" * 1000), {"score": np.array([[0.5]], np.float32)}, request_id="big")
        log.offer(request(), {}, request_id="small")
        await eventually(lambda: log.writer.written == 2, "both records written")
    finally:
        await log.aclose()
    big, small = records(path)
    assert big["truncated"] is True and big["id"] == "big"
    assert big["inputs"] == {"amount": TOO_LARGE, "user": TOO_LARGE, "ssn": REDACTED}
    assert big["outputs"] == {"score": REDACTED}
    assert "truncated" not in small
    assert all(len(line.encode()) <= 400 for line in path.read_text().splitlines())


async def test_the_file_rotates_by_size_keeping_the_configured_backups(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    log = open_payload_log(config(path, max_file_bytes=1024, backups=2), MODEL, Path("c.yaml"))
    log.start()
    try:
        for i in range(40):
            log.offer(request(), {}, request_id=f"r{i}")
        await eventually(lambda: log.writer.written == 40, "every record written")
    finally:
        await log.aclose()
    assert file_sizes(tmp_path) == {"p.jsonl": 1024, "p.jsonl.1": 1024, "p.jsonl.2": 1024}
    ids = [r["id"] for name in ("p.jsonl.2", "p.jsonl.1", "p.jsonl") for r in records(tmp_path / name)]
    assert ids == [f"r{i}" for i in range(40 - len(ids), 40)]  # the newest, in order; the oldest rotated out


async def test_a_record_larger_than_a_file_is_cut_to_fit_one(tmp_path: Path) -> None:
    """max_file_bytes bounds every file, whatever max_bytes_per_record says (64 KiB by default)."""
    path = tmp_path / "p.jsonl"
    log = open_payload_log(config(path, max_file_bytes=1024, backups=1), MODEL, Path("c.yaml"))
    log.start()
    try:
        wide = request() | {"amount": np.arange(800, dtype=np.float32).reshape(1, 800)}
        for i in range(10):
            log.offer(wide, {}, request_id=f"r{i}")
        await eventually(lambda: log.writer.written == 10, "every record written")
    finally:
        await log.aclose()
    assert file_sizes(tmp_path) == {"p.jsonl": 1024, "p.jsonl.1": 1024}
    assert all(r.get("truncated") for r in records(path))


def write_from_another_process(path: str, first: int, count: int, together: Any) -> None:
    """A worker of --workers N: its own writer of the shared file (run in a process of its own); ``together``
    (a barrier) starts both writing at once."""

    async def write() -> None:
        log = open_payload_log(config(Path(path), max_file_bytes=2048, backups=1000), MODEL, Path("c.yaml"))
        log.start()
        together.wait(GUARD_S)
        for i in range(first, first + count):
            log.offer(request(), {}, request_id=f"r{i}")
            await asyncio.sleep(0)  # let the writer thread take records as they come, as a server's does
        await log.aclose()

    os.environ["INFERGATE_PAYLOAD_SALT"] = SALT
    asyncio.run(write())


def test_processes_writing_one_file_keep_every_file_within_max_file_bytes(tmp_path: Path) -> None:
    """Each worker of --workers N has its own writer of the same path: rotation counts the file's real size.
    Enough backups to keep every record: none may be lost, nor any file grow past the bound."""
    spawn = multiprocessing.get_context("spawn")
    path = tmp_path / "p.jsonl"
    together = spawn.Barrier(2)
    workers = [
        spawn.Process(target=write_from_another_process, args=(str(path), i * 10_000, 1000, together)) for i in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(GUARD_S)
        assert worker.exitcode == 0
    sizes = file_sizes(tmp_path, at_most=2048)
    assert set(sizes.values()) == {2048}, {name: size for name, size in sizes.items() if size != 2048}
    ids = sorted(str(r["id"]) for name in sizes for r in records(tmp_path / name))  # every line whole JSON
    assert ids == sorted(f"r{first + i}" for first in (0, 10_000) for i in range(1000))


async def test_requests_are_sampled_with_the_injected_rng(tmp_path: Path) -> None:
    log = open_payload_log(config(tmp_path / "p.jsonl", sample_fraction=0.01), MODEL, Path("c.yaml"))
    log._sampler = Sampler(0.01, random.Random(5))  # the sampler open_payload_log made, with a seeded rng
    draws = random.Random(5)
    for _ in range(2000):
        log.offer(request(), {})
    assert (log.requests, log.sampled) == (2000, sum(draws.random() < 0.01 for _ in range(2000)))
    await log.aclose()


async def test_a_full_writer_queue_drops_and_counts(tmp_path: Path) -> None:
    log = open_payload_log(config(tmp_path / "p.jsonl", queue_size=3), MODEL, Path("c.yaml"))
    for _ in range(10):  # not started: nothing leaves the queue
        log.offer(request(), {})
    assert (log.sampled, log.dropped) == (10, 7)
    log.start()
    await log.aclose()  # what was queued is written before the file closes
    assert len(records(tmp_path / "p.jsonl")) == 3


async def test_versions_naming_one_path_share_one_writer_until_the_last_leaves(tmp_path: Path) -> None:
    first = open_payload_log(config(tmp_path / "p.jsonl"), MODEL, Path("c.yaml"))
    second = open_payload_log(config(tmp_path / "p.jsonl"), MODEL, Path("c.yaml"))
    assert first.writer is second.writer
    first.start()
    second.start()
    await first.aclose()
    second.offer(request(), {}, request_id="after")
    await eventually(lambda: second.writer.written == 1, "the second version still writes")
    await second.aclose()
    assert "payload-log p.jsonl" not in {t.name for t in threading.enumerate()}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"redact": ["nope"]},
            r"c\.yaml: monitoring\.payload_log\.redact: model m has no input or output named \['nope'\] "
            r"\(inputs: amount, user, ssn; outputs: score\)",
        ),
        ({"hash": ["user", "nope"]}, r"payload_log\.hash: model m has no input or output named \['nope'\]"),
        ({"hash": ["user"], "salt_env": "UNSET_SALT"}, r"payload_log\.hash: hashing needs a salt: set .* UNSET_SALT"),
        ({"path": "/nonexistent-dir/p.jsonl"}, r"payload_log\.path: cannot open /nonexistent-dir/p\.jsonl"),
    ],
)
def test_a_payload_log_that_cannot_work_is_refused_at_load(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        open_payload_log(PayloadLogConfig.model_validate({"path": str(tmp_path / "p")} | fields), MODEL, Path("c.yaml"))


def test_a_tensor_cannot_be_both_redacted_and_hashed() -> None:
    with pytest.raises(ValueError, match=r"tensors \['user'\] are listed in both redact and hash"):
        PayloadLogConfig(path="p", redact=["user"], hash=["user"])
