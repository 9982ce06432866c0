"""Input files read in chunks of rows, so a file larger than memory can be scored.

Every reader yields :class:`Chunk` objects of up to ``chunk_rows`` input rows,
starting at row ``start`` (0-based; a resumed run starts after its last
complete chunk). Rows are numbered in file order from 0 (for CSV: data records,
the header not counted). A row's *id* is its number, or the value of the
``id_column`` when one is named.

==========  ================================================================
``.npy``     one array, rows first, for a model with one input; read with
             plain file reads (not a memory map, whose pages would count
             towards the process's memory as the file is read)
``.npz``     one array per input, named after it (plus the id column's
             array); each member is streamed out of the zip
``.parquet`` pyarrow's batch iterator, one row group at a time and only
             the needed columns (memory holds about one row group); whole
             row groups are skipped when resuming
``.csv``     pyarrow's streaming CSV reader (a header row is required); every
             column is read as text and converted per input, so one bad value
             costs one row, not the file; rows with too many or too few
             fields are bad rows
``.jsonl``   one JSON object per line
==========  ================================================================

Tabular formats map columns to inputs as :mod:`infergate.offline.columns` says.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from infergate.models.spec import ModelSpec
from infergate.offline.columns import (
    ColumnError,
    InputPlan,
    arrow_to_tensors,
    plan_inputs,
    records_to_tensors,
)

__all__ = ["FORMATS", "Chunk", "InputError", "Reader", "RowError", "need_pyarrow", "open_reader"]

Array = npt.NDArray[Any]
FORMATS = (".npy", ".npz", ".parquet", ".csv", ".jsonl")


class InputError(ValueError):
    """The input file cannot feed this model (wrong format, shape, datatype, missing input)."""


@dataclass(frozen=True, slots=True)
class RowError:
    """One bad row: its number in the input, its id, and what was wrong."""

    row: int
    id: Any
    message: str


@dataclass
class Chunk:
    """Input rows ``[start, stop)``: ``numbers``, ``ids`` and ``inputs`` of the good ones, ``bad`` the others."""

    start: int
    stop: int
    numbers: Array  # each good row's number in the input
    ids: Array
    inputs: dict[str, Array]
    bad: list[RowError] = field(default_factory=list)
    resume: dict[str, Any] = field(default_factory=dict)  # where a reader restarts after this chunk

    @property
    def rows(self) -> int:
        return len(self.ids)


class Reader:
    """Chunks of an input file; ``total_rows`` is None when only an estimate would do (see ``estimated``)."""

    total_rows: int | None = None

    def chunks(self, start: int, resume: dict[str, Any]) -> Iterator[Chunk]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""


def open_reader(path: Path, spec: ModelSpec, chunk_rows: int, id_column: str | None = None) -> Reader:
    """The reader for ``path``'s suffix. Raises InputError (also for a file that cannot be opened)."""
    suffix = path.suffix.lower()
    readers: dict[str, type[_Base]] = {
        ".npy": NpyReader,
        ".npz": NpzReader,
        ".parquet": ParquetReader,
        ".csv": CsvReader,
        ".jsonl": JsonlReader,
    }
    if suffix not in readers:
        raise InputError(f"{path}: unknown input format {suffix or '(none)'}; use one of {', '.join(FORMATS)}")
    if suffix in (".parquet", ".csv"):
        need_pyarrow(path)
    try:
        return readers[suffix](path, spec, chunk_rows, id_column)
    except ColumnError as exc:
        raise InputError(f"{path}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def need_pyarrow(path: Path) -> None:
    """Parquet and CSV need pyarrow, which only the ``offline`` extra installs. Raises InputError."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError(f"{path}: Parquet and CSV need pyarrow: pip install 'infergate[offline]'") from None


class _Base(Reader):
    def __init__(self, path: Path, spec: ModelSpec, chunk_rows: int, id_column: str | None) -> None:
        self.path, self.spec, self.chunk_rows, self.id_column = path, spec, chunk_rows, id_column

    def _chunk(self, start: int, inputs: dict[str, Array], ids: Array, bad: dict[int, str]) -> Chunk:
        """A chunk of ``len(ids)`` rows from ``start``, without the rows in ``bad`` (index -> reason)."""
        stop = start + len(ids)
        numbers = np.arange(start, stop, dtype=np.int64)
        if not bad:
            return Chunk(start, stop, numbers, ids, inputs)
        errors = [RowError(start + i, _plain(ids[i]), reason) for i, reason in sorted(bad.items())]
        keep = np.ones(len(ids), dtype=bool)
        keep[list(bad)] = False
        return Chunk(start, stop, numbers[keep], ids[keep], {k: v[keep] for k, v in inputs.items()}, errors)


def _plain(value: Any) -> Any:
    """A numpy scalar as a plain Python value (for JSON)."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- numpy files


@dataclass
class _NpyStream:
    """One .npy array read row block by row block from a stream positioned at its data."""

    stream: IO[bytes]
    where: str  # the file (and member) in messages
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    row: int = 0  # the next row read

    @classmethod
    def open(cls, stream: IO[bytes], where: str, size: int) -> _NpyStream:
        """The array whose ``.npy`` file (``size`` bytes) ``stream`` begins. Raises InputError, also when
        the file is shorter than its header says."""
        try:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f".npy format version {version} (infergate reads 1.0 and 2.0)")
        except ValueError as exc:
            raise InputError(f"{where}: not a .npy array: {exc}") from None
        shape, fortran, dtype = header
        if fortran or dtype.hasobject or not shape:
            raise InputError(f"{where}: needs a C-ordered array of numbers with rows first (got {dtype} {shape})")
        array = cls(stream, where, dtype, tuple(shape))
        array._check_size(size - stream.tell())
        return array

    def _check_size(self, data_bytes: int) -> None:
        rows, row_bytes = self.shape[0], self.row_bytes
        if row_bytes and data_bytes < rows * row_bytes:
            raise InputError(
                f"{self.where}: truncated: the header says {rows} rows of {row_bytes} bytes; "
                f"the data holds {data_bytes // row_bytes} complete rows"
            )

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def skip(self, rows: int) -> None:
        self.stream.seek(rows * self.row_bytes, io.SEEK_CUR)
        self.row += rows

    def read(self, rows: int) -> Array:
        """The next ``rows`` rows. Raises InputError when the file ends before them (it shrank since it was opened)."""
        data = self.stream.read(rows * self.row_bytes)
        if len(data) < rows * self.row_bytes:
            ends = self.row + len(data) // self.row_bytes
            raise InputError(f"{self.where}: the data ends in row {ends}; the header says {self.shape[0]} rows")
        self.row += rows
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, *self.shape[1:])


class _NumpyReader(_Base):
    """What .npy and .npz share: arrays checked against the inputs, read in step."""

    def _check(self, arrays: dict[str, _NpyStream]) -> None:
        for tensor in self.spec.inputs:
            array = arrays.get(tensor.name)
            if array is None:
                raise InputError(f"{self.path}: no array for input {tensor.name} (found {sorted(arrays)})")
            inner = tensor.shape[1:]
            fits = len(array.shape) == len(tensor.shape) and all(
                d in (-1, a) for d, a in zip(inner, array.shape[1:], strict=True)
            )
            if not fits:
                raise InputError(
                    f"{self.path}: {tensor.name} has shape {list(array.shape)}; the model takes {list(tensor.shape)}"
                )
            if tensor.datatype.name == "BYTES" or not np.can_cast(array.dtype, tensor.datatype.numpy, "same_kind"):
                raise InputError(f"{self.path}: {tensor.name} is {array.dtype}; the model takes {tensor.datatype.name}")
        counts = {a.shape[0] for a in arrays.values()}
        if len(counts) != 1:
            raise InputError(f"{self.path}: the arrays disagree on the number of rows ({sorted(counts)})")
        self.total_rows = counts.pop()

    def _iterate(self, arrays: dict[str, _NpyStream], start: int) -> Iterator[Chunk]:
        ids_stream = arrays.get(self.id_column) if self.id_column else None
        for array in arrays.values():
            array.skip(start)
        row = start
        assert self.total_rows is not None
        while row < self.total_rows:
            rows = min(self.chunk_rows, self.total_rows - row)
            inputs = {t.name: arrays[t.name].read(rows).astype(t.datatype.numpy, copy=False) for t in self.spec.inputs}
            ids = ids_stream.read(rows).reshape(rows) if ids_stream is not None else np.arange(row, row + rows)
            yield self._chunk(row, inputs, ids, {})
            row += rows


class NpyReader(_NumpyReader):
    def __init__(self, path: Path, spec: ModelSpec, chunk_rows: int, id_column: str | None) -> None:
        super().__init__(path, spec, chunk_rows, id_column)
        if len(spec.inputs) != 1:
            names = [t.name for t in spec.inputs]
            raise InputError(f"{path}: a .npy file holds one array; the model has inputs {names}: use .npz")
        self._file = path.open("rb")
        try:
            self._array = _NpyStream.open(self._file, str(path), os.fstat(self._file.fileno()).st_size)
            self._check({spec.inputs[0].name: self._array})
        except BaseException:
            self._file.close()
            raise

    def chunks(self, start: int, resume: dict[str, Any]) -> Iterator[Chunk]:
        return self._iterate({self.spec.inputs[0].name: self._array}, start)

    def close(self) -> None:
        self._file.close()


class NpzReader(_NumpyReader):
    def __init__(self, path: Path, spec: ModelSpec, chunk_rows: int, id_column: str | None) -> None:
        super().__init__(path, spec, chunk_rows, id_column)
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise InputError(f"{path}: not an .npz archive: {exc}") from None
        self._arrays: dict[str, _NpyStream] = {}
        try:
            names = {n.removesuffix(".npy") for n in self._zip.namelist()}
            wanted = [t.name for t in spec.inputs] + ([id_column] if id_column else [])
            missing = [n for n in wanted if n not in names]
            if missing:
                raise InputError(f"{path}: no array {', '.join(missing)} (found {sorted(names)})")
            for name in wanted:
                self._arrays[name] = self._open(name)
            self._check({t.name: self._arrays[t.name] for t in spec.inputs})
            if id_column:
                self._check_ids(id_column, self._arrays[id_column])
        except BaseException:
            self.close()
            raise

    def _open(self, name: str) -> _NpyStream:
        member = f"{name}.npy"
        return _NpyStream.open(self._zip.open(member), f"{self.path}:{name}", self._zip.getinfo(member).file_size)

    def _check_ids(self, name: str, ids: _NpyStream) -> None:
        """One id a row, for every row of the inputs."""
        if ids.shape[0] != self.total_rows:
            raise InputError(
                f"{self.path}: the id column {name} has {ids.shape[0]} rows; the inputs have {self.total_rows}"
            )
        if math.prod(ids.shape[1:]) != 1:
            raise InputError(
                f"{self.path}: the id column {name} has shape {list(ids.shape)}: one value a row is needed"
            )

    def chunks(self, start: int, resume: dict[str, Any]) -> Iterator[Chunk]:
        return self._iterate(self._arrays, start)

    def close(self) -> None:
        for array in self._arrays.values():
            array.stream.close()
        self._zip.close()


# --------------------------------------------------------------------------- tables


class _TableReader(_Base):
    """Rebatches a stream of Arrow record batches into chunks and converts them."""

    plans: list[InputPlan]

    def _plan(self, columns: list[str]) -> None:
        if self.id_column is not None and self.id_column not in columns:
            raise InputError(f"{self.path}: no id column {self.id_column!r} (the columns are {columns})")
        self.plans = plan_inputs(self.spec, columns, self.id_column)

    def _needed(self) -> list[str]:
        names = [c for p in self.plans for c in p.columns]
        return names + ([self.id_column] if self.id_column and self.id_column not in names else [])

    def _rebatch(self, batches: Iterator[Any], skip: int, numbers: Iterator[int]) -> Iterator[Chunk]:
        """Cut ``batches`` (after dropping ``skip`` rows) into chunks of ``chunk_rows``; ``numbers`` gives
        each row its number (CSV leaves out the numbers of rows its parser refused)."""
        import pyarrow as pa

        pending: list[Any] = []
        held = 0
        for batch in batches:
            if skip:
                dropped = min(skip, batch.num_rows)
                batch, skip = batch.slice(dropped), skip - dropped
            pending.append(batch)
            held += batch.num_rows
            while held >= self.chunk_rows:
                table = pa.Table.from_batches(pending).combine_chunks()
                first, rest = table.slice(0, self.chunk_rows), table.slice(self.chunk_rows)
                pending, held = rest.to_batches(), rest.num_rows
                yield self._convert(first, numbers)
        if held:
            yield self._convert(pa.Table.from_batches(pending).combine_chunks(), numbers)

    def _convert(self, table: Any, numbers: Iterator[int]) -> Chunk:
        batch = table.to_batches()[0]
        rows = np.fromiter((next(numbers) for _ in range(batch.num_rows)), dtype=np.int64, count=batch.num_rows)
        inputs, bad = arrow_to_tensors(batch, self.plans)
        if self.id_column is not None:
            ids = np.asarray(batch.column(self.id_column).to_numpy(zero_copy_only=False))
        else:
            ids = rows
        chunk = self._chunk(int(rows[0]), inputs, ids, bad)
        chunk.bad = [RowError(int(rows[i]), e.id, e.message) for i, e in zip(sorted(bad), chunk.bad, strict=True)]
        keep = np.ones(len(rows), dtype=bool)
        keep[list(bad)] = False
        chunk.numbers, chunk.stop = rows[keep], int(rows[-1]) + 1
        return chunk


class ParquetReader(_TableReader):
    def __init__(self, path: Path, spec: ModelSpec, chunk_rows: int, id_column: str | None) -> None:
        super().__init__(path, spec, chunk_rows, id_column)
        import pyarrow.parquet as pq

        try:
            # No pre-buffering: it caches every requested row group's column chunks, so memory
            # would grow with the file (measured: 30 MB -> 115 MB of Arrow memory over 112 MB of input).
            self._file = pq.ParquetFile(path, pre_buffer=False)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...
            raise InputError(f"{path}: not a Parquet file: {exc}") from None
        try:
            self._plan(self._file.schema_arrow.names)
        except BaseException:
            self._file.close()
            raise
        self.total_rows = self._file.metadata.num_rows

    def chunks(self, start: int, resume: dict[str, Any]) -> Iterator[Chunk]:
        groups: list[int] = []
        first_row = 0
        for group in range(self._file.num_row_groups):  # skip whole row groups before ``start``
            rows = self._file.metadata.row_group(group).num_rows
            if not groups and first_row + rows <= start:
                first_row += rows
                continue
            groups.append(group)
        columns = self._needed()
        batches = (  # one row group at a time: memory holds one, whatever the file's size
            batch
            for group in groups
            for batch in self._file.iter_batches(batch_size=self.chunk_rows, row_groups=[group], columns=columns)
        )
        return self._rebatch(batches, start - first_row, itertools.count(start))

    def close(self) -> None:
        self._file.close()


class CsvReader(_TableReader):
    """CSV has no index: resuming re-reads the file and drops the chunks already done."""

    def __init__(self, path: Path, spec: ModelSpec, chunk_rows: int, id_column: str | None) -> None:
        super().__init__(path, spec, chunk_rows, id_column)
        with path.open("rb") as file:  # the header, to read every column as text
            header = file.readline().decode("utf-8", "replace")
        self._columns = next(csv.reader([header.rstrip("\r\n")]), [])
        if not self._columns:
            raise InputError(f"{path}: no header row")
        self._plan(self._columns)
        self.total_rows = max(0, _count_lines(path) - 1)  # an estimate when values hold newlines

    def chunks(self, start: int, resume: dict[str, Any]) -> Iterator[Chunk]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        refused: dict[int, str] = {}  # row number -> reason, filled by the parser as it reads each block

        def on_invalid(row: Any) -> str:
            number = row.number - 2 if row.number is not None else -1  # 1-based, the header is row 1
            refused[number] = f"row has {row.actual_columns} field(s); the header has {row.expected_columns}"
            return "skip"

        try:
            reader = pcsv.open_csv(
                self.path,
                # Single-threaded: only then does the parser number the rows it refuses (the model has the cores).
                # 1 MiB blocks: the reader decodes a few blocks ahead, so the block size bounds its memory.
                read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 20),
                parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
                convert_options=pcsv.ConvertOptions(
                    column_types=dict.fromkeys(self._columns, pa.string()),
                    include_columns=self._needed(),
                    strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid as exc:  # the first block is decoded on opening
            raise self._unreadable(exc) from None
        return self._with_refused(self._rebatch(self._decoded(reader), 0, _kept(refused)), refused, start)

    def _decoded(self, reader: Iterator[Any]) -> Iterator[Any]:
        """The reader's record batches; a block it cannot decode (invalid UTF-8...) raises InputError."""
        import pyarrow as pa

        try:
            yield from reader
        except pa.ArrowInvalid as exc:
            raise self._unreadable(exc) from None

    def _unreadable(self, error: Exception) -> InputError:
        """pyarrow's error as an InputError naming the file, and the row and column when pyarrow says them."""
        found = _ARROW_CSV_ERROR.match(str(error))
        if found is None:
            return InputError(f"{self.path}: {error}")
        column, record, what = int(found[1]), int(found[2]), found[3]  # record: from 1, the header included
        name = self._columns[column] if column < len(self._columns) else f"#{column}"
        where = f"row {record - 2}, column {name}" if record >= 2 else f"column {name}"
        return InputError(f"{self.path}: {where}: {what}")

    @staticmethod
    def _with_refused(chunks: Iterator[Chunk], refused: dict[int, str], start: int) -> Iterator[Chunk]:
        """Each chunk also reports the refused rows since the previous one; chunks before ``start`` are dropped."""
        previous = 0
        for chunk in chunks:
            chunk.start, previous = previous, chunk.stop
            _add_refused(chunk, refused)
            if chunk.stop > start:
                yield chunk
        trailing = [n for n in refused if n >= previous]
        if trailing and max(trailing) + 1 > start:  # refused rows after the last good one
            empty = np.zeros(0, dtype=np.int64)
            last = Chunk(previous, max(trailing) + 1, empty, empty, {})
            _add_refused(last, refused)
            yield last


_ARROW_CSV_ERROR = re.compile(r"In CSV column #(\d+): Row #(-?\d+): (.*)", re.DOTALL)


def _kept(refused: dict[int, str]) -> Iterator[int]:
    """The numbers of the rows the parser kept, in order: it records a refused row before yielding its block."""
    number = 0
    while True:
        while number in refused:
            number += 1
        yield number
        number += 1


def _add_refused(chunk: Chunk, refused: dict[int, str]) -> None:
    rows = [RowError(n, n, reason) for n, reason in refused.items() if chunk.start <= n < chunk.stop]
    chunk.bad = sorted(chunk.bad + rows, key=lambda e: e.row)


def _count_lines(path: Path) -> int:
    """Newlines in the file (the last line counted even without one): for the progress bar's estimate."""
    count, last = 0, b"\n"
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


class JsonlReader(_Base):
    def __init__(self, path: Path, spec: ModelSpec, chunk_rows: int, id_column: str | None) -> None:
        super().__init__(path, spec, chunk_rows, id_column)
        self._file = path.open("rb")
        self.plans: list[InputPlan] | None = None
        self.total_rows = _count_lines(path)

    def chunks(self, start: int, resume: dict[str, Any]) -> Iterator[Chunk]:
        self._file.seek(int(resume.get("offset", 0)))
        row = start
        while True:
            lines = [line for line in (self._file.readline() for _ in range(self.chunk_rows)) if line]
            if not lines:
                return
            yield self._records(row, lines)
            row += len(lines)

    def _records(self, start: int, lines: list[bytes]) -> Chunk:
        records: list[dict[str, Any]] = []
        bad: dict[int, str] = {}
        for i, line in enumerate(lines):
            try:
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError(f"a JSON object is expected, not {type(value).__name__}")
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                bad[i], value = f"not JSON: {exc}", {}
            records.append(value)
        if self.plans is None:
            first = next((r for r in records if r), None)
            if first is None:
                return self._skip_all(start, lines, bad)
            try:
                self.plans = plan_inputs(self.spec, list(first), self.id_column)
            except ColumnError as exc:
                raise InputError(f"{self.path}: row {start + records.index(first)}: {exc}") from None
        inputs, problems = records_to_tensors(records, self.plans, self.id_column)
        for i, reason in problems.items():
            bad.setdefault(i, reason)
        ids = np.array(
            [r.get(self.id_column) if self.id_column else start + i for i, r in enumerate(records)],
            dtype=object if self.id_column else np.int64,
        )
        chunk = self._chunk(start, inputs, ids, bad)
        chunk.resume = {"offset": self._file.tell()}
        return chunk

    def _skip_all(self, start: int, lines: list[bytes], bad: dict[int, str]) -> Chunk:
        ids = np.arange(start, start + len(lines))
        chunk = self._chunk(start, {t.name: np.zeros((len(lines), 0)) for t in self.spec.inputs}, ids, bad)
        chunk.resume = {"offset": self._file.tell()}
        return chunk

    def close(self) -> None:
        self._file.close()
