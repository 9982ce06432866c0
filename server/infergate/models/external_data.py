"""The files an ONNX model reads besides its own: the ``location`` of each tensor kept as external data.

Read from the open model file (blocking: call from a thread) without parsing all of it: the walk
follows the protobuf fields where a tensor can be (a graph's initializers, a node's attributes,
subgraphs, functions, training graphs) and skips everything else by its length, the weights of a
model that keeps them inside included. So it costs about one read per node and initializer, not
one pass over the bytes: parsing the graph with onnx, or searching its bytes, would take longer
than hashing them. A small message whose bytes do not spell ``location`` (the key of every external
data entry) is skipped whole.

Every ``location`` entry counts, whatever the tensor's ``data_location`` says: protobuf merges a
message written twice, so deciding tensor by tensor could miss one that onnxruntime reads. A file
that does not follow protobuf's wire format here is searched for ``location`` instead: without it
the model names no file; with it, :class:`UnreadableGraph` is raised rather than a guess.
"""

from __future__ import annotations

import os

__all__ = ["UnreadableGraph", "external_locations"]


class UnreadableGraph(ValueError):
    """The model names external data in a form this walk does not follow; the message says so."""


def external_locations(fd: int, size: int) -> set[str]:
    """The ``location`` of every external data entry of the ONNX model in the open file ``fd`` of ``size``
    bytes (a file onnxruntime's own format, or not a model at all, names none)."""
    found: set[str] = set()
    try:
        _walk(_File(fd), 0, size, _MODEL, found, file_backed=True)
    except (_Malformed, RecursionError):
        if _spells_location(fd):
            raise UnreadableGraph("names external data, but is not a protobuf message this server reads") from None
        return set()  # not a graph at all: onnxruntime says why when it loads it
    return found


# The key of every external data entry (onnx.proto: StringStringEntryProto in TensorProto.external_data).
_LOCATION = b"location"
# A message this small is read whole, and walked only when its bytes spell _LOCATION.
_SMALL = 1 << 16
_WINDOW = 1 << 16  # bytes read at a time while walking a large message field by field

# The messages that can hold a tensor, and in each, the fields that lead to one (onnx.proto's numbers).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _TRAINING, _SPARSE, _TENSOR = range(8)
_LEADS: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t, g, tensors, graphs…
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
}
_EXTERNAL_DATA = 13  # TensorProto.external_data


class _Malformed(Exception):
    pass


class _File:
    """Reads of the open file through a window, so that walking many small fields costs few system calls."""

    def __init__(self, fd: int):
        self._fd = fd
        self._start = 0
        self._window = b""

    def read(self, position: int, count: int) -> bytes:
        offset = position - self._start
        if offset < 0 or offset + count > len(self._window):
            self._window = os.pread(self._fd, max(count, _WINDOW), position)
            self._start, offset = position, 0
        return self._window[offset : offset + count]


class _Bytes:
    def __init__(self, data: bytes):
        self._data = data

    def read(self, position: int, count: int) -> bytes:
        return self._data[position : position + count]


def _walk(source: _File | _Bytes, start: int, end: int, kind: int, found: set[str], file_backed: bool) -> None:
    """Add to ``found`` the locations in the message of ``kind`` at ``[start, end)`` of ``source``."""
    leads = _LEADS.get(kind, {})
    position = start
    while position < end:
        head = source.read(position, 20)  # a key and a length take 15 bytes at most
        key, at = _varint(head, 0)
        number, wire = key >> 3, key & 7
        if wire == 0:
            position += _varint(head, at)[1]
            continue
        if wire in (1, 5):
            position += at + (8 if wire == 1 else 4)
            continue
        if wire != 2:  # groups: no onnx message has one
            raise _Malformed
        length, at = _varint(head, at)
        begin, position = position + at, position + at + length
        if position > end:
            raise _Malformed
        if kind == _TENSOR and number == _EXTERNAL_DATA:
            if (location := _location(source.read(begin, length))) is not None:
                found.add(location)
        elif (lead := leads.get(number)) is not None:
            if file_backed and length <= _SMALL:
                message = source.read(begin, length)
                if _LOCATION in message:
                    _walk(_Bytes(message), 0, length, lead, found, file_backed=False)
            else:
                _walk(source, begin, position, lead, found, file_backed)
    if position != end:
        raise _Malformed


def _location(entry: bytes) -> str | None:
    """The value of a StringStringEntryProto whose key is ``location`` (the last of each field wins)."""
    fields: dict[int, bytes] = {}
    position = 0
    while position < len(entry):
        key, position = _varint(entry, position)
        if key & 7 != 2:
            raise _Malformed
        length, position = _varint(entry, position)
        fields[key >> 3] = entry[position : position + length]
        position += length
    if position != len(entry):
        raise _Malformed
    return os.fsdecode(fields.get(2, b"")) if fields.get(1) == _LOCATION else None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise _Malformed


def _spells_location(fd: int) -> bool:
    """Whether the file's bytes contain ``location`` anywhere (read in chunks that overlap by its length)."""
    position = 0
    while chunk := os.pread(fd, 1 << 20, position):
        if _LOCATION in chunk:
            return True
        if len(chunk) <= len(_LOCATION):
            return False
        position += len(chunk) - len(_LOCATION) + 1
    return False
