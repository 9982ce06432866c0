"""Classification labels: the lines of an output's ``label_filename``, read once when a version loads."""

from __future__ import annotations

from pathlib import Path

from infergate.models.config import ModelConfig
from infergate.models.paths import named_file

__all__ = ["load_labels", "output_labels"]


def load_labels(path: Path) -> tuple[str, ...]:
    """The lines of a labels file (line ``i`` labels index ``i``); ValueError naming the file if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"{path}: cannot read labels: {reason}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    return tuple(line.removesuffix("\r") for line in lines)


def output_labels(config: ModelConfig, model_dir: Path) -> dict[str, tuple[str, ...]]:
    """Labels of each output whose config.yaml entry names a ``label_filename`` (relative to ``model_dir``)."""
    labels: dict[str, tuple[str, ...]] = {}
    for output in config.output:
        if output.label_filename is None:
            continue
        path = named_file(model_dir, output.label_filename, f"output {output.name!r}: label_filename")
        labels[output.name] = load_labels(path)
    return labels
