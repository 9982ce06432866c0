"""Integers that protobuf's JSON writes as strings, made integers again where Triton's proto says so.

Protobuf's JSON mapping writes a 64-bit integer as a string (``"dims": ["4"]``,
``"model_version": "-1"``): so do tritonclient's ``get_model_config(as_json=True)``
and ``json_format.MessageToDict`` of a parsed config.pbtxt. Its parsers, Triton's
among them, also take a string for any integer field: Triton's own example
client loads ``{"max_batch_size":"16"}`` (an int32). infergate's config models
take real integers only (configfile.Strict), so :func:`integers_from_strings`
turns such strings into integers before validation, in the fields the
``ModelConfig`` descriptor types as integers and nowhere else: a key that is no
field of Triton's proto (config.yaml's own, which a JSON override may carry) and
a value of another shape are left for validation to judge.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from infergate._proto import model_config_pb2 as mc

__all__ = ["integers_from_strings"]

# Every width and signedness (int32, int64, uint32, uint64, and their sint and fixed encodings), as
# protobuf's JSON parsers take them; enums, bools, floats and strings are not integers here.
_INTEGERS = frozenset({
    FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64,
})  # fmt: skip
_INTEGER = re.compile(r"[+-]?[0-9]+")
_MODEL_CONFIG = mc.DESCRIPTOR.message_types_by_name["ModelConfig"]


def integers_from_strings(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` (a ModelConfig in protobuf's JSON, snake_case keys) in which each string that
    spells an integer, in a field the proto types as an integer, is that integer: in nested messages,
    repeated fields and map values too. Everything else is as it was."""
    return _message(data, _MODEL_CONFIG)


def _message(data: dict[str, Any], message: Descriptor) -> dict[str, Any]:
    fields = message.fields_by_name
    return {key: _field(value, fields[key]) if key in fields else value for key, value in data.items()}


def _field(value: Any, field: FieldDescriptor) -> Any:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:  # a map: {key: value}
        if not isinstance(value, dict):
            return value
        return {key: _single(item, entry.fields_by_name["value"]) for key, item in value.items()}
    if field.is_repeated:
        return [_single(item, field) for item in value] if isinstance(value, list) else value
    return _single(value, field)


def _single(value: Any, field: FieldDescriptor) -> Any:
    if field.message_type is not None:
        return _message(value, field.message_type) if isinstance(value, dict) else value
    if field.cpp_type in _INTEGERS and isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return value
