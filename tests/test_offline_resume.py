"""``infergate batch --resume`` continues only the run it belongs to: the same model bytes, and one process at a time.

A run records the digest of the model version that scores it; a resume whose model has other bytes under the
same name and version is refused, since its rows would not match those already written. A second process on
the same output is refused at once while the first holds the staging folder (a kernel lock, released however
the holder ends). Every run here is the real command in a child process, stopped with a real signal once its
state file shows progress.
"""

from __future__ import annotations

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
import pytest

from infergate.offline.lock import StagingInUse, claim_staging
from infergate.offline.state import STATE_FILE
from infergate_client import Client
from tests.conftest import ServerProcess, eventually, running_server
from tests.models import build_slow_model, save_model
from tests.test_model_control import add_version
from tests.test_offline import _read
from tests.test_offline_faults import finish

Array = npt.NDArray[Any]
ROWS = 100  # 10 chunks of 10 rows, 20 requests of 5 rows to the slow model
HANG_GUARD_S = 300.0


def _slow_repository(root: Path) -> Path:
    """``slow`` version 1: y = x bit for bit, about 50 ms a request."""
    save_model(build_slow_model(50), root, "slow", config_yaml="session_options: {intra_op_num_threads: 1}\n")
    return root


@pytest.fixture
def slow_input(tmp_path: Path) -> tuple[Path, Array]:
    x = np.random.default_rng(11).random((ROWS, 4), dtype=np.float32)
    source = tmp_path / "in.npy"
    np.save(source, x)
    return source, x


def _spawn(repository: Path, source: Path, output: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "infergate", "batch", "--model-repository", str(repository), "--model", "slow"]
    command += ["--input", str(source), "--output", str(output), "--chunk-rows", "10", "--batch-size", "5", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for ``process`` to end; its exit code and stderr."""
    return finish(process, HANG_GUARD_S)


def _state(output: Path) -> dict[str, Any]:
    return dict(json.loads((output.with_name(output.name + ".partial") / STATE_FILE).read_text()))


def _rows_done(output: Path) -> int:
    try:
        return int(_state(output)["next_row"])
    except (OSError, ValueError):
        return 0


async def _started(process: subprocess.Popen[str], output: Path) -> None:
    """Wait until ``process`` has committed two chunks."""
    await eventually(lambda: _rows_done(output) >= 20 or process.poll() is not None, "two chunks committed")
    assert process.poll() is None, "the run ended before it could be stopped"


async def _crashed_run(repository: Path, source: Path, output: Path) -> None:
    """A run killed (SIGKILL) part-way through: its staging folder is left for a resume."""
    process = _spawn(repository, source, output)
    try:
        await _started(process, output)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        code, stderr = _finish(process)
    assert code == -signal.SIGKILL, stderr
    assert 20 <= _rows_done(output) < ROWS


def _replace(path: Path, content: bytes) -> None:
    aside = path.with_name(path.name + ".new")
    aside.write_bytes(content)
    os.replace(aside, path)


# --------------------------------------------------------------------------- the model's bytes


async def test_a_resume_is_refused_when_the_versions_model_file_changed_and_goes_on_once_it_is_back(
    tmp_path: Path, slow_input: tuple[Path, Array]
) -> None:
    repository = _slow_repository(tmp_path / "models")
    model_file = repository / "slow" / "1" / "model.onnx"
    original = model_file.read_bytes()
    source, x = slow_input
    output = tmp_path / "out.jsonl"
    await _crashed_run(repository, source, output)
    recorded = _state(output)["model_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", recorded)

    _replace(model_file, build_slow_model(51).SerializeToString())  # other bytes, same name and version
    code, stderr = _finish(_spawn(repository, source, output, "--resume"))
    assert code == 2, stderr
    changed = re.search(r"model slow version 1: its sha256 was ([0-9a-f]{64}), now ([0-9a-f]{64})", stderr)
    assert changed is not None, stderr
    assert changed.group(1) == recorded != changed.group(2)
    assert "Traceback" not in stderr
    assert not output.exists()

    _replace(model_file, original)
    code, stderr = _finish(_spawn(repository, source, output, "--resume"))
    assert code == 0, stderr
    ids, y = _read(output)
    assert ids == list(range(ROWS))
    np.testing.assert_array_equal(y, x)


async def test_a_state_that_records_no_model_digest_is_refused_with_how_to_restart(
    tmp_path: Path, slow_input: tuple[Path, Array]
) -> None:
    """A state file of format 2 (written before runs recorded the model's digest) cannot vouch for its rows."""
    repository = _slow_repository(tmp_path / "models")
    source, _ = slow_input
    output = tmp_path / "out.jsonl"
    await _crashed_run(repository, source, output)
    staging = output.with_name(output.name + ".partial")
    state = _state(output)
    del state["model_sha256"]
    (staging / STATE_FILE).write_text(json.dumps(state | {"format": 2}))

    code, stderr = _finish(_spawn(repository, source, output, "--resume"))
    assert code == 2, stderr
    assert f"{staging / STATE_FILE} records no digest of the model" in stderr
    assert f"delete {staging} to start again" in stderr


# --------------------------------------------------------------------------- the model's bytes, with --url


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("offline-resume-models")
    add_version(root, "scale", 3)
    with running_server(root, log_dir) as server:
        yield server


def _stopped_remote_run(remote: ServerProcess, tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    """A --url run of 23 rows in chunks of 5 that stops at a bad row in row 12: two chunks are left to resume."""
    source, output = tmp_path / "in.csv", tmp_path / "out.jsonl"
    if not source.exists():
        rows = ["1,2,3,4"] * 23
        rows[12] = "1,2,oops,4"
        source.write_text("x_0,x_1,x_2,x_3\n" + "\n".join(rows) + "\n")
    command = [sys.executable, "-m", "infergate", "batch", "--url", remote.url, "--model", "scale", "--version", "3"]
    command += ["--input", str(source), "--output", str(output), "--chunk-rows", "5", *args]
    code, stderr = _finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return code, stderr, output


def test_url_records_the_digest_the_server_reports_and_refuses_a_resume_when_it_differs(
    remote: ServerProcess, tmp_path: Path
) -> None:
    code, stderr, output = _stopped_remote_run(remote, tmp_path)
    assert code == 1 and "row 12" in stderr, stderr
    with Client(remote.url, timeout=HANG_GUARD_S) as client:
        served = client.model_config("scale", "3").parameters["sha256"].string_value
    assert _state(output)["model_sha256"] == served

    state_file = output.with_name(output.name + ".partial") / STATE_FILE
    state = _state(output)
    state_file.write_text(json.dumps(state | {"model_sha256": "0" * 64}))  # as if the served file had changed
    code, stderr, _ = _stopped_remote_run(remote, tmp_path, "--resume")
    assert code == 2, stderr
    assert f"model scale version 3: its sha256 was {'0' * 64}, now {served}" in stderr


# --------------------------------------------------------------------------- one process per output


@pytest.mark.parametrize("resume", [True, False], ids=["second with --resume", "second without"])
async def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(
    tmp_path: Path, slow_input: tuple[Path, Array], resume: bool
) -> None:
    """The first run is paused (SIGSTOP) part-way through, so it certainly holds the folder while the second
    starts; continued, it completes with every row exactly once. The command refuses before it loads the
    model; the lock the run takes refuses too, should two runs pass that check at the same moment."""
    repository = _slow_repository(tmp_path / "models")
    source, x = slow_input
    output = tmp_path / "out.parquet"
    first = _spawn(repository, source, output)
    try:
        await _started(first, output)
        os.kill(first.pid, signal.SIGSTOP)
        state_before = _state(output)
        assert not output.exists()

        code, stderr = _finish(_spawn(repository, source, output, *(["--resume"] if resume else [])))
        assert code == 2, stderr
        staging = output.with_name(output.name + ".partial")
        assert f"{staging} is in use by pid {first.pid}" in stderr
        assert _state(output) == state_before  # the second run wrote nothing
        with pytest.raises(StagingInUse, match=re.escape(f"{staging} is in use by pid {first.pid}")):
            with claim_staging(staging):  # what a second run meets when both pass the command's early check
                pass
    finally:
        os.kill(first.pid, signal.SIGCONT)
        code, stderr = _finish(first)
    assert code == 0, stderr
    ids, y = _read(output)
    assert ids == list(range(ROWS))
    np.testing.assert_array_equal(y, x)
