"""A batch run: read chunks, score them with bounded concurrency, write them in order, record progress.

Three things run at once, each bounded:

* a producer reads the next chunk in a worker thread and starts scoring it, at
  most ``WINDOW`` chunks ahead of the writer (so memory holds a few chunks,
  whatever the file's size);
* each chunk is cut into requests of ``batch_size`` rows; at most
  ``executor.in_flight`` requests are in flight in all (enough to keep every
  instance busy, never enough to fill the model's queue);
* the consumer takes chunks in input order, writes each in a worker thread,
  makes it durable, then records the new state (see :mod:`.state`).

A request the model cannot compute is split in halves until the rows it fails
on are found; those become bad rows like the unreadable ones. With
``on_error="stop"`` the first chunk holding a bad row is not written and the
run fails naming the row; with ``"skip"`` bad rows go to the errors file.

Before anything is created the output and errors paths are checked (see
:mod:`.paths`); the run then holds its staging folder with a lock (see
:mod:`.lock`), so a second run on the same output is refused at once.

``stop`` (Ctrl-C) ends reading; the chunks already being scored are finished
and written, so the state file names the last of them and ``--resume`` goes on
from there.

A reader that fails part-way through (whatever it raises) ends the run with an
:class:`InputError` naming the file. Finishing builds the output in the staging
folder, records in the state that the run is finished, and only then moves the
output into place and removes the staging folder: a resume after a crash in
between completes those last steps and never touches an output already in place.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from infergate.models.spec import Tensors
from infergate.offline.executors import Executor
from infergate.offline.lock import claim_staging
from infergate.offline.paths import check_paths
from infergate.offline.progress import Progress
from infergate.offline.readers import Chunk, InputError, Reader, RowError, open_reader
from infergate.offline.state import ResumeError, RunState, identity_of
from infergate.offline.writers import ErrorsFile, Writer, open_writer, publish

__all__ = ["WINDOW", "BadRowError", "RunSettings", "Summary", "run", "staging_of"]

Array = npt.NDArray[Any]
WINDOW = 3  # chunks read ahead of the writer


class BadRowError(Exception):
    """A bad row with ``on_error="stop"``; ``errors`` are the bad rows of the chunk that stopped the run."""

    def __init__(self, errors: list[RowError]) -> None:
        first = errors[0]
        shown = f"row {first.row}" + (f" (id {first.id})" if first.id != first.row else "")
        more = f" (and {len(errors) - 1} more bad row(s) in the same chunk)" if len(errors) > 1 else ""
        super().__init__(f"{shown}: {first.message}{more}")
        self.errors = errors


@dataclass(frozen=True)
class RunSettings:
    input: Path
    output: Path
    chunk_rows: int
    on_error: Literal["skip", "stop"] = "stop"
    errors: Path | None = None  # default with "skip": OUTPUT.errors.jsonl
    id_column: str | None = None
    resume: bool = False


@dataclass
class Summary:
    """What a run did; ``interrupted``: stopped by Ctrl-C (``--resume`` continues)."""

    model: str
    version: str
    output: str
    rows: int = 0  # input rows done in this run (written or bad)
    rows_written: int = 0  # in the whole output, earlier runs included
    bad_rows: int = 0
    seconds: float = 0.0  # scoring, from the first chunk to the last (loading the model not included)
    resumed_from: int = 0
    interrupted: bool = False
    errors_file: str | None = None
    peak_rss_mb: float | None = None  # this process's peak resident memory (Linux)
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Scored:
    ids: Array
    outputs: Tensors
    bad: list[RowError]


def staging_of(output: Path) -> Path:
    """The folder a run on ``output`` stages its files in, and holds while it runs."""
    return output.with_name(output.name + ".partial")


def _errors_path(settings: RunSettings) -> Path | None:
    if settings.errors is not None:
        return settings.errors
    return settings.output.with_name(settings.output.name + ".errors.jsonl") if settings.on_error == "skip" else None


def _prepare(settings: RunSettings, executor: Executor, summary: Summary, created: bool) -> RunState:
    """A fresh state in a staging folder this run ``created``, or the saved one when resuming. Raises ResumeError."""
    staging = staging_of(settings.output)
    fresh = RunState(
        input=str(settings.input.resolve()),
        input_identity=identity_of(settings.input),
        model=executor.spec.name,
        model_version=executor.version,
        model_sha256=executor.digest,
        output_format=settings.output.suffix.lower(),
        chunk_rows=settings.chunk_rows,
        id_column=settings.id_column,
    )
    if created:
        if settings.resume:
            summary.notes.append("nothing to resume: starting from the first row")
        fresh.save(staging)
        return fresh
    if not settings.resume:
        raise ResumeError(f"{staging} holds an unfinished run: pass --resume to continue it, or delete it to restart")
    saved = RunState.load(staging)
    differences = saved.matches(fresh)
    if differences:
        raise ResumeError(f"{staging} belongs to another run ({'; '.join(differences)}); delete it to restart")
    return saved


async def run(settings: RunSettings, executor: Executor, stop: asyncio.Event) -> Summary:
    """Score ``settings.input`` with ``executor`` into ``settings.output``. Raises PathError, InputError,
    ResumeError (StagingInUse when another process runs on the same output), BadRowError, or what the
    executor raises when it cannot go on."""
    errors_path = _errors_path(settings)
    check_paths(settings.input, settings.output, errors_path)  # before anything is created
    staging = staging_of(settings.output)
    reader = await asyncio.to_thread(
        open_reader, settings.input, executor.spec, settings.chunk_rows, settings.id_column
    )
    try:
        writer = open_writer(settings.output, staging, executor.spec, settings.id_column or "row_id")
        with claim_staging(staging) as created:
            return await _run_claimed(settings, executor, stop, reader, writer, errors_path, created)
    finally:
        reader.close()


async def _run_claimed(
    settings: RunSettings,
    executor: Executor,
    stop: asyncio.Event,
    reader: Reader,
    writer: Writer,
    errors_path: Path | None,
    created: bool,
) -> Summary:
    """The run, once it holds the staging folder (which it ``created``, or found)."""
    summary = Summary(executor.spec.name, executor.version or "(server's choice)", str(settings.output))
    staging = staging_of(settings.output)
    try:
        state = _prepare(settings, executor, summary, created)
        errors = None if errors_path is None or state.finished else ErrorsFile(errors_path, state.errors_size)
    except BaseException:
        if created:  # nothing of this run is in it yet
            shutil.rmtree(staging)
        raise
    summary.resumed_from = state.next_row
    if state.finished:  # a crash after the output was built: only its last steps are left
        await asyncio.to_thread(_complete_finished, writer, settings, errors_path, staging, state, summary)
        return summary
    progress = Progress(reader.total_rows, state.next_row)
    started = time.monotonic()
    finished = False
    try:
        writer.resume(state.writer)
        await _pipeline(reader, executor, writer, errors, state, staging, progress, settings, stop)
        summary.interrupted = stop.is_set()
        if not summary.interrupted:
            await asyncio.to_thread(_finish, writer, errors, errors_path, settings, staging, state)
            finished = True
    finally:
        summary.seconds = time.monotonic() - started
        _tally(summary, state, errors_path)
        progress.close()
        writer.close()
        if errors is not None:
            errors.close()
        if not finished and state.chunks == 0 and staging.exists():  # nothing worth resuming
            shutil.rmtree(staging)
    return summary


def _tally(summary: Summary, state: RunState, errors_path: Path | None) -> None:
    """Copy what the state records as done into the summary."""
    summary.rows = state.next_row - summary.resumed_from
    summary.rows_written, summary.bad_rows = state.rows_written, state.bad_rows
    summary.errors_file = str(errors_path) if errors_path is not None and errors_path.exists() else None


def _finish(
    writer: Writer,
    errors: ErrorsFile | None,
    path: Path | None,
    settings: RunSettings,
    staging: Path,
    state: RunState,
) -> None:
    """Build the output, record that the run is finished, then put the output in place (see :func:`_complete`)."""
    writer.build()
    if errors is not None:
        errors.close()
    state.finished = True
    state.save(staging)  # from here on a resume only completes the steps below
    _complete(writer.staged, settings, path, staging)


def _complete(staged: Path, settings: RunSettings, errors_path: Path | None, staging: Path) -> bool:
    """Move the built output into place (unless a crash came after that), drop the default errors file
    when no row went to it, remove the staging folder. True when the output was moved now."""
    moved = staged.exists()
    if moved:
        publish(staged, settings.output)
    elif not settings.output.exists():
        raise ResumeError(
            f"{staging} records a finished run but neither {settings.output} nor {staged} exists; "
            f"delete {staging} to run again"
        )
    if settings.errors is None and errors_path is not None and errors_path.exists():
        if errors_path.stat().st_size == 0:  # the default file, and no bad row
            errors_path.unlink()
    shutil.rmtree(staging)
    return moved


def _complete_finished(
    writer: Writer, settings: RunSettings, errors_path: Path | None, staging: Path, state: RunState, summary: Summary
) -> None:
    """Resuming a run whose output was already built: complete it without rewriting anything."""
    moved = _complete(writer.staged, settings, errors_path, staging)
    _tally(summary, state, errors_path)
    done = f"moved {settings.output} into place" if moved else f"{settings.output} is left as it was"
    summary.notes.append(f"the run was already complete: {done}")


_Item = tuple[Chunk, "asyncio.Task[_Scored]"] | BaseException | None


async def _pipeline(
    reader: Reader,
    executor: Executor,
    writer: Writer,
    errors: ErrorsFile | None,
    state: RunState,
    staging: Path,
    progress: Progress,
    settings: RunSettings,
    stop: asyncio.Event,
) -> None:
    window: asyncio.Queue[_Item] = asyncio.Queue(WINDOW)
    limiter = asyncio.Semaphore(executor.in_flight)
    producer = asyncio.create_task(
        _produce(reader, settings.input, state, executor, limiter, window, stop), name="batch reader"
    )
    try:
        while (item := await window.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            chunk, job = item
            scored = await job
            bad = sorted(chunk.bad + scored.bad, key=lambda e: e.row)
            if bad and settings.on_error == "stop":
                if errors is not None:
                    errors.write(bad)
                    errors.commit()
                raise BadRowError(bad)
            await asyncio.to_thread(_commit, writer, errors, state, staging, chunk, scored, bad)
            progress.update(chunk.stop - chunk.start)
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        while not window.empty():  # chunks read but never written: stop scoring them
            item = window.get_nowait()
            if isinstance(item, tuple):
                item[1].cancel()
                await asyncio.gather(item[1], return_exceptions=True)


async def _produce(
    reader: Reader,
    path: Path,
    state: RunState,
    executor: Executor,
    limiter: asyncio.Semaphore,
    window: asyncio.Queue[_Item],
    stop: asyncio.Event,
) -> None:
    row = state.next_row  # the first row of the chunk being read
    try:
        chunks = reader.chunks(state.next_row, state.reader)
        while not stop.is_set():
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None or stop.is_set():
                break
            row = chunk.stop
            await window.put((chunk, asyncio.create_task(_score(chunk, executor, limiter))))
    except InputError as exc:  # the reader found the file unusable part-way through
        await window.put(exc)
        return
    except Exception as exc:  # what the reader's library raises (pyarrow, zipfile, numpy...): the same, unnamed
        await window.put(_unreadable(path, row, exc))
        return
    await window.put(None)


def _unreadable(path: Path, row: int, error: Exception) -> InputError:
    """An InputError for a reader's unexpected failure at ``row``, chained to it."""
    wrapped = InputError(f"{path}: cannot read the rows from {row}: {error}")
    wrapped.__cause__ = error
    return wrapped


async def _score(chunk: Chunk, executor: Executor, limiter: asyncio.Semaphore) -> _Scored:
    size = executor.batch_size
    slices = [(lo, min(lo + size, chunk.rows)) for lo in range(0, chunk.rows, size)]
    parts = await asyncio.gather(*(_request(chunk, executor, limiter, lo, hi) for lo, hi in slices))
    done = [piece for scored, _ in parts for piece in scored]
    bad = [error for _, failed in parts for error in failed]
    if not done:
        return _Scored(chunk.ids[:0], {}, bad)
    ids = np.concatenate([ids for ids, _ in done])
    names = list(done[0][1])
    return _Scored(ids, {n: np.concatenate([out[n] for _, out in done]) for n in names}, bad)


async def _request(
    chunk: Chunk, executor: Executor, limiter: asyncio.Semaphore, lo: int, hi: int
) -> tuple[list[tuple[Array, Tensors]], list[RowError]]:
    """Rows ``[lo, hi)`` of the chunk as one request; when the model fails on them, each half alone."""
    inputs = {name: array[lo:hi] for name, array in chunk.inputs.items()}
    try:
        async with limiter:
            outputs = await executor.infer(inputs, hi - lo)
        return [(chunk.ids[lo:hi], outputs)], []
    except Exception as exc:
        if not executor.is_row_error(exc):
            raise
        if hi - lo == 1:
            row, row_id = int(chunk.numbers[lo]), chunk.ids[lo]
            return [], [
                RowError(row, row_id.item() if isinstance(row_id, np.generic) else row_id, executor.explain(exc))
            ]
    mid = (lo + hi) // 2
    first, second = await asyncio.gather(
        _request(chunk, executor, limiter, lo, mid), _request(chunk, executor, limiter, mid, hi)
    )
    return first[0] + second[0], first[1] + second[1]


def _commit(
    writer: Writer,
    errors: ErrorsFile | None,
    state: RunState,
    staging: Path,
    chunk: Chunk,
    scored: _Scored,
    bad: list[RowError],
) -> None:
    """Write one chunk, make it durable, then record it (blocking: runs in a worker thread)."""
    writer.write(scored.ids, scored.outputs)
    if errors is not None:
        errors.write(bad)
        state.errors_size = errors.commit()
    state.writer = writer.commit()
    state.next_row, state.reader = chunk.stop, chunk.resume
    state.rows_written += len(scored.ids)
    state.bad_rows += len(bad)
    state.chunks += 1
    state.save(staging)
