"""The bytes of an uncompressed ``.npz``: ``.npy`` members in a ZIP64 archive, as ``np.savez`` writes them.

Written by hand rather than with :mod:`zipfile` so that a batch run can write
its largest output straight into the archive, chunk by chunk, and resume it
after a crash: :mod:`zipfile` computes a member's CRC from the bytes it is
given and cannot continue a member, so it would need every output staged
elsewhere and copied once more at the end (a second full write of the output,
a few percent of a run's time). Here the run keeps each member's CRC as it
writes (:func:`zlib.crc32` continues from a previous value), and the headers,
whose sizes are fixed in advance, are filled in when the run finishes.

Every record is the ZIP64 form (APPNOTE 6.3.x, sections 4.3.7, 4.3.12, 4.3.14
to 4.3.16 and 4.5.3), so sizes need no special cases; :mod:`zipfile` and
``np.load`` read it (the tests check that, CRCs included).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Member", "central_directory", "crc32_combine", "local_header", "npy_header", "npy_header_size"]

_NPY_MAGIC = b"\x93NUMPY\x02\x00"  # format 2.0: a 4-byte header length
_NPY_ALIGN = 64
_ROWS_PLACEHOLDER = 10**19  # as many digits as any row count can have
_VERSION = 45  # the version that introduced ZIP64
_MADE_BY = (3 << 8) | _VERSION  # Unix
_UTF8 = 0x800
_UNKNOWN = 0xFFFFFFFF  # "see the ZIP64 extra field"
_DOS_EPOCH = 315_576_000  # 1980-01-02: no earlier time has a DOS date, in any time zone


@dataclass(frozen=True)
class Member:
    name: str  # "y.npy"
    crc: int  # of the member's bytes: .npy header and data
    size: int  # the member's bytes
    offset: int  # of its local header in the archive


def _dict_text(dtype: np.dtype[Any], shape: tuple[int, ...]) -> str:
    descr = np.lib.format.dtype_to_descr(dtype)
    return repr({"descr": descr, "fortran_order": False, "shape": shape})


def npy_header_size(dtype: np.dtype[Any], inner: Sequence[int]) -> int:
    """The bytes :func:`npy_header` takes for any number of rows of ``dtype`` and per-row shape ``inner``."""
    text = _dict_text(dtype, (_ROWS_PLACEHOLDER, *inner))
    unpadded = len(_NPY_MAGIC) + 4 + len(text) + 1
    return -(-unpadded // _NPY_ALIGN) * _NPY_ALIGN


def npy_header(dtype: np.dtype[Any], inner: Sequence[int], rows: int) -> bytes:
    """A ``.npy`` 2.0 header for ``rows`` rows, padded with spaces to :func:`npy_header_size`."""
    size = npy_header_size(dtype, inner)
    text = _dict_text(dtype, (rows, *inner))
    body = text.ljust(size - len(_NPY_MAGIC) - 4 - 1) + "\n"
    return _NPY_MAGIC + struct.pack("<I", len(body)) + body.encode("latin1")


def _dos_time(when: float) -> tuple[int, int]:
    t = time.localtime(max(when, _DOS_EPOCH))
    dos_time = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    return dos_time, ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday


def _flags(name: bytes) -> int:
    return 0 if name.isascii() else _UTF8


def local_header(name: str, crc: int, size: int, when: float) -> bytes:
    """A stored member's local header; its length depends on ``name`` only."""
    raw = name.encode("utf-8")
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size)
    dos_time, dos_date = _dos_time(when)
    fixed = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, _VERSION, _flags(raw), 0, dos_time, dos_date, crc, _UNKNOWN, _UNKNOWN,
        len(raw), len(extra),
    )  # fmt: skip
    return fixed + raw + extra


def central_directory(members: Sequence[Member], at: int, when: float) -> bytes:
    """The central directory starting at offset ``at``, then the ZIP64 end records and the end record."""
    if not members:  # the plain end record, as zipfile writes an empty archive (np.load knows it by it)
        return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0, 0, 0, at, 0)
    dos_time, dos_date = _dos_time(when)
    entries = []
    for member in members:
        raw = member.name.encode("utf-8")
        extra = struct.pack("<HHQQQ", 0x0001, 24, member.size, member.size, member.offset)
        fixed = struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, _MADE_BY, _VERSION, _flags(raw), 0, dos_time, dos_date, member.crc,
            _UNKNOWN, _UNKNOWN, len(raw), len(extra), 0, 0, 0, 0o600 << 16, _UNKNOWN,
        )  # fmt: skip
        entries.append(fixed + raw + extra)
    directory = b"".join(entries)
    count, end64 = len(members), at + len(directory)
    record = struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, _MADE_BY, _VERSION, 0, 0, count, count, len(directory), at
    )  # fmt: skip
    locator = struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _UNKNOWN, _UNKNOWN, 0)
    return directory + record + locator + end


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, column) for column in matrix]


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's ``crc32_combine``).

    Appending ``length2`` zero bytes to ``a`` is a linear map on its CRC; the map
    for 2**k bytes is the map for one byte squared k times (zlib's method). Python's zlib does not expose it.
    """
    operator = [0xEDB88320] + [1 << n for n in range(31)]  # appends one zero bit
    for _ in range(3):
        operator = _gf2_square(operator)  # two, four, then eight zero bits: one zero byte
    while length2 > 0:
        if length2 & 1:
            crc1 = _gf2_times(operator, crc1)
        length2 >>= 1
        if length2:
            operator = _gf2_square(operator)  # twice as many zero bytes
    return crc1 ^ crc2
