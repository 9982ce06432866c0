"""``infergate check`` finds version directories as the server's loader does: ``01/`` is version 1, and
two directories naming one version (``1/`` and ``01/``) are an error naming both."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from infergate.check import Finding, check_repository
from tests.test_model_control import add_version

ENSEMBLE = """
platform: ensemble
max_batch_size: 8
input: [{name: INPUT, data_type: TYPE_FP32, dims: [4]}]
output: [{name: OUTPUT, data_type: TYPE_FP32, dims: [4]}]
ensemble_scheduling:
  step:
    - {model_name: scale, model_version: 1, input_map: {x: INPUT}, output_map: {y: OUTPUT}}
"""


def _zero_padded(root: Path, model: str) -> Path:
    """Version 1 of ``model`` in a directory named ``01``."""
    add_version(root, model, 1)
    padded = root / model / "01"
    (root / model / "1").rename(padded)
    return padded


def _found(findings: list[Finding], check: str, level: str) -> list[Finding]:
    return [f for f in findings if f.check == check and f.level == level]


async def test_a_version_directory_named_01_is_checked_as_version_1(tmp_path: Path) -> None:
    padded = _zero_padded(tmp_path, "scale")
    digest = hashlib.sha256((padded / "model.onnx").read_bytes()).hexdigest()
    (padded / "metadata.yaml").write_text(f"sha256: {digest}\n")  # read from 01/: the checksum is verified

    report = await check_repository(tmp_path, smoke=True)

    assert report.ok, report.as_table()
    assert [(f.model, f.version) for f in _found(report.findings, "load", "ok")] == [("scale", "1")]
    [checksum] = _found(report.findings, "checksum", "ok")
    assert checksum.message.endswith("(verified)")
    assert [f.version for f in _found(report.findings, "smoke", "ok")] == ["1"]


async def test_an_ensemble_version_in_an_01_directory_passes(tmp_path: Path) -> None:
    add_version(tmp_path, "scale", 1)
    (tmp_path / "pipeline" / "01").mkdir(parents=True)
    (tmp_path / "pipeline" / "config.yaml").write_text(ENSEMBLE)

    report = await check_repository(tmp_path)

    assert report.ok, report.as_table()
    [ensemble] = _found(report.findings, "ensemble", "ok")
    assert (ensemble.model, ensemble.version) == ("pipeline", "1")


async def test_two_directories_naming_one_version_are_an_error_naming_both(tmp_path: Path) -> None:
    add_version(tmp_path, "scale", 1)
    add_version(tmp_path, "scale", 2)
    shutil.copytree(tmp_path / "scale" / "1", tmp_path / "scale" / "01")
    (tmp_path / "pipeline" / "1").mkdir(parents=True)
    (tmp_path / "pipeline" / "001").mkdir()
    (tmp_path / "pipeline" / "config.yaml").write_text(ENSEMBLE)

    report = await check_repository(tmp_path)

    assert not report.ok
    errors = {(f.model, f.check, f.message) for f in report.findings if f.level == "error"}
    scale, pipeline = tmp_path / "scale", tmp_path / "pipeline"
    refused = "the server loads no version of this model"
    assert errors == {
        (
            "scale",
            "version-policy",
            f"{scale}: version 1 is named by 2 directories: {scale / '01'}, {scale / '1'}; {refused}",
        ),
        (
            "pipeline",
            "version-policy",
            f"{pipeline}: version 1 is named by 2 directories: {pipeline / '001'}, {pipeline / '1'}; {refused}",
        ),
    }
    # As the server refuses the model's load, no version of it is loaded: nothing else is reported of it.
    assert [f for f in report.findings if f.model == "scale" and f.check in ("load", "checksum")] == []
