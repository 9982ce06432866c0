"""The state of a run, kept beside its staged output so that ``--resume`` continues where it stopped.

``OUTPUT.partial/state.json`` is replaced atomically (written aside, fsynced,
renamed, directory fsynced) after each chunk, and only once that chunk's
output and bad rows are durable. So after a crash at any moment the state names
a chunk whose data is all on disk, and whatever was written after it is thrown
away on resume (see :meth:`infergate.offline.writers.Writer.resume`).

A resume is refused when the input file, the model, its version, the digest of
that version's model file, the chunk size or the output format differ from the
run that wrote the state: its rows would not line up with what is already
written, or would come from another model. A state of format 2 records no
digest, so it cannot show that its rows came from the model there now: it is
refused too, asking for a restart.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infergate.offline.writers import fsync_directory

__all__ = ["STATE_FILE", "ResumeError", "RunState", "identity_of"]

STATE_FILE = "state.json"
_FORMAT_VERSION = 3  # 2: .npz runs record each array's CRC; 3: the model's digest


class ResumeError(ValueError):
    """The staging folder does not belong to this run (or is missing); the message says why."""


def identity_of(path: Path) -> dict[str, int]:
    """What must not change for a resume: the input's size and modification time."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class RunState:
    """What a resumed run needs: which run this is, how far it got, where each file stands."""

    # Which run: a resume must match all of these.
    input: str
    input_identity: dict[str, int]
    model: str
    model_version: str
    model_sha256: str | None  # the version's digest (Executor.digest); None when the server reports none
    output_format: str
    chunk_rows: int
    id_column: str | None
    # How far it got.
    next_row: int = 0  # input rows [0, next_row) are done (written or reported bad)
    rows_written: int = 0
    bad_rows: int = 0
    chunks: int = 0
    reader: dict[str, Any] = field(default_factory=dict)  # where the reader restarts (JSON lines: byte offset)
    writer: dict[str, Any] = field(default_factory=dict)  # Writer.commit()'s position
    errors_size: int = 0  # bytes of --errors FILE that are committed
    finished: bool = False

    def matches(self, other: RunState) -> list[str]:
        """The settings in which ``other`` (this run) differs from the run that saved this state."""
        keys = ("input", "input_identity", "model", "model_version", "output_format", "chunk_rows", "id_column")
        differences = [
            f"{k}: was {getattr(self, k)!r}, now {getattr(other, k)!r}"
            for k in keys
            if getattr(self, k) != getattr(other, k)
        ]
        if not differences and self.model_sha256 != other.model_sha256:  # the same name and version, other bytes
            version = self.model_version or "(the server's choice)"
            differences.append(
                f"model {self.model} version {version}: its sha256 was {_shown(self.model_sha256)}, "
                f"now {_shown(other.model_sha256)}: the rows written so far came from other model bytes"
            )
        return differences

    def save(self, staging: Path) -> None:
        """Replace the state file atomically and durably."""
        body = json.dumps({"format": _FORMAT_VERSION, **asdict(self)}, indent=1)
        temporary = staging / (STATE_FILE + ".tmp")
        with temporary.open("w", encoding="utf-8") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, staging / STATE_FILE)
        fsync_directory(staging)

    @classmethod
    def load(cls, staging: Path) -> RunState:
        path = staging / STATE_FILE
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ResumeError(f"{path} is missing: nothing to resume") from None
        except (OSError, ValueError) as exc:
            raise ResumeError(f"{path}: unreadable ({exc}); delete {staging} to start again") from None
        written = body.pop("format", None)
        if written == 2:
            raise ResumeError(
                f"{path} records no digest of the model (an earlier infergate wrote it), so the rows it holds "
                f"cannot be shown to come from the model there now; delete {staging} to start again"
            )
        if written != _FORMAT_VERSION:
            raise ResumeError(f"{path} was written by another infergate version; delete {staging} to start again")
        try:
            return cls(**body)
        except TypeError as exc:
            raise ResumeError(f"{path}: {exc}") from None


def _shown(digest: str | None) -> str:
    """A digest on one line (a version with external data has ``DIGEST  FILE`` lines, one per file)."""
    return "(not reported)" if digest is None else "; ".join(digest.splitlines())
