"""What every configuration file shares: strict models, YAML reading, and errors that name file and field.

:func:`validate` raises :class:`ConfigError` whose message names the file and
the field path, e.g. ``models/mlp/config.yaml: dynamic_batching.max_queue_size:
Input should be greater than or equal to 1``.

Nothing is coerced: ``true`` or ``"8"`` is not an integer (pydantic's strict
mode), and a key given twice in a mapping is refused by :func:`read_yaml`
(YAML itself would keep the last one and drop the other silently).
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

__all__ = [
    "ConfigError",
    "FieldError",
    "FilePath",
    "Strict",
    "error_loc",
    "explain",
    "is_cross_field",
    "read_yaml",
    "validate",
    "where",
]

M = TypeVar("M", bound=BaseModel)

Loc = tuple[int | str, ...]


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names file and field."""


class FieldError(ValueError):
    """Raised by a model validator (a check across fields) to name the field it is about.

    ``loc`` is relative to the model the validator belongs to, e.g. ``("input",)``
    or ``("ensemble_scheduling", "step", 0, "input_map")``; the error is then
    reported at that path instead of at the model's own.
    """

    def __init__(self, loc: str | Loc, message: str) -> None:
        super().__init__(message)
        self.loc: Loc = (loc,) if isinstance(loc, str) else tuple(loc)


class Strict(BaseModel):
    """Frozen, unknown keys are errors, and nothing is coerced: a mistake in a config is never silently
    ignored or turned into something else (``true`` is not 1, ``"8"`` is not 8, ``8.0`` is not 8)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# A path in a config: YAML gives text, which strict mode would refuse for a Path.
FilePath = Annotated[Path, Field(strict=False)]


class _DuplicateKey(Exception):
    def __init__(self, where: str, line: int, first: int) -> None:
        super().__init__(where)
        self.where, self.line, self.first = where, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a mapping that gives a key twice is refused with both lines.

    Merge keys (``<<: *anchor``) may still be overridden by the mapping's own keys.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # id of a node -> where it is, to name a duplicate key's field
        self._paths: dict[int, tuple[Hashable, ...]] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        parent = self._paths.get(id(node), ())
        seen: dict[Hashable, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class refuses it
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(where((*parent, key)), line, seen[key])
            seen[key] = line
            self._paths.setdefault(id(value_node), (*parent, key))
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        parent = self._paths.get(id(node), ())
        for i, item in enumerate(node.value):
            self._paths.setdefault(id(item), (*parent, i))
        return super().construct_sequence(node, deep=deep)


# A float in exponent form without a dot (1e-05) is a float in YAML 1.2 and in Go's YAML, but a string to
# PyYAML's YAML 1.1 rules; Helm's toYaml writes a float below 1e-4 so (sample_ratio: 0.00001 in values
# renders as 1e-05). Only with a signed exponent, as Go writes every float (1e-05, 1.5e+06): an unsigned
# one stays text as before, such as a commit label 8e12345 or a tag 1e3 in metadata. A quoted "1e-05"
# stays a string.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+][0-9]+$"),
    list("-+.0123456789"),
)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{path}: {exc.where}: duplicate key on line {exc.line} (first on line {exc.first})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def where(loc: tuple[object, ...]) -> str:
    """A field's dotted path, as messages write it."""
    return ".".join(str(part) for part in loc) or "(top level)"


def error_loc(item: ErrorDetails) -> Loc:
    """Where an error is: pydantic's location, made precise by a :class:`FieldError`'s own."""
    cause = item.get("ctx", {}).get("error")
    loc = tuple(item["loc"])
    return (*loc, *cause.loc) if isinstance(cause, FieldError) else loc


def is_cross_field(item: ErrorDetails) -> bool:
    """Whether the error comes from a check across fields (a :class:`FieldError`)."""
    return isinstance(item.get("ctx", {}).get("error"), FieldError)


def explain(path: Path | str, error: ValidationError) -> ConfigError:
    """``error`` as one ``path: field.path: message`` line per problem."""
    return ConfigError("\n".join(f"{path}: {where(error_loc(item))}: {item['msg']}" for item in error.errors()))


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
        raise explain(path, exc) from None
