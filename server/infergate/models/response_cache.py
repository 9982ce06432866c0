"""Triton's response cache: a model that opts in (``response_cache: {enable: true}``) answers a
request it has answered before from memory, without queueing or running it.

One cache per server process (each worker of ``--workers N`` has its own),
bounded in bytes (``response_cache.max_bytes`` in the server config), shared
by every model that opts in and emptied least recently used first. A key is
a version's token and a 128-bit BLAKE2b digest of the request's inputs
(names, types, shapes and bytes), so a reload of the same version number
never answers from the version it replaced: the new one has a token of its
own, and the old one's entries age out. What is kept is every output of the
model, copied out of the batch it came from and made read-only; the outputs a
request asks for, and their classification, are picked per request as for
any answer.

An entry counts against ``max_bytes`` with what it holds in memory, not its
answer's bytes alone: its digest, the dict of its outputs, each array's header
(and a text answer's strings), and a fixed ``ENTRY_OVERHEAD`` for the key and
entry tuples and the LRU's own slot. For a small answer that is most of it:
matmul16's 64 bytes take some 660 (``tests/test_response_cache.py`` checks the
count against what tracemalloc measures).

Hand-written, not a library: an LRU over ``OrderedDict`` is a few lines, and
the cost that matters is the digest (onnxruntime's outputs must be copied
anyway, to be kept apart from their batch).
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numpy as np
import numpy.typing as npt

from infergate.models.datatypes import encode_bytes_tensor
from infergate.models.spec import Tensors

__all__ = ["ENTRY_OVERHEAD", "ResponseCache", "request_digest"]

Key = tuple[Hashable, bytes]
# Per entry, besides its digest, dict and arrays: the key and entry tuples, the size kept with it, and
# the OrderedDict's node and hash-table slot (75 to 105 bytes as the table fills; 96 measured on average).
ENTRY_OVERHEAD = 2 * sys.getsizeof((None, None)) + sys.getsizeof(1 << 20) + 96


def request_digest(inputs: Tensors) -> bytes:
    """A digest of the inputs: each one's name, type, shape and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype == object:  # BYTES: the elements, length-prefixed as on the wire
            digest.update(encode_bytes_tensor(array))
        else:
            digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


class ResponseCache:
    """Outputs by request, at most ``max_bytes`` of them, least recently used out first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, tuple[Tensors, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Tensors | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Key, outputs: Tensors) -> None:
        """Keep a read-only copy of ``outputs``; one larger than the whole cache is not kept."""
        kept = {name: _frozen_copy(array) for name, array in outputs.items()}
        size = ENTRY_OVERHEAD + sys.getsizeof(key[1]) + sys.getsizeof(kept) + sum(map(_size, kept.values()))
        if size > self.max_bytes:
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.bytes -= previous[1]
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._entries[key] = (kept, size)
        self.bytes += size


def _frozen_copy(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    copy = np.array(array, copy=True)  # not a view: a view would keep its whole batch alive
    copy.setflags(write=False)
    return copy


def _size(array: npt.NDArray[Any]) -> int:
    """The memory a kept tensor holds: its header, shape and data (``getsizeof`` counts the data of
    an array that owns it, as a copy does); for text, its strings too (a short string takes some 50
    bytes besides its characters)."""
    size = sys.getsizeof(array)
    if array.dtype == object:
        size += sum(sys.getsizeof(element) for element in array.flat)
    return size
