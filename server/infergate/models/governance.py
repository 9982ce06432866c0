"""Governance metadata and integrity: who made a version, and are its files the ones they made.

A model's ``config.yaml`` may carry a ``metadata:`` block (owner, source run,
license, ``sha256``…); a version directory may override it field by field with
its own ``metadata.yaml``. At load, :func:`open_verified` resolves the two and
hashes every file the version loads: the model file and the external data files
its graph names (ONNX external data: weights kept beside the graph). ``sha256``
pins them: one digest for a model file alone, or ``sha256sum``'s lines, one per
file, when there are several; a pin that leaves out a file the version loads, or
names one it does not, is refused like a mismatch. A refusal raises
:class:`IntegrityError` (a :class:`ModelLoadError`, so that version does not
load and whatever serves keeps serving); otherwise the version carries its
metadata with ``sha256`` set to the digests computed, pinned or not.

What is hashed is what onnxruntime loads. The model file is hashed through a
descriptor opened once, and every session of the version reads that open file
(``/proc/self/fd/N``; its bytes where there is no such path), never the name
again: a file moved in its place after hashing does not load. The external data
files are opened and hashed in the version's directory, held open too, and
onnxruntime reads them by name in that open directory (its
``session.model_external_initializers_file_folder_path``), so a directory moved
in place of the version's does not count either. What is left, a file written
in place or a name pointed at another file while the version loads, is caught by
:meth:`VerifiedModel.confirm_unchanged`: each file's size, modification and
change times, taken before hashing, must be the same once every session is open
(the change time moves with any write, and with any rename, link or unlink of
the file, so also when its name is given to another file).

Hashing reads every file whole. It runs wherever ``load_model_version`` runs, which
is a worker thread (``asyncio.to_thread`` in the repository, ``infergate check``
and ``infergate batch``); hashlib releases the GIL while it digests, so a large
file does not hold up the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from infergate.configfile import ConfigError, read_yaml, validate
from infergate.models.config import Metadata, ModelConfig
from infergate.models.external_data import UnreadableGraph, external_locations
from infergate.models.paths import named_file
from infergate.models.runner import ModelFile, ModelLoadError

__all__ = [
    "METADATA_FILE",
    "ChecksumMismatch",
    "IntegrityError",
    "MetadataError",
    "VerifiedModel",
    "file_sha256",
    "metadata_parameters",
    "open_verified",
    "resolve_metadata",
    "verify_checksum",
    "verify_version",
]

METADATA_FILE = "metadata.yaml"


class MetadataError(ModelLoadError):
    """A version's metadata.yaml is unreadable or invalid; the message names the file and field."""


class IntegrityError(ModelLoadError):
    """The version's files are not the ones its ``sha256`` pins, or one changed while the version loaded."""


class ChecksumMismatch(IntegrityError):
    """A file's SHA-256 is not the one its metadata names; the message has both digests."""

    def __init__(self, path: Path, expected: str, actual: str):
        super().__init__(f"{path}: sha256 mismatch: metadata expects {expected}, the file has {actual}")
        self.expected = expected
        self.actual = actual


def resolve_metadata(version_dir: Path, config: ModelConfig) -> Metadata:
    """The model's ``metadata:`` block overridden by ``version_dir/metadata.yaml`` when there is one.

    Fields set in metadata.yaml replace the model's; ``labels`` merge key by key.
    Raises :class:`MetadataError` naming the file and field.
    """
    return _resolve(version_dir, config)[0]


def _resolve(version_dir: Path, config: ModelConfig) -> tuple[Metadata, str]:
    """:func:`resolve_metadata`, and where its ``sha256`` is written (``FILE: FIELD``, for messages)."""
    path = version_dir / METADATA_FILE
    base = config.metadata
    in_config = f"{version_dir.parent / 'config.yaml'}: metadata.sha256"
    if not path.is_file():
        return base, in_config
    try:
        override = validate(Metadata, read_yaml(path), path)
    except ConfigError as exc:
        raise MetadataError(str(exc)) from None
    fields = {name: getattr(override, name) for name in override.model_fields_set}
    if "labels" in fields:
        fields["labels"] = {**base.labels, **override.labels}
    return base.model_copy(update=fields), f"{path}: sha256" if "sha256" in fields else in_config


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (blocking: call from a thread)."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verify_checksum(path: Path, expected: str | None, fd: int | None = None) -> str:
    """The file's SHA-256; raises :class:`ChecksumMismatch` when ``expected`` is given and differs.

    ``fd``: the file held open, read from its start instead of opening ``path`` again (``path``
    then only names it in messages). Raises :class:`ModelLoadError` when the file cannot be read.
    """
    try:
        if fd is None:
            actual = file_sha256(path)
        else:
            with open(fd, "rb", closefd=False) as reader:
                actual = hashlib.file_digest(reader, "sha256").hexdigest()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if expected is not None and actual != expected:
        raise ChecksumMismatch(path, expected, actual)
    return actual


def verify_version(model_file: Path, config: ModelConfig) -> Metadata:
    """Resolve the metadata of ``model_file``'s version and check its files' digests: the version's
    metadata with ``sha256`` set to the digests computed. Raises :class:`ModelLoadError`."""
    with open_verified(model_file, config) as verified:
        return verified.metadata


class VerifiedModel:
    """A version's files, hashed and checked against their pin, and held open until closed: ``model`` is
    what onnxruntime must load (``OnnxRunner.load``); ``metadata`` carries the digests."""

    def __init__(self, model: ModelFile, metadata: Metadata, opened: list[_Opened], files: contextlib.ExitStack):
        self.model = model
        self.metadata = metadata
        self._opened = opened
        self._files = files

    def confirm_unchanged(self) -> None:
        """Call once every session is open: raises :class:`IntegrityError` when one of the files was
        written, replaced or moved since it was hashed (a session may then hold other bytes)."""
        for file in self._opened:
            if _stamp(os.fstat(file.fd)) != file.stamp:
                raise IntegrityError(f"{file.path}: changed while the version loaded (written, replaced or "
                                     "moved): load it again")  # fmt: skip

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> VerifiedModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Opened(NamedTuple):
    path: Path
    name: str  # as a pin names it: relative to the version's directory
    fd: int
    stamp: tuple[int, int, int]  # size, modification and change times (ns) when it was opened


def open_verified(model_file: Path, config: ModelConfig) -> VerifiedModel:
    """Open and hash ``model_file`` and the external data files its graph names, and check them against
    the version's ``sha256`` (blocking: call from a thread). Raises :class:`ModelLoadError`: an
    :class:`IntegrityError` naming the file (and, for a pin that does not fit, the field)."""
    metadata, field = _resolve(model_file.parent, config)
    pins = _pins(metadata.sha256, model_file.name)
    files = contextlib.ExitStack()
    try:
        model = _open(files, model_file, None, model_file.name)
        digests = {model_file.name: _hash(model, pins)}
        opened = [model]
        folder = None
        if names := _external_files(model, pins, field):
            directory = model_file.parent
            try:
                directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise ModelLoadError(f"cannot read {directory}: {exc.strerror}") from None
            files.callback(os.close, directory_fd)
            for name in names:
                opened.append(external := _open(files, directory / name, directory_fd, name))
                digests[name] = _hash(external, pins)
            folder = _descriptor_path(directory_fd) or str(directory)
        source = _descriptor_path(model.fd) or os.pread(model.fd, model.stamp[0], 0)
    except BaseException:
        files.close()
        raise
    verified = metadata.model_copy(update={"sha256": _as_pin(digests)})
    return VerifiedModel(ModelFile(model_file, source, folder), verified, opened, files)


def _open(files: contextlib.ExitStack, path: Path, directory_fd: int | None, name: str) -> _Opened:
    """``path`` opened (``name`` in the open ``directory_fd`` when given), closed with ``files``."""
    try:
        if directory_fd is not None:
            named_file(path.parent, name, "external data location")
        fd = os.open(name if directory_fd is not None else path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory_fd)
    except ValueError as exc:
        raise ModelLoadError(f"{path.parent}: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    files.callback(os.close, fd)
    return _Opened(path, name, fd, _stamp(os.fstat(fd)))


def _hash(file: _Opened, pins: Mapping[str, str] | None) -> str:
    """The open file's hex SHA-256, read from its start; raises :class:`ChecksumMismatch` against its pin."""
    return verify_checksum(file.path, pins.get(file.name) if pins else None, file.fd)


def _descriptor_path(fd: int) -> str | None:
    """A name of the open file itself (Linux), which opens it whatever has become of its path since."""
    path = f"/proc/self/fd/{fd}"
    return path if os.path.exists(path) else None


def _pins(sha256: str | None, model_name: str) -> dict[str, str] | None:
    """The pinned digests by file name: one digest alone is the model file's."""
    if sha256 is None:
        return None
    if "  " not in sha256:
        return {model_name: sha256}
    return {name: digest for digest, name in (line.split("  ", 1) for line in sha256.splitlines())}


def _as_pin(digests: Mapping[str, str]) -> str:
    """The digests as ``sha256`` would pin them: the digest alone for a model file alone, else
    ``sha256sum``'s lines, the model file first."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    return "\n".join(f"{digest}  {name}" for name, digest in digests.items())


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _external_files(model: _Opened, pins: Mapping[str, str] | None, field: str) -> list[str]:
    """The external data files the graph names, relative to its directory. With a pin, each must be in it,
    and it must name no other file."""
    if model.path.suffix == ".ort":  # onnxruntime's own format keeps its weights inside
        return []
    try:
        names = sorted({posixpath.normpath(location) for location in external_locations(model.fd, model.stamp[0])})
    except UnreadableGraph as exc:
        raise ModelLoadError(f"{model.path}: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {model.path}: {exc.strerror}") from None
    if pins is None:
        return names
    loaded = [model.path.name, *names]
    how = f"pin every file the version loads, as `sha256sum {' '.join(loaded)}` prints them"
    for name in loaded:
        if name not in pins:
            reads = f", which {model.path.name} reads (external data)" if name != model.path.name else ""
            raise IntegrityError(f"{field}: does not cover {name}{reads}: {how}")
    if others := sorted(pins.keys() - set(loaded)):
        raise IntegrityError(f"{field}: lists {', '.join(others)}, which the version does not load: {how}")
    return names


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
    dropped: it is the digests of the served version's files, which the server computes itself (a
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
