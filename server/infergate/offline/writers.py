"""Output files written chunk by chunk into a staging folder, then assembled once the run is complete.

A run writes into ``OUTPUT.partial/`` next to the output. After each chunk the
writer's :meth:`Writer.commit` makes what it wrote durable (``fsync``) and
returns its *position*, which the run records in its state file; a resumed run
hands that position to :meth:`Writer.resume`, which throws away anything
written after it (a chunk cut short by a crash). :meth:`Writer.build` assembles
the complete output in the staging folder (:attr:`Writer.staged`), durably, and
:func:`publish` moves it into place atomically; the run records in between that
it is finished, so that a resume after a crash only completes the move.

==========  ================================================================
``.jsonl``   one object per row: the id and every output (numbers as
             nested lists; NaN and Infinity as Python's json writes them;
             text as text); staged as the output itself, so finishing is a
             rename
``.parquet`` a column for the ids and one per output: a scalar column for
             one value a row, else a fixed-size list of the row's values
             (row-major); each output's per-row shape is in the schema
             metadata (``infergate.shape.NAME``); staged as one part file
             per chunk, finished by copying the parts into one file, a row
             group each
``.npz``     one array per output and one for the ids, as ``np.savez``
             would write them (uncompressed); the largest array is written
             into the archive as the run goes, the others staged as raw
             files and appended at the end (see :class:`NpzWriter`);
             numbers only (no BYTES outputs, numeric ids)
==========  ================================================================
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from infergate.models.spec import ModelSpec
from infergate.offline import npzfile
from infergate.offline.readers import InputError, RowError, need_pyarrow

__all__ = ["OUTPUT_FORMATS", "ErrorsFile", "Writer", "fsync_directory", "open_writer", "publish"]

Array = npt.NDArray[Any]
OUTPUT_FORMATS = (".parquet", ".npz", ".jsonl")
_COPY_BLOCK = 1 << 22


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, output: Path) -> None:
    """Move a built output into place (atomically, durably)."""
    os.replace(staged, output)
    fsync_directory(output.parent)


class Writer:
    """One output format (see the module docstring)."""

    staged_name = ""  # the complete output's name in the staging folder, before it is moved into place

    def __init__(self, output: Path, staging: Path, spec: ModelSpec, id_name: str) -> None:
        self.output, self.staging, self.spec, self.id_name = output, staging, spec, id_name

    def resume(self, position: dict[str, Any]) -> None:
        """Continue after ``position`` (from :meth:`commit`); an empty position starts afresh."""
        raise NotImplementedError

    def write(self, ids: Array, outputs: dict[str, Array]) -> None:
        raise NotImplementedError

    def commit(self) -> dict[str, Any]:
        """Make everything written so far durable; the position to resume from."""
        raise NotImplementedError

    @property
    def staged(self) -> Path:
        """Where :meth:`build` leaves the complete output."""
        return self.staging / self.staged_name

    def build(self) -> None:
        """Assemble the complete output from the staging folder at :attr:`staged`, durably; closes the files."""
        raise NotImplementedError

    def finish(self) -> None:
        """Build the output and move it into place."""
        self.build()
        publish(self.staged, self.output)

    def close(self) -> None:
        """Release files (the staging folder stays, for a resume)."""


def open_writer(output: Path, staging: Path, spec: ModelSpec, id_name: str) -> Writer:
    """The writer for ``output``'s suffix. Raises InputError."""
    suffix = output.suffix.lower()
    writers: dict[str, type[Writer]] = {".jsonl": JsonlWriter, ".parquet": ParquetWriter, ".npz": NpzWriter}
    if suffix not in writers:
        raise InputError(f"{output}: unknown output format {suffix or '(none)'}; use {', '.join(OUTPUT_FORMATS)}")
    if suffix == ".parquet":
        need_pyarrow(output)
    return writers[suffix](output, staging, spec, id_name)


def _truncated(path: Path, size: int) -> IO[bytes]:
    """``path`` opened for appending after its first ``size`` bytes (created when missing)."""
    file = path.open("ab")
    file.truncate(size)
    return file


def _durable(file: IO[bytes]) -> int:
    file.flush()
    os.fsync(file.fileno())
    return file.tell()


# --------------------------------------------------------------------------- JSON lines


def _json_value(array: Array) -> list[Any]:
    """Each row's value: a number, or nested lists; BYTES as text."""
    if array.dtype == object:
        flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.reshape(-1)]
        array = np.array(flat, dtype=object).reshape(array.shape)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array.reshape(-1)
    values: list[Any] = array.tolist()
    return values


class JsonlWriter(Writer):
    staged_name = "output.jsonl"  # written in place: building is closing it

    def resume(self, position: dict[str, Any]) -> None:
        self._file = _truncated(self.staged, int(position.get("size", 0)))

    def write(self, ids: Array, outputs: dict[str, Array]) -> None:
        columns = {self.id_name: ids.tolist()} | {name: _json_value(array) for name, array in outputs.items()}
        names = list(columns)
        lines = [json.dumps(dict(zip(names, row, strict=True))) for row in zip(*columns.values(), strict=True)]
        if lines:
            self._file.write(("\n".join(lines) + "\n").encode())

    def commit(self) -> dict[str, Any]:
        return {"size": _durable(self._file)}

    def build(self) -> None:
        _durable(self._file)
        self._file.close()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- Parquet


def _arrow_column(array: Array) -> Any:
    import pyarrow as pa

    flat = array.reshape(-1)
    if array.dtype == object:
        values = pa.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in flat], pa.string())
    else:
        values = pa.array(flat)
    per_row = math.prod(array.shape[1:])
    if array.ndim == 1 or per_row == 1:
        return values
    return pa.FixedSizeListArray.from_arrays(values, per_row)


class ParquetWriter(Writer):
    staged_name = "output.parquet"

    def resume(self, position: dict[str, Any]) -> None:
        self._parts = int(position.get("parts", 0))
        self._shapes: dict[str, list[int]] = dict(position.get("shapes", {}))
        for part in self.staging.glob("part-*.parquet"):  # written after the last commit: not in the state
            if int(part.stem.removeprefix("part-")) >= self._parts:
                part.unlink()

    def _part(self, index: int) -> Path:
        return self.staging / f"part-{index:06d}.parquet"

    def write(self, ids: Array, outputs: dict[str, Array]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not len(ids):
            return
        shapes = {name: list(array.shape[1:]) for name, array in outputs.items()}
        self._shapes = self._shapes or shapes
        if shapes != self._shapes:
            raise InputError(f"outputs changed shape between chunks ({self._shapes} then {shapes}): use .jsonl")
        metadata = {f"infergate.shape.{name}": json.dumps(shape) for name, shape in shapes.items()}
        columns = {self.id_name: pa.array(ids)} | {name: _arrow_column(a) for name, a in outputs.items()}
        table = pa.table(columns).replace_schema_metadata(metadata)
        staged = self.staging / "part.tmp"
        pq.write_table(table, staged)
        with staged.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(staged, self._part(self._parts))
        self._parts += 1

    def commit(self) -> dict[str, Any]:
        fsync_directory(self.staging)
        return {"parts": self._parts, "shapes": self._shapes}

    def build(self) -> None:
        import pyarrow.parquet as pq

        if self._parts == 0:
            self._write_empty(self.staged)
        else:
            schema = pq.read_schema(self._part(0))
            with pq.ParquetWriter(self.staged, schema) as out:
                for index in range(self._parts):  # one part in memory at a time
                    out.write_table(pq.read_table(self._part(index)))
        with self.staged.open("rb+") as file:
            os.fsync(file.fileno())

    def _write_empty(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {self.id_name: pa.array([], pa.int64())}
        for tensor in self.spec.outputs:
            dtype = object if tensor.datatype.name == "BYTES" else tensor.datatype.numpy
            columns[tensor.name] = _arrow_column(np.zeros((0, *(max(d, 1) for d in tensor.shape[1:])), dtype=dtype))
        pq.write_table(pa.table(columns), path)


# --------------------------------------------------------------------------- npz


class NpzWriter(Writer):
    """Writes the largest array (by row size) into the archive itself, the others into raw files.

    The staged archive ``output.npz`` begins with that member's local header and
    ``.npy`` header, both of a size known from its dtype and per-row shape, and
    filled in by :meth:`build`; its data follows as the chunks come. The other
    arrays (the ids, further outputs), a few bytes a row, are appended after it
    when the run is built. Each array's CRC is kept as it is written and
    recorded with its size at every commit, so a resumed run continues both.
    """

    staged_name = "output.npz"

    def __init__(self, output: Path, staging: Path, spec: ModelSpec, id_name: str) -> None:
        super().__init__(output, staging, spec, id_name)
        text = [t.name for t in spec.outputs if t.datatype.name == "BYTES"]
        if text:
            raise InputError(
                f"{output}: outputs {text} are text (BYTES), which .npz cannot hold: use .jsonl or .parquet"
            )
        self._archive = self.staged
        self._files: dict[str, IO[bytes]] = {}
        self._starts: dict[str, int] = {}  # where each array's data begins in its file
        self._crcs: dict[str, int] = {}
        self._layout: dict[str, list[Any]] = {}

    def resume(self, position: dict[str, Any]) -> None:
        self._layout = {k: list(v) for k, v in position.get("layout", {}).items()}
        sizes, self._crcs = position.get("sizes", {}), dict(position.get("crcs", {}))
        if not sizes:
            self._archive.unlink(missing_ok=True)
        for raw in self.staging.glob("*.raw"):  # first written after the last commit: not in the state
            if raw.stem not in sizes:
                raw.unlink()
        for name, size in sizes.items():
            path, self._starts[name] = self._place(name)
            self._files[name] = _truncated(path, self._starts[name] + int(size))

    def _inplace(self) -> str:
        """The array written into the archive: the most bytes a row (the first of equals)."""
        return max(self._layout, key=lambda name: _row_bytes(*self._layout[name]))

    def _place(self, name: str) -> tuple[Path, int]:
        """Where ``name``'s data goes: a file and the offset its data starts at."""
        if name != self._inplace():
            return self.staging / f"{name}.raw", 0
        return self._archive, self._headers_size(name)

    def _headers_size(self, name: str) -> int:
        descr, shape = self._layout[name]
        return len(npzfile.local_header(f"{name}.npy", 0, 0, 0)) + npzfile.npy_header_size(np.dtype(descr), shape)

    def _open(self, name: str) -> IO[bytes]:
        path, self._starts[name] = self._place(name)
        file = path.open("wb")
        file.write(bytes(self._starts[name]))  # headers come when the archive is built
        self._crcs[name] = 0
        return file

    def write(self, ids: Array, outputs: dict[str, Array]) -> None:
        if not len(ids):
            return
        if ids.dtype.kind not in "iu":
            raise InputError(f"{self.output}: .npz needs numeric ids (the id column holds {ids.dtype}): use .parquet")
        arrays = {self.id_name: ids.astype(np.int64, copy=False)} | outputs
        layout = {name: [a.dtype.str, list(a.shape[1:])] for name, a in arrays.items()}
        self._layout = self._layout or layout
        if layout != self._layout:
            raise InputError(f"outputs changed shape between chunks ({self._layout} then {layout}): use .jsonl")
        for name, array in arrays.items():
            if name not in self._files:
                self._files[name] = self._open(name)
            data = np.ascontiguousarray(array).data  # no copy beyond the kernel's
            self._crcs[name] = zlib.crc32(data, self._crcs[name])
            self._files[name].write(data)

    def commit(self) -> dict[str, Any]:
        sizes = {name: _durable(file) - self._starts[name] for name, file in self._files.items()}
        fsync_directory(self.staging)
        return {"sizes": sizes, "crcs": self._crcs, "layout": self._layout}

    def build(self) -> None:
        when = time.time()
        for file in self._files.values():
            file.close()
        self._files = {}
        with self._archive.open("r+b" if self._layout else "wb") as archive:
            members = []
            if self._layout:
                first = self._inplace()
                archive.seek(0)
                written = self._write_member(archive, first, self._archive.stat().st_size - self._starts[first], when)
                archive.seek(0, os.SEEK_END)
                members = [  # np.savez's order: the ids, then the outputs
                    written if name == first else self._append(archive, name, when) for name in self._layout
                ]
            archive.write(npzfile.central_directory(members, archive.tell(), when))
            archive.flush()
            os.fsync(archive.fileno())

    def _write_member(self, archive: IO[bytes], name: str, data_size: int, when: float) -> npzfile.Member:
        """``name``'s local header and ``.npy`` header, written where ``archive`` stands; its data follows."""
        descr, shape = self._layout[name]
        rows = data_size // _row_bytes(descr, shape) if data_size else 0
        header = npzfile.npy_header(np.dtype(descr), shape, rows)
        crc = npzfile.crc32_combine(zlib.crc32(header), self._crcs[name], data_size)
        offset, size = archive.tell(), len(header) + data_size
        archive.write(npzfile.local_header(f"{name}.npy", crc, size, when) + header)
        return npzfile.Member(f"{name}.npy", crc, size, offset)

    def _append(self, archive: IO[bytes], name: str, when: float) -> npzfile.Member:
        """A member copied from its raw file at the archive's end."""
        raw = self.staging / f"{name}.raw"
        member = self._write_member(archive, name, raw.stat().st_size, when)
        with raw.open("rb") as source:
            shutil.copyfileobj(source, archive, _COPY_BLOCK)
        return member

    def close(self) -> None:
        for file in self._files.values():
            file.close()


def _row_bytes(descr: str, shape: list[int]) -> int:
    return np.dtype(descr).itemsize * math.prod(shape)


# --------------------------------------------------------------------------- bad rows


class ErrorsFile:
    """``--errors FILE``: one JSON object per bad row (``row``, ``id``, ``error``), resumable like the outputs."""

    def __init__(self, path: Path, size: int = 0) -> None:
        self.path = path
        self._file = _truncated(path, size)

    def write(self, errors: list[RowError]) -> None:
        for error in errors:
            line = json.dumps({"row": error.row, "id": error.id, "error": error.message}, default=str)
            self._file.write(line.encode() + b"\n")

    def commit(self) -> int:
        return _durable(self._file)

    def close(self) -> None:
        self._file.close()
