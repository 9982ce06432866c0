"""Per-element work that a request can make large, done off the event loop when it is large.

BYTES tensors are decoded and encoded one element at a time, and classification
builds one string per class: about a microsecond an element in Python. A request
of a few million elements (a BYTES input with a variable dimension, a wide output
classified) would hold the event loop, and so every other caller, for seconds.
Past :data:`ELEMENTS_ON_LOOP` elements that work runs on a thread instead: the
interpreter still runs one thread at a time, but the event loop takes it back
every switch interval (5 ms) and keeps answering the others. Below it, the work
stays on the loop, where a thread hop would cost more than the work.

Inputs in system shared memory are copied out of their regions as the request
is decoded (``shared_memory.py``). The copy is weighed in elements too, one per
:data:`COPY_BYTES_PER_ELEMENT` bytes: past 1 MiB (about 0.15 ms of copying on
the development VM, the price of the thread hop) it runs on a thread. There the
loop gets the interpreter back at once: the copy runs without it.
"""

from __future__ import annotations

from collections.abc import Mapping

from infergate.models.spec import ModelSpec, Tensors

__all__ = ["COPY_BYTES_PER_ELEMENT", "ELEMENTS_ON_LOOP", "class_strings", "object_elements"]

# About 10-20 ms of per-element work on the development VM.
ELEMENTS_ON_LOOP = 16_384
COPY_BYTES_PER_ELEMENT = 64  # so that ELEMENTS_ON_LOOP elements weigh 1 MiB copied out of shared memory


def object_elements(outputs: Tensors) -> int:
    """Elements of the outputs held as Python objects (BYTES, classification strings): encoded one by one."""
    total = 0
    for array in outputs.values():  # a loop, not sum() over a generator: this runs for every answer
        if array.dtype.kind == "O":
            total += array.size
    return total


def class_strings(outputs: Tensors, counts: Mapping[str, int], spec: ModelSpec) -> int:
    """How many strings classifying ``outputs`` as ``counts`` asks for (rows times classes per row)."""
    total = 0
    for name, count in counts.items():
        array = outputs.get(name)
        if array is None or array.size == 0:
            continue
        rows = array.shape[0] if spec.batches and array.ndim > 0 else 1
        total += rows * min(count, array.size // max(rows, 1))
    return total
