"""Governance metadata and integrity: the ``metadata:`` block, per-version overrides, sha256 at load.

The server tests run a real server in explicit model-control mode and read it
with unmodified tritonclient and ``infergate-client models --long``; the
integrity tests run the real ``infergate check`` and the real ``sha256sum``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from infergate.configfile import ConfigError
from infergate.models.config import Metadata, ModelConfig, load_model_config
from infergate.models.governance import (
    ChecksumMismatch,
    IntegrityError,
    MetadataError,
    metadata_parameters,
    open_verified,
    resolve_metadata,
    verify_checksum,
    verify_version,
)
from infergate.models.runner import OnnxRunner
from tests.conftest import ServerProcess, running_server
from tests.test_model_control import add_version, build_scale_model

CLI = Path(sys.executable).parent / "infergate-client"
WRONG = "ab" * 32

CONFIG = """\
metadata:
  owner: fraud-team@example.com
  source_run: mlflow://runs/4f2a
  license: Apache-2.0
  tags: [fraud, tabular]
  created: 2026-11-30
  labels: {team: risk, tier: gold}
"""


# --------------------------------------------------------------------------- config and resolution


def test_the_metadata_block_is_read_with_dates_as_iso_text(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    metadata = load_model_config(path).metadata
    assert metadata.owner == "fraud-team@example.com"
    assert metadata.created == "2026-11-30"
    assert metadata.tags == ["fraud", "tabular"]
    assert metadata.labels == {"team": "risk", "tier": "gold"}


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("metadata: {owner: a, ownr: b}", "metadata.ownr"),
        ("metadata: {sha256: not-a-digest}", "metadata.sha256"),
        ("metadata: {labels: {team: 7}}", "metadata.labels.team"),
        ("metadata: {tags: ['a,b']}", "metadata.tags.0"),
        (f"metadata: {{sha256: {'1' * 64}}}", "metadata.sha256"),
        (f"metadata: {{sha256: '{'a' * 64} model.onnx'}}", "metadata.sha256"),  # sha256sum puts two characters
        (f"metadata: {{sha256: '{'a' * 64}  /etc/model.onnx'}}", "metadata.sha256"),
        (f"metadata: {{sha256: '{'a' * 64}  ../2/model.onnx'}}", "metadata.sha256"),
        (f'metadata: {{sha256: "{"a" * 64}  model.onnx\\n{"b" * 64}  ./model.onnx"}}', "metadata.sha256"),
    ],
)
def test_a_bad_metadata_block_names_the_file_and_field(tmp_path: Path, block: str, field: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(block + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: {field}: "):
        load_model_config(path)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("A" * 64, "a" * 64),  # one digest: the model file's
        (f"{'A' * 64}  model.onnx\n", f"{'a' * 64}  model.onnx"),  # what `sha256sum model.onnx` prints
        (  # binary mode's `*`, and a name as `./` spells it
            f"{'a' * 64} *model.onnx\n{'b' * 64}  ./weights.bin\n",
            f"{'a' * 64}  model.onnx\n{'b' * 64}  weights.bin",
        ),
    ],
)
def test_a_pin_is_one_digest_or_what_sha256sum_prints(given: str, kept: str) -> None:
    assert Metadata(sha256=given).sha256 == kept


def test_a_versions_metadata_yaml_overrides_fields_and_merges_labels(tmp_path: Path) -> None:
    config = ModelConfig(metadata=Metadata(owner="a", license="MIT", labels={"team": "risk", "tier": "gold"}))
    (tmp_path / "metadata.yaml").write_text("owner: b\nlabels: {tier: silver, stage: prod}\n")
    resolved = resolve_metadata(tmp_path, config)
    assert resolved.owner == "b"
    assert resolved.license == "MIT"
    assert resolved.labels == {"team": "risk", "tier": "silver", "stage": "prod"}


def test_without_metadata_yaml_the_models_block_applies(tmp_path: Path) -> None:
    config = ModelConfig(metadata=Metadata(owner="a"))
    assert resolve_metadata(tmp_path, config) == config.metadata


def test_an_invalid_metadata_yaml_is_a_load_error_naming_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "metadata.yaml"
    path.write_text("owner: a\nsha265: abc\n")
    with pytest.raises(MetadataError, match=rf"{path}: sha265: Extra inputs are not permitted"):
        resolve_metadata(tmp_path, ModelConfig())


def test_the_checksum_is_computed_and_a_mismatch_names_both_digests(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"some model bytes")
    actual = hashlib.sha256(b"some model bytes").hexdigest()
    assert verify_checksum(path, None) == actual
    assert verify_checksum(path, actual) == actual
    with pytest.raises(ChecksumMismatch) as caught:
        verify_checksum(path, WRONG)
    assert WRONG in str(caught.value) and actual in str(caught.value)


def test_a_verified_version_carries_the_computed_digest(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"abc")
    metadata = verify_version(path, ModelConfig(metadata=Metadata(owner="a")))
    assert metadata.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert metadata.owner == "a"


def test_parameters_leave_out_unset_fields_join_tags_and_prefix_labels() -> None:
    metadata = Metadata(owner="a", tags=["x", "y"], labels={"team": "risk"}, sha256="A" * 64)
    assert metadata_parameters(metadata) == {"owner": "a", "tags": "x,y", "label.team": "risk", "sha256": "a" * 64}


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def governed(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[tuple[Path, ServerProcess]]:
    """Model ``gov`` with version 1 loaded; version 2 (wrong sha256) is added by the test."""
    root = tmp_path_factory.mktemp("governed")
    add_version(root, "gov", 1)
    (root / "gov" / "config.yaml").write_text(CONFIG)
    (root / "gov" / "1" / "metadata.yaml").write_text("description: scales by 1\nlabels: {tier: silver}\n")
    with running_server(root, log_dir, "--model-control-mode", "explicit", "--load-model", "gov") as server:
        yield root, server


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_config_serves_the_metadata_and_the_computed_digest(governed: tuple[Path, ServerProcess]) -> None:
    root, server = governed
    with grpcclient.InferenceServerClient(server.url) as client:
        config = client.get_model_config("gov", "1").config
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params == {
        "owner": "fraud-team@example.com",
        "description": "scales by 1",
        "source_run": "mlflow://runs/4f2a",
        "license": "Apache-2.0",
        "created": "2026-11-30",
        "tags": "fraud,tabular",
        "label.team": "risk",
        "label.tier": "silver",
        "sha256": _digest(root / "gov" / "1" / "model.onnx"),
    }


def test_a_version_whose_sha256_mismatches_is_refused_and_the_good_one_keeps_serving(
    governed: tuple[Path, ServerProcess],
) -> None:
    root, server = governed
    add_version(root, "gov", 2, build_scale_model(2.0).SerializeToString())
    (root / "gov" / "2" / "metadata.yaml").write_text(f"sha256: {WRONG}\n")
    actual = _digest(root / "gov" / "2" / "model.onnx")
    with grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("gov")
        assert WRONG in refused.value.message() and actual in refused.value.message()

        index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
        assert index[("gov", "2")].state == "UNAVAILABLE"
        assert WRONG in index[("gov", "2")].reason and actual in index[("gov", "2")].reason
        assert index[("gov", "1")].state == "READY"

        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        result = client.infer("gov", [x])
        assert result.get_response().model_version == "1"
        np.testing.assert_array_equal(result.as_numpy("y"), np.ones((1, 4), dtype=np.float32))
        with pytest.raises(InferenceServerException) as named:  # asking for the refused version says why
            client.infer("gov", [x], model_version="2")
        assert named.value.status() == "StatusCode.UNAVAILABLE"
        assert WRONG in named.value.message() and actual in named.value.message()

    listing = subprocess.run(
        [str(CLI), "--url", server.url, "models", "--long"], capture_output=True, text=True, timeout=60, check=False
    )
    assert listing.returncode == 0, listing.stderr
    assert f"    sha256: {_digest(root / 'gov' / '1' / 'model.onnx')}" in listing.stdout
    assert "    owner: fraud-team@example.com" in listing.stdout
    assert f"expects {WRONG}, the file has {actual}" in listing.stdout


# --------------------------------------------------------------------------- external data: every file is pinned

FACTORS = np.array([1, 2, 3, 4], dtype=np.float32)
APPROVED = np.diag(FACTORS)  # y = x * FACTORS
EVIL = np.eye(4, dtype=np.float32) * 666


def save_external_model(directory: Path, weights: npt.NDArray[np.float32] = APPROVED) -> None:
    """``y = x @ W`` for ``x`` FP32 [batch, 4], with ``W`` in ``directory/weights.bin`` (ONNX external data)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, str(directory / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0
    )


def swap_weights(directory: Path, weights: npt.NDArray[np.float32] = EVIL) -> None:
    """Put other weights of the same shape in place of weights.bin; the graph file stays as it is."""
    staging = directory / ".weights.bin"
    staging.write_bytes(weights.tobytes())
    os.replace(staging, directory / "weights.bin")


def sha256sum(directory: Path, *names: str) -> str:
    """What ``sha256sum NAMES`` prints, run in ``directory``."""
    return subprocess.run(["sha256sum", *names], cwd=directory, capture_output=True, text=True, check=True).stdout


def pin(directory: Path, digests: str) -> None:
    """Write ``directory/metadata.yaml`` with ``digests`` (one, or sha256sum's lines) as its ``sha256``."""
    (directory / "metadata.yaml").write_text("sha256: |\n" + textwrap.indent(digests, "  "))


def check(root: Path) -> tuple[int, list[dict[str, Any]]]:
    """The real ``infergate check`` of ``root``: its exit status and its findings."""
    command = [sys.executable, "-m", "infergate", "check", "--model-repository", str(root), "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    return done.returncode, json.loads(done.stdout)["findings"]


def findings_of(findings: list[dict[str, Any]], check: str) -> list[tuple[str, str]]:
    return [(f["level"], f["message"]) for f in findings if f["check"] == check]


def test_a_pin_of_every_file_verifies_and_a_swapped_weights_file_is_refused(tmp_path: Path) -> None:
    version = tmp_path / "ext" / "1"
    save_external_model(version)
    pinned = sha256sum(version, "model.onnx", "weights.bin")
    pin(version, pinned)
    status, findings = check(tmp_path)
    assert status == 0, findings
    assert findings_of(findings, "checksum") == [("ok", f"sha256 {', '.join(pinned.splitlines())} (verified)")]

    approved = pinned.splitlines()[1].split()[0]
    swap_weights(version)
    status, findings = check(tmp_path)
    assert status == 1
    swapped = hashlib.sha256(EVIL.tobytes()).hexdigest()
    assert findings_of(findings, "checksum") == [
        ("error", f"{version / 'weights.bin'}: sha256 mismatch: metadata expects {approved}, the file has {swapped}")
    ]


def test_a_pin_of_the_model_file_alone_does_not_cover_its_external_weights(tmp_path: Path) -> None:
    version = tmp_path / "ext" / "1"
    save_external_model(version)
    pin(version, hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest())
    status, findings = check(tmp_path)
    assert status == 1
    [(level, message)] = findings_of(findings, "checksum")
    assert level == "error"
    assert message.startswith(f"{version / 'metadata.yaml'}: sha256: does not cover weights.bin, which model.onnx")
    assert "sha256sum model.onnx weights.bin" in message


@pytest.mark.parametrize(
    ("listed", "refusal"),
    [
        (("weights.bin",), "does not cover model.onnx"),
        (("model.onnx", "weights.bin", "notes.txt"), "lists notes.txt, which the version does not load"),
    ],
)
def test_a_pin_lists_exactly_the_files_the_version_loads(tmp_path: Path, listed: tuple[str, ...], refusal: str) -> None:
    version = tmp_path / "ext" / "1"
    save_external_model(version)
    (version / "notes.txt").write_text("approved by risk\n")
    pin(version, sha256sum(version, *listed))
    with pytest.raises(IntegrityError, match=rf"^{version / 'metadata.yaml'}: sha256: {refusal}"):
        verify_version(version / "model.onnx", ModelConfig())


def test_the_computed_digest_of_a_model_with_external_weights_is_what_sha256sum_prints(tmp_path: Path) -> None:
    version = tmp_path / "ext" / "1"
    save_external_model(version)
    metadata = verify_version(version / "model.onnx", ModelConfig())
    assert metadata.sha256 == sha256sum(version, "model.onnx", "weights.bin").strip()


def test_external_data_is_found_wherever_a_tensor_can_be(tmp_path: Path) -> None:
    """An initializer, and Constant nodes inside the branches of an If, each in its own file."""

    def constant(output: str, value: float) -> onnx.NodeProto:
        tensor = numpy_helper.from_array(np.full((4, 4), value, dtype=np.float32), f"{output}_value")
        return helper.make_node("Constant", [], [output], value=tensor)

    def branch(output: str, value: float) -> onnx.GraphProto:
        info = helper.make_tensor_value_info(output, TensorProto.FLOAT, [4, 4])
        return helper.make_graph([constant(output, value)], output, [], [info])

    graph = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["k"], then_branch=branch("two", 2), else_branch=branch("three", 3)),
            helper.make_node("MatMul", ["k", "W"], ["y"]),
        ],
        "nested",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(APPROVED, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    version = tmp_path / "nested" / "1"
    version.mkdir(parents=True)
    onnx.save_model(
        model,
        str(version / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,  # each tensor in a file named after it
        size_threshold=0,
        convert_attribute=True,
    )
    files = ["model.onnx", "W", "three_value", "two_value"]
    assert sorted(os.listdir(version)) == sorted(files)
    assert verify_version(version / "model.onnx", ModelConfig()).sha256 == sha256sum(version, *files).strip()


# --------------------------------------------------------------------------- what is hashed is what loads


def instance_outputs(runner: OnnxRunner) -> list[npt.NDArray[Any]]:
    """What each instance's session answers to ``x = ones``."""
    x = {"x": np.ones((1, 4), dtype=np.float32)}
    return [instance.session.run(None, x)[0][0] for instance in runner._instances.instances]


def test_every_instance_reads_the_files_that_were_hashed_though_their_directory_is_replaced(tmp_path: Path) -> None:
    version = tmp_path / "ext" / "1"
    save_external_model(version)
    save_external_model(tmp_path / "other", EVIL)
    config = ModelConfig.model_validate({"max_batch_size": 8, "instance_group": {"count": 3}})
    with open_verified(version / "model.onnx", config) as verified:
        os.rename(version, tmp_path / "ext" / "moved")
        os.rename(tmp_path / "other", version)  # the version's path now names other files
        runner = OnnxRunner.load(verified.model, config, "ext", 1)
        verified.confirm_unchanged()  # none of the files hashed changed
    try:
        assert runner.instance_count == 3
        for output in instance_outputs(runner):
            np.testing.assert_array_equal(output, FACTORS)
    finally:
        runner.close()


def test_weights_swapped_after_they_were_hashed_refuse_the_load(tmp_path: Path) -> None:
    version = tmp_path / "ext" / "1"
    save_external_model(version)
    config = ModelConfig(max_batch_size=8)
    with open_verified(version / "model.onnx", config) as verified:
        swap_weights(version)
        runner = OnnxRunner.load(verified.model, config, "ext", 1)
        try:
            with pytest.raises(IntegrityError, match=rf"^{version / 'weights.bin'}: changed while the version loaded"):
                verified.confirm_unchanged()
        finally:
            runner.close()


def test_a_model_file_replaced_after_it_was_hashed_is_not_loaded_and_the_load_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(build_scale_model(1.0).SerializeToString())
    (tmp_path / "other.onnx").write_bytes(build_scale_model(666.0).SerializeToString())
    config = ModelConfig.model_validate({"max_batch_size": 8, "instance_group": {"count": 2}})
    with open_verified(path, config) as verified:
        os.replace(tmp_path / "other.onnx", path)
        runner = OnnxRunner.load(verified.model, config, "m", 1)
        try:
            for output in instance_outputs(runner):  # every session read the file that was hashed
                np.testing.assert_array_equal(output, np.ones(4, dtype=np.float32))
            with pytest.raises(IntegrityError, match=rf"^{path}: changed while the version loaded"):
                verified.confirm_unchanged()
        finally:
            runner.close()


def test_a_model_file_written_in_place_while_it_loads_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    approved = build_scale_model(1.0).SerializeToString()
    path.write_bytes(approved)
    other = build_scale_model(666.0).SerializeToString()
    assert len(other) == len(approved)
    config = ModelConfig(max_batch_size=8)
    with open_verified(path, config) as verified:
        with path.open("r+b") as file:  # the same file, other bytes: as `cp other.onnx model.onnx` writes
            file.write(other)
        runner = OnnxRunner.load(verified.model, config, "m", 1)
        try:
            with pytest.raises(IntegrityError, match=rf"^{path}: changed while the version loaded"):
                verified.confirm_unchanged()
        finally:
            runner.close()


def test_a_served_model_with_external_weights_serves_its_pinned_files_and_refuses_a_swapped_copy(
    governed: tuple[Path, ServerProcess],
) -> None:
    root, server = governed
    save_external_model(root / "ext" / "1")
    pinned = sha256sum(root / "ext" / "1", "model.onnx", "weights.bin")
    pin(root / "ext" / "1", pinned)
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    with grpcclient.InferenceServerClient(server.url) as client:
        client.load_model("ext")
        np.testing.assert_array_equal(client.infer("ext", [x]).as_numpy("y"), FACTORS[np.newaxis])
        config = client.get_model_config("ext", "1").config
        assert config.parameters["sha256"].string_value == pinned.strip()
        listed = subprocess.run([str(CLI), "--url", server.url, "models", "--long"], capture_output=True,
                                text=True, timeout=60, check=True).stdout  # fmt: skip
        model_line, weights_line = pinned.strip().splitlines()  # one under the other, under the key
        assert f"    sha256: {model_line}\n            {weights_line}\n" in listed, listed

        staging = root / ".ext-2"  # version 2: the same files and pin, other weights
        shutil.copytree(root / "ext" / "1", staging)
        swap_weights(staging)
        os.replace(staging, root / "ext" / "2")
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("ext")
        assert f"{root / 'ext' / '2' / 'weights.bin'}: sha256 mismatch" in refused.value.message()
        result = client.infer("ext", [x])
        assert result.get_response().model_version == "1"
        np.testing.assert_array_equal(result.as_numpy("y"), FACTORS[np.newaxis])
