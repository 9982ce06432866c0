"""The files a batch run writes, checked before it reads a row or creates anything.

A run replaces ``--output`` at its end and truncates ``--errors`` (to what its
state records) at its start, so either one naming the input, or each other,
would destroy a file; and a ``--errors`` or ``--summary`` that cannot be
written would fail a run only once it has begun (or, for the summary, once the
output is in place). :func:`check_paths` refuses all of these up front.

The writability check is a forecast: it finds a missing or wrong folder, not
every failure (a full disk, permissions that root ignores), which the run
still reports when it meets them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PathError", "check_paths", "check_writable", "same_file"]


class PathError(ValueError):
    """A file the run would destroy or cannot write; the message names the option and the path."""


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file, by whatever path (links included)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_writable(path: Path, option: str, created: Path) -> None:
    """Refuse ``path`` when it cannot be a file the run writes. ``created``: the folder the run makes
    itself (the output's), which may not exist yet. Raises :class:`PathError`."""
    if path.is_dir():
        raise PathError(f"{option} {path}: is a directory")
    folder = path.parent
    if folder.resolve() == created.resolve():
        return
    for above in (folder, *folder.parents):  # the nearest folder that exists says why
        if above.exists():
            if not above.is_dir():
                raise PathError(f"{option} {path}: {above} is not a directory")
            break
    if not folder.is_dir():
        raise PathError(f"{option} {path}: no directory {folder}")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise PathError(f"{option} {path}: not writable")


def check_paths(input: Path, output: Path, errors: Path | None, summary: Path | None = None) -> None:
    """Refuse an output, errors or summary file that is the input (or one of the others), or an errors or
    summary file that cannot be written. Raises :class:`PathError`."""
    if same_file(output, input):
        raise PathError(f"--output {output} is the input file: the run would replace it")
    earlier = [(input, "input"), (output, "output")]
    for path, option in ((errors, "--errors"), (summary, "--summary")):
        if path is None:
            continue
        for other, what in earlier:
            if same_file(path, other):
                raise PathError(f"{option} {path} is the {what} file: the run would overwrite it")
        check_writable(path, option, output.parent)
        earlier.append((path, option.removeprefix("--")))
