"""Governance metadata and integrity: who made a version, and is its file the one they made.

A model's ``config.yaml`` may carry a ``metadata:`` block (owner, source run,
license, ``sha256``…); a version directory may override it field by field with
its own ``metadata.yaml``. At load, :func:`verify_version` resolves the two and
checks the model file's SHA-256 against ``sha256`` when one is given, before
onnxruntime reads the file. A mismatch raises :class:`ChecksumMismatch` (a
:class:`ModelLoadError`, so that version does not load and whatever serves keeps
serving); otherwise the version carries its metadata with ``sha256`` set to the
digest computed, given or not.

Hashing reads the whole file. It runs wherever ``load_model_version`` runs, which
is a worker thread (``asyncio.to_thread`` in the repository, ``infergate check``
and ``infergate batch``); hashlib releases the GIL while it digests, so a large
file does not hold up the event loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infergate.configfile import ConfigError, read_yaml, validate
from infergate.models.config import Metadata, ModelConfig
from infergate.models.runner import ModelLoadError

__all__ = [
    "METADATA_FILE",
    "ChecksumMismatch",
    "MetadataError",
    "file_sha256",
    "metadata_parameters",
    "resolve_metadata",
    "verify_checksum",
    "verify_version",
]

METADATA_FILE = "metadata.yaml"


class MetadataError(ModelLoadError):
    """A version's metadata.yaml is unreadable or invalid; the message names the file and field."""


class ChecksumMismatch(ModelLoadError):
    """The model file's SHA-256 is not the one its metadata names; the message has both digests."""

    def __init__(self, path: Path, expected: str, actual: str):
        super().__init__(f"{path}: sha256 mismatch: metadata expects {expected}, the file has {actual}")
        self.expected = expected
        self.actual = actual


def resolve_metadata(version_dir: Path, config: ModelConfig) -> Metadata:
    """The model's ``metadata:`` block overridden by ``version_dir/metadata.yaml`` when there is one.

    Fields set in metadata.yaml replace the model's; ``labels`` merge key by key.
    Raises :class:`MetadataError` naming the file and field.
    """
    path = version_dir / METADATA_FILE
    base = config.metadata
    if not path.is_file():
        return base
    try:
        override = validate(Metadata, read_yaml(path), path)
    except ConfigError as exc:
        raise MetadataError(str(exc)) from None
    fields = {name: getattr(override, name) for name in override.model_fields_set}
    if "labels" in fields:
        fields["labels"] = {**base.labels, **override.labels}
    return base.model_copy(update=fields)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (blocking: call from a thread)."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verify_checksum(path: Path, expected: str | None) -> str:
    """The file's SHA-256; raises :class:`ChecksumMismatch` when ``expected`` is given and differs.

    Raises :class:`ModelLoadError` when the file cannot be read.
    """
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if expected is not None and actual != expected:
        raise ChecksumMismatch(path, expected, actual)
    return actual


def verify_version(model_file: Path, config: ModelConfig) -> Metadata:
    """Resolve the metadata of ``model_file``'s version and check its digest: the version's
    metadata with ``sha256`` set to the computed digest. Raises :class:`ModelLoadError`."""
    metadata = resolve_metadata(model_file.parent, config)
    digest = verify_checksum(model_file, metadata.sha256)
    return metadata.model_copy(update={"sha256": digest})


def metadata_parameters(metadata: Metadata) -> dict[str, str]:
    """The metadata as the string parameters of Triton's ModelConfig (unset fields left out).

    ``tags`` are joined with commas; each label ``KEY`` becomes ``label.KEY``.
    """
    params = {name: value for name in _TEXT_PARAMETERS if (value := getattr(metadata, name)) is not None}
    if metadata.tags:
        params["tags"] = ",".join(metadata.tags)
    params.update({f"{_LABEL_PREFIX}{key}": value for key, value in metadata.labels.items()})
    return params


def metadata_from_parameters(params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """What :func:`metadata_parameters` served, read back (a ModelConfig's JSON loaded as an override):
    the ``metadata`` mapping, and the names of the parameters that are not metadata. ``sha256`` is
    dropped: it is the digest of the served version's file, which the server computes itself (a
    checksum to enforce is metadata.yaml's)."""
    metadata: dict[str, Any] = {}
    others: list[str] = []
    for name, value in params.items():
        if name == "sha256":
            continue
        if name in _TEXT_PARAMETERS:
            metadata[name] = value
        elif name == "tags":
            metadata["tags"] = value.split(",") if value else []
        elif name.startswith(_LABEL_PREFIX):
            metadata.setdefault("labels", {})[name.removeprefix(_LABEL_PREFIX)] = value
        else:
            others.append(name)
    return metadata, others


# The metadata fields served as a parameter each, as they are; and the prefix of each label's parameter.
_TEXT_PARAMETERS = ("owner", "description", "source_run", "training_data", "license", "created", "sha256")
_LABEL_PREFIX = "label."
