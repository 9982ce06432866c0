"""Payload logging: a sample of requests and their responses, appended as JSON lines, off the request path.

Off unless a model's config has ``monitoring.payload_log``. :meth:`PayloadLog.offer`
(on the event loop, after the answer is ready) samples, and queues copies of the
inputs (``kept_inputs``: they may be views of shared memory) and the outputs
with the request's id, trace id and route; everything else — redaction,
hashing, JSON, the write — happens on the file's writer thread.

One record per line::

    {"time": "2026-11-30T10:00:00.123+00:00", "model": "fraud", "version": "2", "id": "req-17",
     "trace_id": "0af7...", "route": "split", "inputs": {"amount": [[12.5]], "user_id": [["9f86d0..."]],
     "ssn": "<redacted>"}, "outputs": {"score": [[0.03]]}}

* inputs and outputs listed in ``redact`` are replaced by ``"<redacted>"``;
* inputs and outputs listed in ``hash`` become, element by element, the hex HMAC-SHA256
  of the element's text keyed with the salt from ``salt_env`` (the same value always
  gives the same hash, so records can be joined without the value itself);
* a name is a tensor's, input or output: one that is both applies to both (an output
  that echoes an input is only kept out of the file when it is named too);
* a record whose JSON would exceed ``max_bytes_per_record`` (or ``max_file_bytes``,
  when smaller) keeps its fields but
  its tensors become ``"<omitted: record too large>"`` and it gets ``"truncated": true``;
* request metadata (the ``authorization`` header included) and parameters are
  never written: the record has exactly the fields above.

The file is created with mode 0600. Past ``max_file_bytes`` it is rotated
(PATH -> PATH.1 -> ... -> PATH.<backups>, the oldest deleted); a record longer
than ``max_file_bytes`` is dropped (counted with ``failed``), so no file grows
past it. One writer (one thread, one open file) serves every model version
that names the same path in a process. Processes share the file too (the
workers of ``--workers N`` name the same path): each batch of records is
written, and the file rotated, holding an exclusive ``flock`` on the file's
directory, sizes are read from the file itself, and a writer whose file another
process rotated away reopens PATH, so no file passes ``max_file_bytes``
whoever wrote it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from infergate.configfile import ConfigError
from infergate.models.spec import ModelSpec
from infergate.monitoring.accumulator import QUEUE_BYTES, Accumulator, Sampler, kept_inputs, tensor_bytes
from infergate.monitoring.config import PayloadLogConfig

__all__ = ["REDACTED", "TOO_LARGE", "PayloadLog", "PayloadRecord", "PayloadWriter", "format_record", "open_payload_log"]

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
TOO_LARGE = "<omitted: record too large>"
Tensors = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Policy:
    """What a model's records may contain: redacted and hashed tensors (inputs and outputs), the salt, the size
    limit."""

    redact: frozenset[str]
    hash: frozenset[str]
    salt: bytes
    max_bytes: int


@dataclass(frozen=True, slots=True)
class PayloadRecord:
    """One sampled request, as queued by ``offer``: references only, formatted on the writer thread."""

    time: float
    model: str
    version: int
    request_id: str
    trace_id: str
    route: str
    inputs: Tensors
    outputs: Tensors
    policy: Policy


def format_record(record: PayloadRecord) -> str:
    """The record's JSON line (with its newline), redacted, hashed and size-limited per its policy."""
    policy = record.policy
    entry: dict[str, Any] = {
        "time": datetime.fromtimestamp(record.time, UTC).isoformat(timespec="milliseconds"),
        "model": record.model,
        "version": str(record.version),
        "id": record.request_id,
        "trace_id": record.trace_id,
        "route": record.route,
    }
    # Counting elements first spares serialising a tensor that could never fit (two bytes each at least).
    elements = sum(a.size for a in (*record.inputs.values(), *record.outputs.values()))
    if elements * 2 <= policy.max_bytes:
        entry["inputs"] = {name: _value(name, array, policy) for name, array in record.inputs.items()}
        entry["outputs"] = {name: _value(name, array, policy) for name, array in record.outputs.items()}
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        if len(line.encode("utf-8")) <= policy.max_bytes:
            return line + "\n"
    entry["inputs"] = {name: REDACTED if name in policy.redact else TOO_LARGE for name in record.inputs}
    entry["outputs"] = {name: REDACTED if name in policy.redact else TOO_LARGE for name in record.outputs}
    entry["truncated"] = True
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"


def _value(name: str, array: npt.NDArray[Any], policy: Policy) -> Any:
    """A tensor as written: redacted, hashed or as it is, by its name (inputs and outputs alike)."""
    if name in policy.redact:
        return REDACTED
    if name in policy.hash:
        return _hashed(array, policy.salt)
    return _values(array)


def _values(array: npt.NDArray[Any]) -> Any:
    """Nested lists; text as text, and NaN or infinities as the strings "nan", "inf", "-inf" (JSON has none)."""
    if array.dtype == object:
        return _each(_text, array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        out = array.astype(object)
        mask = ~np.isfinite(array)
        out[mask] = [str(float(v)) for v in array[mask]]
        return out.tolist()
    return array.tolist()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _hashed(array: npt.NDArray[Any], salt: bytes) -> Any:
    """Each element's keyed SHA-256 (HMAC) as hex, in the tensor's shape."""

    def one(value: Any) -> str:
        if isinstance(value, bytes):
            data = value
        elif isinstance(value, bool | np.bool_):
            data = b"true" if value else b"false"
        else:
            data = str(value).encode("utf-8")
        return hmac.new(salt, data, hashlib.sha256).hexdigest()

    if array.dtype.kind in "iuf":
        # Numbers as the shortest text of their own datatype ("0.1" for an FP32 0.1, not the "0.10000000149011612"
        # of its float64 value): the text a caller would compute the HMAC of to find a record (docs/privacy.md).
        return _each(one, array.astype(str).astype(object))
    return _each(one, array.astype(object))


def _each(function: Callable[[Any], str], array: npt.NDArray[Any]) -> Any:
    """``function`` of every element, as nested lists in the array's shape (a 0-d array: one value)."""
    if array.size == 0:
        return array.tolist()
    # frompyfunc gives a plain value, not an array, for a 0-d input
    mapped = np.asarray(np.frompyfunc(function, 1, 1)(array), dtype=object)
    return mapped.tolist()


class PayloadWriter:
    """One file and the thread that appends to it, rotating by size."""

    def __init__(self, path: Path, max_file_bytes: int, backups: int, capacity: int):
        self.path = path
        self.max_file_bytes = max_file_bytes
        self.backups = backups
        self.written = 0
        self.failed = 0  # records dropped because they could not be formatted
        self.rotations = 0
        self._file = _open(path)  # here, at load: a path that cannot be written fails the load
        # Another process may write the same file (--workers): an exclusive flock on the directory orders
        # the writes and rotations of every writer of it (a lock on the file itself would not survive its
        # rotation, and a lock file of its own would sit among the logs).
        self._directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._accumulator: Accumulator[PayloadRecord] = Accumulator(
            f"payload-log {path.name}", self._write, capacity=capacity, max_bytes=QUEUE_BYTES
        )
        self.users = 0  # PayloadLogs sharing this writer (see _Writers)

    def offer(self, record: PayloadRecord, size: int) -> bool:
        """Queue ``record`` (whose tensors hold ``size`` bytes); False when the queue is full."""
        return self._accumulator.offer(record, size)

    def start(self) -> None:
        self._accumulator.start()

    async def aclose(self) -> None:
        """Write what is queued, then close the file."""
        await self._accumulator.aclose()
        self._file.close()
        os.close(self._directory)

    def _write(self, records: list[PayloadRecord]) -> None:
        lines = [data for data in map(self._format, records) if data is not None]
        if not lines:
            return
        fcntl.flock(self._directory, fcntl.LOCK_EX)
        try:
            self._follow()
            size = os.fstat(self._file.fileno()).st_size  # the file's, whoever wrote it
            for data in lines:
                if len(data) > self.max_file_bytes:
                    self._dropped_as_too_long(len(data))
                    continue
                if size and size + len(data) > self.max_file_bytes:
                    self._rotate()
                    size = 0
                self._file.write(data)
                size += len(data)
                self.written += 1
            self._file.flush()  # before another writer may look at the file's size
        finally:
            fcntl.flock(self._directory, fcntl.LOCK_UN)

    def _follow(self) -> None:
        """Reopen PATH when another process rotated the file this writer has open (or removed it)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(self._file.fileno())
        if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
            self._file.close()
            self._file = _open(self.path)

    def _dropped_as_too_long(self, length: int) -> None:
        self.failed += 1
        log.warning("payload log %s: a record of %d bytes dropped: longer than max_file_bytes (%d)",
                    self.path, length, self.max_file_bytes)  # fmt: skip

    def _format(self, record: PayloadRecord) -> bytes | None:
        """The record's line, or None (logged, counted) when it cannot be formatted: one odd record
        must not cost the others in its batch."""
        try:
            return format_record(record).encode("utf-8")
        except Exception as exc:
            self.failed += 1
            if self.failed == 1 or self.failed % 1000 == 0:  # once, then a reminder now and then
                # the exception's type only: its message could quote a value that must not be logged
                log.warning("payload log %s: model %s version %d request %s: record dropped, cannot be written "
                            "(%s; %d dropped so far)", self.path, record.model, record.version, record.request_id,
                            type(exc).__name__, self.failed)  # fmt: skip
            return None

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = _open(self.path)
        self.rotations += 1


def _open(path: Path) -> IO[bytes]:
    """Append-only, created readable by the server's user alone (payloads are personal data)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(descriptor, "ab")


class _Writers:
    """The open writers by resolved path, counted by their users; a file is a process-wide resource."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # loads run in threads, closes on the loop
        self._open: dict[Path, PayloadWriter] = {}

    def acquire(self, config: PayloadLogConfig, where: str) -> PayloadWriter:
        path = Path(config.path).resolve()
        with self._lock:
            writer = self._open.get(path)
            if writer is None:
                try:
                    writer = PayloadWriter(path, config.max_file_bytes, config.backups, config.queue_size)
                except OSError as exc:
                    raise ConfigError(f"{where}.path: cannot open {path}: {exc.strerror}") from None
                self._open[path] = writer
            elif (writer.max_file_bytes, writer.backups) != (config.max_file_bytes, config.backups):
                log.warning("%s: %s is already written with max_file_bytes %d and backups %d; those apply",
                            where, path, writer.max_file_bytes, writer.backups)  # fmt: skip
            writer.users += 1
            return writer

    def release(self, writer: PayloadWriter) -> bool:
        """Drop one user; True when it was the last (the caller then closes the writer)."""
        with self._lock:
            writer.users -= 1
            if writer.users > 0:
                return False
            self._open.pop(writer.path, None)
            return True


_WRITERS = _Writers()


class PayloadLog:
    """One model version's sampling and policy in front of a shared :class:`PayloadWriter`."""

    def __init__(
        self,
        model: str,
        version: int,
        config: PayloadLogConfig,
        policy: Policy,
        writer: PayloadWriter,
        rng: random.Random | None = None,
    ):
        self.model, self.version, self.config = model, version, config
        self.policy = policy
        self.writer = writer
        self._sampler = Sampler(config.sample_fraction, rng)
        self.dropped = 0
        self._closed = False

    @property
    def requests(self) -> int:
        return self._sampler.requests

    @property
    def sampled(self) -> int:
        return self._sampler.sampled

    def offer(
        self, inputs: Tensors, outputs: Tensors, *, request_id: str = "", route: str = "", trace_id: str | None = None
    ) -> None:
        """One answered request; ``trace_id`` None: the current span's. O(1) on the loop, never raises."""
        try:
            if not self._sampler.draw():
                return
            if trace_id is None:
                context = trace.get_current_span().get_span_context()
                trace_id = format(context.trace_id, "032x") if context.is_valid else ""
            kept = kept_inputs(inputs)
            record = PayloadRecord(
                time.time(), self.model, self.version, request_id, trace_id, route, kept, outputs, self.policy
            )
            if not self.writer.offer(record, tensor_bytes(inputs, outputs)):
                self.dropped += 1
        except Exception:  # pragma: no cover - the caller must never see a payload-log failure
            log.debug("payload log offer failed", exc_info=True)

    def start(self) -> None:
        self.writer.start()

    async def aclose(self) -> None:
        """Leave the shared writer; the last user closes it (after writing what is queued)."""
        if self._closed:
            return
        self._closed = True
        if _WRITERS.release(self.writer):
            await self.writer.aclose()


def open_payload_log(config: PayloadLogConfig, spec: ModelSpec, config_path: Path) -> PayloadLog:
    """The payload log of one version (blocking: opens the file). Raises ConfigError naming file and field."""
    where = f"{config_path}: monitoring.payload_log"
    for field in ("redact", "hash"):
        unknown = [n for n in getattr(config, field) if n not in spec.input_by_name and n not in spec.output_by_name]
        if unknown:
            inputs, outputs = ", ".join(spec.input_by_name), ", ".join(spec.output_by_name)
            raise ConfigError(
                f"{where}.{field}: model {spec.name} has no input or output named {unknown} "
                f"(inputs: {inputs}; outputs: {outputs})"
            )
    salt = os.environ.get(config.salt_env, "")
    if config.hash and not salt:
        raise ConfigError(
            f"{where}.hash: hashing needs a salt: set the environment variable {config.salt_env} "
            "(named by monitoring.payload_log.salt_env) to a long random secret"
        )
    longest = min(config.max_bytes_per_record, config.max_file_bytes)  # a record fits in a file
    policy = Policy(frozenset(config.redact), frozenset(config.hash), salt.encode("utf-8"), longest)
    return PayloadLog(spec.name, spec.version, config, policy, _WRITERS.acquire(config, where))
