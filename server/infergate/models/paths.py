"""Files a model's config names (labels, warm-up data, initial state, the model file): kept inside its directory."""

from __future__ import annotations

from pathlib import Path

__all__ = ["named_file"]


def named_file(directory: Path, name: str, what: str) -> Path:
    """``directory / name``, the file a config names for ``what`` (``"warm-up input_data_file"``);
    ValueError when it would lead out of ``directory``: an absolute name, ``..``, a symbolic link out.

    Why: a config can come over the API (RepositoryModelLoad's ``config``), and no file of the host
    outside the model's directory may be read, or its size probed, through one.
    """
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"{what} {name!r} leads out of the {directory.name!r} directory")
    return path
