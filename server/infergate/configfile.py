"""What every configuration file shares: strict models, YAML reading, and errors that name file and field.

:func:`validate` raises :class:`ConfigError` whose message names the file and
the field path, e.g. ``models/mlp/config.yaml: dynamic_batching.max_queue_size:
Input should be greater than or equal to 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Strict", "read_yaml", "validate"]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names file and field."""


class Strict(BaseModel):
    """Frozen, and unknown keys are errors: a typo in a config is never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _explain(path: Path | str, error: ValidationError) -> ConfigError:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{path}: {where}: {item['msg']}")
    return ConfigError("\n".join(lines))


def validate(kind: type[M], data: Any, path: Path | str) -> M:
    """``data`` (parsed YAML) as ``kind``; None means all defaults.

    ``path`` names the source in messages: a file, or e.g. a request parameter.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc) from None
