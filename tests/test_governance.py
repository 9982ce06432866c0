"""Governance metadata and integrity: the ``metadata:`` block, per-version overrides, sha256 at load.

The server tests run a real server in explicit model-control mode and read it
with unmodified tritonclient and ``infergate-client models --long``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from infergate.configfile import ConfigError
from infergate.models.config import Metadata, ModelConfig, load_model_config
from infergate.models.governance import (
    ChecksumMismatch,
    MetadataError,
    metadata_parameters,
    resolve_metadata,
    verify_checksum,
    verify_version,
)
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
    ],
)
def test_a_bad_metadata_block_names_the_file_and_field(tmp_path: Path, block: str, field: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(block + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: {field}: "):
        load_model_config(path)


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
