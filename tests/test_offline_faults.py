"""``infergate batch`` when things go wrong below it: input files that fail part-way through (the run must end
with an error naming the file, never wait forever), a process that dies while finishing (a resume must not
undo an output already in place), and paths the run cannot use (refused before anything is scored or created).

The runs go through the real engine and the test model; the crash is a child process that exits the moment the
output is renamed into place.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from infergate.cli import main
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.offline.engine import RunSettings, run
from infergate.offline.executors import LocalExecutor
from infergate.offline.readers import InputError, open_reader
from tests.test_model_control import add_version
from tests.test_offline import _read

Array = npt.NDArray[Any]
FACTOR = 3.0  # the test model computes y = x * 3
ROWS = 23
HANG_GUARD_S = 120.0  # a run that fails must end; this only turns a hang into a failure


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offline-fault-models")
    add_version(root, "scale", int(FACTOR))
    return root


def _x(rows: int = ROWS) -> Array:
    return (np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 7).astype(np.float32)


def _batch(repository: Path, *args: str) -> int:
    return main(["batch", "--model-repository", str(repository), "--model", "scale", *args])


async def _run(repository: Path, source: Path, output: Path, chunk_rows: int, id_column: str | None = None) -> None:
    executor = await LocalExecutor.open(repository, "scale", None, None, None)
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            await run(RunSettings(source, output, chunk_rows, id_column=id_column), executor, asyncio.Event())
    finally:
        await executor.aclose()


# --------------------------------------------------------------------------- inputs failing part-way


def _csv_rows(rows: int) -> bytes:
    return b"x_0,x_1,x_2,x_3\n" + b"1,2,3,4\n" * rows


def _csv_bad_utf8_in_first_block(path: Path) -> str:
    """pyarrow refuses invalid UTF-8 when it decodes a block; the first block is decoded on opening."""
    path.write_bytes(_csv_rows(12) + b"5,6,\xff\xfe,8\n" + b"1,2,3,4\n")
    return f"{path}: row 12, column x_2: CSV conversion error to string: invalid UTF8 data"


def _csv_bad_utf8_in_a_later_block(path: Path) -> str:
    """The reader decodes 1 MiB blocks: 140,000 rows of 8 bytes take two, the bad value is in the second."""
    path.write_bytes(_csv_rows(140_000) + b"5,6,7,\xff\n")
    return f"{path}: row 140000, column x_3: CSV conversion error to string: invalid UTF8 data"


def _npy_truncated(path: Path) -> str:
    np.save(path, _x())
    path.write_bytes(path.read_bytes()[:-3])
    return f"{path}: truncated: the header says {ROWS} rows of 16 bytes; the data holds 22 complete rows"


def _npz_ids_shorter(path: Path) -> str:
    np.savez(path, x=_x(), key=np.arange(10))
    return f"{path}: the id column key has 10 rows; the inputs have {ROWS}"


def _npz_ids_longer(path: Path) -> str:
    np.savez(path, x=_x(), key=np.arange(ROWS + 7))
    return f"{path}: the id column key has {ROWS + 7} rows; the inputs have {ROWS}"


def _npz_corrupt_data(path: Path) -> str:
    """A value of row 1500 flipped: zipfile finds the CRC wrong once it has read the member to its end."""
    np.savez(path, x=_x(2000))
    data = bytearray(path.read_bytes())
    magic = data.index(b"\x93NUMPY")  # x.npy's data: after its .npy header (format 1.0: 10 bytes + the dict)
    start = magic + 10 + int.from_bytes(data[magic + 8 : magic + 10], "little")
    data[start + 16 * 1500] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"{path}: cannot read the rows from "


# case: (input suffix, writes the input and returns the start of the error, --id-column, --chunk-rows)
_BROKEN: dict[str, tuple[str, Callable[[Path], str], str | None, int]] = {
    "csv, invalid UTF-8 in the first block": (".csv", _csv_bad_utf8_in_first_block, None, 5),
    "csv, invalid UTF-8 in a later block": (".csv", _csv_bad_utf8_in_a_later_block, None, 50_000),
    "npy, truncated": (".npy", _npy_truncated, None, 5),
    "npz, id column shorter than the inputs": (".npz", _npz_ids_shorter, "key", 5),
    "npz, id column longer than the inputs": (".npz", _npz_ids_longer, "key", 5),
    "npz, corrupt member data": (".npz", _npz_corrupt_data, None, 100),
}


@pytest.mark.parametrize("case", list(_BROKEN))
async def test_an_input_that_fails_part_way_ends_the_run_naming_the_file(
    repository: Path, tmp_path: Path, case: str
) -> None:
    suffix, write, id_column, chunk_rows = _BROKEN[case]
    source, output = tmp_path / f"in{suffix}", tmp_path / "out.npz"
    message = write(source)
    with pytest.raises(InputError) as raised:
        await _run(repository, source, output, chunk_rows, id_column)
    assert str(raised.value).startswith(message)
    assert not output.exists()


def finish(process: subprocess.Popen[str], guard_s: float = HANG_GUARD_S) -> tuple[int, str]:
    """Wait for ``process`` to end (killed past ``guard_s``, a hang guard); its exit code and stderr."""
    try:
        _, stderr = process.communicate(timeout=guard_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stderr


def test_the_command_exits_with_the_error_when_the_input_fails(tmp_path: Path, repository: Path) -> None:
    source, output = tmp_path / "in.csv", tmp_path / "out.jsonl"
    message = _csv_bad_utf8_in_first_block(source)
    command = [sys.executable, "-m", "infergate", "batch", "--model-repository", str(repository), "--model", "scale"]
    command += ["--input", str(source), "--output", str(output)]
    code, stderr = finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert code == 2, stderr
    assert f"infergate batch: {message}" in stderr


def test_an_npy_file_cut_short_while_it_is_read_names_the_row_it_ends_at(tmp_path: Path) -> None:
    source = tmp_path / "in.npy"
    np.save(source, _x(2000))  # 32 KB: more than the file object's buffer holds
    spec = ModelSpec("scale", 1, (TensorSpec("x", DATATYPES["FP32"], (-1, 4)),), (), 8)
    reader = open_reader(source, spec, chunk_rows=100)
    try:
        chunks = reader.chunks(0, {})
        assert next(chunks).stop == 100
        os.truncate(source, 128 + 16 * 1000 + 3)  # the .npy header, rows 0-999 and 3 bytes of row 1000
        assert [chunk.stop for chunk in itertools.islice(chunks, 9)] == list(range(200, 1001, 100))
        with pytest.raises(InputError, match=re.escape(f"{source}: the data ends in row 1000; the header says 2000")):
            next(chunks)
    finally:
        reader.close()


# --------------------------------------------------------------------------- a crash while finishing

_DIE_AT_RENAME = """
import os, sys
from pathlib import Path
from infergate.cli import main
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec

output, when = Path(sys.argv[1]), sys.argv[2]
real_replace = os.replace

def replace(source, target, *args, **kwargs):
    if Path(target) == output and when == "before":
        os._exit(9)
    real_replace(source, target, *args, **kwargs)
    if Path(target) == output:
        os._exit(9)  # as a SIGKILL or a power cut right after the rename would

os.replace = replace
sys.exit(main(sys.argv[3:]))
"""


def _args(source: Path, output: Path) -> list[str]:
    return ["--input", str(source), "--output", str(output), "--chunk-rows", "5", "--on-error", "skip"]


def _die_while_finishing(repository: Path, source: Path, output: Path, when: str) -> None:
    args = ["batch", "--model-repository", str(repository), "--model", "scale", *_args(source, output)]
    command = [sys.executable, "-c", _DIE_AT_RENAME, str(output), when, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 9, done.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".npz", ".parquet"])
def test_a_run_that_died_after_moving_its_output_into_place_is_complete_on_resume(
    repository: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source, output = tmp_path / "in.npy", tmp_path / f"out{suffix}"
    np.save(source, _x())
    _die_while_finishing(repository, source, output, "after")
    written = output.read_bytes()
    staging, errors = output.with_name(output.name + ".partial"), output.with_name(output.name + ".errors.jsonl")
    assert staging.exists() and errors.exists()

    assert _batch(repository, *_args(source, output), "--resume") == 0
    assert output.read_bytes() == written
    assert "the run was already complete" in capsys.readouterr().err
    assert not staging.exists()
    assert not errors.exists()  # the default errors file, empty: removed as a finished run removes it
    ids, y = _read(output)
    assert ids == list(range(ROWS))
    np.testing.assert_allclose(y, _x() * FACTOR, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".jsonl", ".npz", ".parquet"])
def test_a_run_that_died_just_before_moving_its_output_into_place_finishes_on_resume(
    repository: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source, output = tmp_path / "in.npy", tmp_path / f"out{suffix}"
    np.save(source, _x())
    _die_while_finishing(repository, source, output, "before")
    assert not output.exists()

    assert _batch(repository, *_args(source, output), "--resume") == 0
    assert f"the run was already complete: moved {output} into place" in capsys.readouterr().err
    assert not output.with_name(output.name + ".partial").exists()
    ids, y = _read(output)
    assert ids == list(range(ROWS))
    np.testing.assert_allclose(y, _x() * FACTOR, rtol=1e-6)


# --------------------------------------------------------------------------- paths the run cannot use


def _command(repository: Path, *args: str) -> tuple[int, str]:
    """The real ``infergate batch`` in a child process: its exit code and stderr."""
    command = [sys.executable, "-m", "infergate", "batch", "--model-repository", str(repository), "--model", "scale"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=HANG_GUARD_S)
    return done.returncode, done.stderr


def test_a_summary_file_that_cannot_be_written_is_refused_before_the_run(repository: Path, tmp_path: Path) -> None:
    source, output, summary = tmp_path / "in.npy", tmp_path / "out.jsonl", tmp_path / "missing" / "s.json"
    np.save(source, _x())
    code, stderr = _command(repository, "--input", str(source), "--output", str(output), "--summary", str(summary))
    assert code == 2, stderr
    assert f"infergate batch: --summary {summary}: no directory {summary.parent}" in stderr
    assert "Traceback" not in stderr
    assert not output.exists() and not output.with_name(output.name + ".partial").exists()


def test_a_summary_that_fails_to_be_written_after_the_run_exits_1_with_the_output_in_place(
    repository: Path, tmp_path: Path
) -> None:
    """/dev/full can be opened for writing, but every write to it fails (ENOSPC)."""
    source, output = tmp_path / "in.npy", tmp_path / "out.jsonl"
    np.save(source, _x())
    code, stderr = _command(repository, "--input", str(source), "--output", str(output), "--summary", "/dev/full")
    assert code == 1, stderr
    assert f"infergate batch: {output} is complete, but the summary cannot be written to /dev/full: " in stderr
    assert "Traceback" not in stderr
    ids, y = _read(output)
    assert ids == list(range(ROWS))
    np.testing.assert_allclose(y, _x() * FACTOR, rtol=1e-6)


@pytest.mark.parametrize("where", ["a missing directory", "a directory", "under a file"])
def test_an_errors_file_that_cannot_be_written_is_refused_before_the_staging_folder_exists(
    repository: Path, tmp_path: Path, where: str
) -> None:
    source, output = tmp_path / "in.npy", tmp_path / "out.jsonl"
    np.save(source, _x())
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    errors, message = {
        "a missing directory": (tmp_path / "missing" / "e.jsonl", f"no directory {tmp_path / 'missing'}"),
        "a directory": (tmp_path / "a-dir", "is a directory"),
        "under a file": (tmp_path / "a-file" / "e.jsonl", f"{tmp_path / 'a-file'} is not a directory"),
    }[where]
    args = ["--input", str(source), "--output", str(output), "--on-error", "skip"]
    code, stderr = _command(repository, *args, "--errors", str(errors))
    assert code == 2, stderr
    assert f"infergate batch: --errors {errors}: {message}" in stderr
    assert not output.with_name(output.name + ".partial").exists()
    assert _batch(repository, *args) == 0  # nothing left behind blocks the next run


@pytest.mark.parametrize("spelling", ["the same path", "another path to it"])
def test_an_output_that_is_the_input_file_is_refused_and_the_input_kept(
    repository: Path, tmp_path: Path, spelling: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"x": [float(v) for v in row]}) + "\n" for row in _x()))
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    output = source if spelling == "the same path" else tmp_path / "sub" / ".." / "in.jsonl"
    assert _batch(repository, "--input", str(source), "--output", str(output)) == 2
    assert f"infergate batch: --output {output} is the input file" in capsys.readouterr().err
    assert source.read_bytes() == before
    assert not source.with_name("in.jsonl.partial").exists()


@pytest.mark.parametrize("other", ["input", "output"])
def test_an_errors_file_that_is_the_input_or_the_output_is_refused(
    repository: Path, tmp_path: Path, other: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source, output = tmp_path / "in.npy", tmp_path / "out.jsonl"
    np.save(source, _x())
    before = source.read_bytes()
    errors = source if other == "input" else output
    args = ["--input", str(source), "--output", str(output), "--on-error", "skip", "--errors", str(errors)]
    assert _batch(repository, *args) == 2
    assert f"infergate batch: --errors {errors} is the {other} file" in capsys.readouterr().err
    assert source.read_bytes() == before
    assert not output.exists()
