"""``infergate batch``: formats, bad rows, resume after a crash or Ctrl-C, and ``--url`` against a real server.

Most runs call the command's ``main`` in this process (the same code as the
``infergate`` executable); the interruption tests run it as a subprocess and
stop it with a real signal once its state file shows progress.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infergate.cli import main
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.offline.columns import ColumnError, plan_inputs
from infergate.offline.progress import Progress
from infergate.offline.readers import open_reader
from infergate.offline.state import STATE_FILE
from tests.conftest import ServerProcess, eventually, running_server
from tests.models import build_gather_model, build_slow_model, save_model
from tests.test_model_control import add_version

FACTOR = 3.0  # the test model computes y = x * 3
ROWS = 23  # with chunks of 5 rows and requests of 2: chunks and requests both end part-full
Array = npt.NDArray[Any]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offline-models")
    add_version(root, "scale", int(FACTOR))
    save_model(build_gather_model(), root, "gather")
    # About 20-50 ms a batch (by the machine): slow enough that a run of 20 batches cannot finish between the
    # resume tests seeing two chunks committed and their signal arriving.
    save_model(build_slow_model(50), root, "slow", config_yaml="session_options: {intra_op_num_threads: 1}\n")
    return root


def _x(rows: int = ROWS) -> Array:
    return (np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 7).astype(np.float32)


def _batch(repository: Path, *args: str, model: str = "scale") -> int:
    return main(["batch", "--model-repository", str(repository), "--model", model, *args])


def _read(path: Path) -> tuple[list[Any], Array]:
    """(row ids, y) from any output format."""
    if path.suffix == ".npz":
        with np.load(path) as archive:
            return archive["row_id"].tolist(), archive["y"]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        assert json.loads(table.schema.metadata[b"infergate.shape.y"]) == [4]
        ids = table.column(table.column_names[0]).to_pylist()
        return ids, np.array(table.column("y").to_pylist(), dtype=np.float32)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    key = next(iter(lines[0]))
    return [line[key] for line in lines], np.array([line["y"] for line in lines], dtype=np.float32)


def _write_input(path: Path, x: Array) -> None:
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, x)
    elif suffix == ".npz":
        np.savez(path, x=x)
    elif suffix == ".parquet":  # rule 1: one list column named after the input
        pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)}), path)
    elif suffix == ".csv":  # rule 2: x_0..x_3
        rows = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in x)
        path.write_text("x_0,x_1,x_2,x_3\n" + rows)
    else:  # rule 3: a single-input model takes every field of the object, in order
        path.write_text("".join(json.dumps({f"f{i}": float(v) for i, v in enumerate(row)}) + "\n" for row in x))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".parquet", ".csv", ".jsonl"])
def test_each_input_format_is_scored_row_for_row(repository: Path, tmp_path: Path, suffix: str) -> None:
    source, output = tmp_path / f"in{suffix}", tmp_path / "out.parquet"
    _write_input(source, _x())
    code = _batch(repository, "--input", str(source), "--output", str(output), "--chunk-rows", "5", "--batch-size", "2")
    assert code == 0
    ids, y = _read(output)
    assert ids == list(range(ROWS))
    np.testing.assert_allclose(y, _x() * FACTOR, rtol=1e-6)
    assert not output.with_name("out.parquet.partial").exists()


@pytest.mark.parametrize("suffix", [".parquet", ".npz", ".jsonl"])
def test_each_output_format_keeps_the_row_ids(repository: Path, tmp_path: Path, suffix: str) -> None:
    source, output = tmp_path / "in.npz", tmp_path / f"out{suffix}"
    ids = np.arange(1000, 1000 + ROWS, dtype=np.int64)
    np.savez(source, x=_x(), key=ids)
    args = ["--input", str(source), "--output", str(output), "--chunk-rows", "5", "--id-column", "key"]
    code = _batch(repository, *args)
    assert code == 0
    if suffix == ".npz":
        with np.load(output) as archive:
            assert archive.files == ["key", "y"]
            got_ids, y = archive["key"].tolist(), archive["y"]
    else:
        got_ids, y = _read(output)
    assert got_ids == ids.tolist()
    np.testing.assert_allclose(y, _x() * FACTOR, rtol=1e-6)


# --------------------------------------------------------------------------- bad rows


def _bad_csv(path: Path) -> None:
    rows = [",".join(str(v) for v in [f"id{i}", *_x()[i]]) for i in range(ROWS)]
    rows[4] = "id4,1,2,abc,4"  # unparseable value
    rows[9] = "id9,1,2"  # too few fields
    rows[17] = "id17,1,2,3,"  # an empty value
    path.write_text("key,x_0,x_1,x_2,x_3\n" + "\n".join(rows) + "\n")


def test_bad_rows_are_skipped_into_the_errors_file_with_their_row_numbers(repository: Path, tmp_path: Path) -> None:
    source, output, errors = tmp_path / "in.csv", tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    _bad_csv(source)
    args = ["--input", str(source), "--output", str(output), "--chunk-rows", "5", "--id-column", "key"]
    assert _batch(repository, *args, "--on-error", "skip", "--errors", str(errors)) == 0
    reported = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [(e["row"], e["id"]) for e in reported] == [(4, "id4"), (9, 9), (17, "id17")]
    assert reported[0]["error"] == "x_2: cannot read 'abc' as float32"
    assert reported[1]["error"] == "row has 3 field(s); the header has 5"
    assert reported[2]["error"] == "x_3: no value"
    ids, y = _read(output)
    kept = [i for i in range(ROWS) if i not in (4, 9, 17)]
    assert ids == [f"id{i}" for i in kept]
    np.testing.assert_allclose(y, _x()[kept] * FACTOR, rtol=1e-6)


def test_a_bad_row_stops_the_run_by_default_naming_it(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, output = tmp_path / "in.csv", tmp_path / "out.parquet"
    _bad_csv(source)
    code = _batch(repository, "--input", str(source), "--output", str(output), "--chunk-rows", "5")
    assert code == 1
    assert "row 4: x_2: cannot read 'abc' as float32" in capsys.readouterr().err
    assert not output.exists() and not output.with_name("out.parquet.partial").exists()


def test_rows_the_model_fails_on_are_found_and_reported_alone(repository: Path, tmp_path: Path) -> None:
    """The gather model fails on an index outside its table: only those rows fail, not their batch."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    idx = [3, 1, 99, 4, 5, 6, -50, 7]
    source.write_text("".join(json.dumps({"idx": [i]}) + "\n" for i in idx))
    errors = tmp_path / "bad.jsonl"
    args = ["--input", str(source), "--output", str(output), "--batch-size", "4", "--on-error", "skip"]
    assert _batch(repository, *args, "--errors", str(errors), model="gather") == 0
    reported = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [e["row"] for e in reported] == [2, 6]
    assert all(e["error"].startswith("the model failed: ") for e in reported)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    kept = [(0, 3.0), (1, 1.0), (3, 4.0), (4, 5.0), (5, 6.0), (7, 7.0)]
    assert [(line["row_id"], line["y"]) for line in lines] == kept


def test_parquet_nulls_and_wrong_widths_are_bad_rows(repository: Path, tmp_path: Path) -> None:
    source, output, errors = tmp_path / "in.parquet", tmp_path / "out.npz", tmp_path / "bad.jsonl"
    values = [[1.0, 2.0, 3.0, 4.0], None, [1.0, 2.0], [5.0, 6.0, 7.0, 8.0]]
    pq.write_table(pa.table({"x": pa.array(values, pa.list_(pa.float64()))}), source)
    args = ["--input", str(source), "--output", str(output), "--on-error", "skip", "--errors", str(errors)]
    assert _batch(repository, *args) == 0
    assert [json.loads(line)["row"] for line in errors.read_text().splitlines()] == [1, 2]
    ids, y = _read(output)
    assert ids == [0, 3]
    np.testing.assert_allclose(y, np.array([values[0], values[3]]) * FACTOR)


def test_an_input_that_cannot_feed_the_model_is_a_usage_error(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.npy"
    np.save(source, np.zeros((3, 5), dtype=np.float32))
    assert _batch(repository, "--input", str(source), "--output", str(tmp_path / "out.jsonl")) == 2
    assert "x has shape [3, 5]; the model takes [-1, 4]" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume


def _spawn(repository: Path, source: Path, output: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "infergate", "batch", "--model-repository", str(repository), "--model", "slow"]
    command += ["--input", str(source), "--output", str(output), "--chunk-rows", "10", "--batch-size", "5", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows_done(output: Path) -> int:
    try:
        return int(json.loads((output.with_name(output.name + ".partial") / STATE_FILE).read_text())["next_row"])
    except (OSError, ValueError):
        return 0


@pytest.fixture
def slow_input(tmp_path: Path) -> Iterator[tuple[Path, Array]]:
    x = np.random.default_rng(7).random((100, 4), dtype=np.float32)
    source = tmp_path / "in.npy"
    np.save(source, x)
    yield source, x


@pytest.mark.parametrize(
    ("sig", "suffix"), [(signal.SIGKILL, ".jsonl"), (signal.SIGINT, ".parquet"), (signal.SIGKILL, ".npz")]
)
async def test_a_stopped_run_resumes_and_writes_every_row_exactly_once(
    repository: Path, tmp_path: Path, slow_input: tuple[Path, Array], sig: signal.Signals, suffix: str
) -> None:
    """SIGKILL is a crash mid-chunk (the partial chunk must be thrown away); SIGINT a clean stop (exit 130)."""
    source, x = slow_input
    output = tmp_path / f"out{suffix}"
    process = _spawn(repository, source, output)
    try:
        await eventually(lambda: _rows_done(output) >= 20, "two chunks committed")
        os.kill(process.pid, sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), stderr
    stopped_at = _rows_done(output)
    assert 20 <= stopped_at < len(x), "the run finished before it could be stopped"
    assert not output.exists()

    resumed = _spawn(repository, source, output, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    ids, y = _read(output)
    assert ids == list(range(len(x)))  # every row exactly once, in order
    np.testing.assert_array_equal(y, x)  # the slow model returns its input bit for bit


def test_a_leftover_run_must_be_resumed_or_deleted(repository: Path, tmp_path: Path) -> None:
    source, output = tmp_path / "in.npy", tmp_path / "out.jsonl"
    np.save(source, _x())
    staging = output.with_name("out.jsonl.partial")
    staging.mkdir()
    assert _batch(repository, "--input", str(source), "--output", str(output)) == 2
    (staging / STATE_FILE).write_text(json.dumps({"format": 1, "input": "elsewhere"}))
    assert _batch(repository, "--input", str(source), "--output", str(output), "--resume") == 2


# --------------------------------------------------------------------------- remote


@pytest.fixture(scope="module")
def remote(repository: Path, log_dir: Path) -> Iterator[ServerProcess]:
    with running_server(repository, log_dir) as server:
        yield server


def test_url_scores_the_file_on_a_running_server(remote: ServerProcess, tmp_path: Path) -> None:
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    _write_input(source, _x())
    args = ["--input", str(source), "--output", str(output), "--chunk-rows", "5", "--batch-size", "2"]
    assert main(["batch", "--url", remote.url, "--model", "scale", "--concurrency", "3", *args]) == 0
    ids, y = _read(output)
    assert ids == list(range(ROWS))
    np.testing.assert_allclose(y, _x() * FACTOR, rtol=1e-6)


def test_url_finds_the_rows_a_remote_model_fails_on(remote: ServerProcess, tmp_path: Path) -> None:
    source, output, errors = tmp_path / "in.npz", tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    np.savez(source, idx=np.array([[1], [42], [2]], dtype=np.int64))
    args = ["--input", str(source), "--output", str(output), "--on-error", "skip", "--errors", str(errors)]
    assert main(["batch", "--url", remote.url, "--model", "gather", *args]) == 0
    assert [json.loads(line)["row"] for line in errors.read_text().splitlines()] == [1]
    assert [json.loads(line)["row_id"] for line in output.read_text().splitlines()] == [0, 2]


# --------------------------------------------------------------------------- column rules


def _spec(*inputs: tuple[str, str, tuple[int, ...]]) -> ModelSpec:
    tensors = tuple(TensorSpec(n, DATATYPES[d], s) for n, d, s in inputs)
    return ModelSpec("m", 1, tensors, (TensorSpec("y", DATATYPES["FP32"], (-1, 1)),), 8)


@pytest.mark.parametrize(
    ("inputs", "columns", "expected"),
    [
        ([("x", "FP32", (-1, 4))], ["x"], [("x", ("x",), True)]),
        ([("x", "FP32", (-1, 2))], ["id", "x_1", "x_0"], [("x", ("x_0", "x_1"), False)]),
        ([("x", "FP32", (-1, 2))], ["id", "a", "b"], [("x", ("a", "b"), False)]),
        ([("a", "FP32", (-1, 1)), ("b", "BYTES", (-1,))], ["b", "a"], [("a", ("a",), True), ("b", ("b",), True)]),
    ],
)
def test_columns_map_to_inputs_by_name_then_by_element_then_in_order(
    inputs: list[tuple[str, str, tuple[int, ...]]], columns: list[str], expected: list[tuple[str, tuple[str], bool]]
) -> None:
    plans = plan_inputs(_spec(*inputs), columns, "id")
    assert [(p.name, p.columns, p.whole) for p in plans] == expected


@pytest.mark.parametrize(
    ("inputs", "columns", "message"),
    [
        ([("x", "FP32", (-1, 3))], ["a", "b"], "the 2 other column(s) do not make the 3 value(s)"),
        ([("a", "FP32", (-1, 1)), ("b", "FP32", (-1, 1))], ["a"], "no column b"),
        ([("x", "FP32", (-1, -1))], ["x"], "variable dimensions [-1, -1]: read it from .npy or .npz"),
    ],
)
def test_a_table_that_cannot_feed_the_model_says_why(
    inputs: list[tuple[str, str, tuple[int, ...]]], columns: list[str], message: str
) -> None:
    with pytest.raises(ColumnError, match=re.escape(message)):
        plan_inputs(_spec(*inputs), columns, None)


# --------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal, as stderr does in a shell."""

    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_with_rate_and_eta_on_a_terminal() -> None:
    stream = _Terminal()
    progress = Progress(total=1000, initial=100, stream=stream)
    progress.update(400)
    progress.close()
    drawn = stream.getvalue()
    assert "500/1.00k" in drawn and "row/s" in drawn and "00:00<" in drawn  # tqdm's "elapsed<remaining"


def test_progress_prints_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(total=1000, initial=0, stream=stream, interval=0.0)
    progress.update(250)
    progress.close()
    line = stream.getvalue().strip()
    assert line.startswith("infergate batch: 250/1,000 rows (25.0%), ") and "rows/s, ETA " in line


# --------------------------------------------------------------------------- memory


def test_reading_parquet_holds_about_one_row_group_whatever_the_files_size(tmp_path: Path) -> None:
    """Arrow's allocations while 40 row groups of 256 KiB are read, sampled at each chunk, stay at a few
    row groups (pre-buffering every row group held more than the whole file: 16 of its 10 MB)."""
    source = tmp_path / "in.parquet"
    rows, groups = 4096, 40
    x = np.random.default_rng(3).random((rows * groups, 16), dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16)
    pq.write_table(pa.table({"x": column}), source, row_group_size=rows)
    spec = ModelSpec("m", 1, (TensorSpec("x", DATATYPES["FP32"], (-1, 16)),), (), 64)
    del x, column
    before = pa.total_allocated_bytes()
    reader = open_reader(source, spec, chunk_rows=1024)
    held, seen = 0, 0
    for chunk in reader.chunks(0, {}):
        seen += chunk.rows
        held = max(held, pa.total_allocated_bytes() - before)
    reader.close()
    assert seen == rows * groups
    file_bytes = rows * groups * 16 * 4
    assert held < 8 * file_bytes // groups, f"{held} bytes of Arrow memory held for a {file_bytes}-byte file"


# --------------------------------------------------------------------------- the speed benchmark


def test_the_documented_speed_benchmark_runs_and_reports_each_bracketed_run(tmp_path: Path) -> None:
    """docs/offline.md's benchmark, on inputs small enough for the suite (its figures mean nothing here)."""
    out = tmp_path / "offline.json"
    command = [
        sys.executable, "scripts/bench_offline.py", "--workdir", str(tmp_path / "work"), "--out", str(out),
        "--sizes-mb", "1", "2", "--batch-sizes", "8", "32", "--sweep-rows", "256", "--rounds", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr  # 1: a check failed, as it may on inputs this small
    results = json.loads(out.read_text())
    assert results["infergate_batch_size"] == results["sweep"]["best_batch_size"]
    for megabytes, rows in (("1", 512), ("2", 1024)):
        (run,) = results["runs_by_input_mb"][megabytes]
        assert run["rows"] == rows
        assert run["ratio"] == pytest.approx(
            run["samples_per_second"] / ((run["onnxruntime_before"] + run["onnxruntime_after"]) / 2)
        )
    assert set(results["checks"]) == {"throughput_at_least_0.9x", "rss_flat_within_20pct"}
