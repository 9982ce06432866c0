"""The ``.npz`` a batch run writes: a real archive that ``np.load`` and ``zipfile`` accept, CRCs included,
continued correctly after a crash that left uncommitted bytes behind."""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.offline import npzfile
from infergate.offline.writers import open_writer

Array = npt.NDArray[Any]


@pytest.mark.parametrize("split", [0, 1, 63, 64, 1000, 4095, 4096])
def test_crc32_combine_agrees_with_crc32_of_the_whole(split: int) -> None:
    data = np.random.default_rng(split).bytes(4096)
    head, tail = data[:split], data[split:]
    assert npzfile.crc32_combine(zlib.crc32(head), zlib.crc32(tail), len(tail)) == zlib.crc32(data)


@pytest.mark.parametrize(("dtype", "inner"), [("<f4", [512]), ("|b1", []), ("<i8", [3, 2]), ("<f2", [7])])
def test_npy_headers_keep_their_size_whatever_the_row_count(dtype: str, inner: list[int]) -> None:
    size = npzfile.npy_header_size(np.dtype(dtype), inner)
    for rows in (0, 1, 10**6, 10**18):
        header = npzfile.npy_header(np.dtype(dtype), inner, rows)
        assert len(header) == size and size % 64 == 0
        empty = np.zeros((0, *inner), dtype=dtype)
        parsed = np.lib.format.read_array_header_2_0(_Bytes(header[8:]))
        assert parsed == ((rows, *inner), False, empty.dtype)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, n: int) -> bytes:
        self.at, chunk = self.at + n, self.data[self.at : self.at + n]
        return chunk


def _spec() -> ModelSpec:
    x = TensorSpec("x", DATATYPES["FP32"], (-1, 4))
    outputs = (
        TensorSpec("flag", DATATYPES["BOOL"], (-1, 1)),
        TensorSpec("embedding", DATATYPES["FP32"], (-1, 64)),  # the most bytes a row: written in place
        TensorSpec("label", DATATYPES["INT32"], (-1,)),
    )
    return ModelSpec("m", 1, (x,), outputs, 8)


def _chunk(lo: int, hi: int) -> tuple[Array, dict[str, Array]]:
    rows = np.arange(lo, hi)
    return rows + 100, {
        "flag": (rows % 3 == 0).reshape(-1, 1),
        "embedding": np.outer(rows, np.arange(64)).astype(np.float32),
        "label": (rows * 7).astype(np.int32),
    }


def test_an_archive_continued_after_a_crash_holds_every_row_once_with_good_crcs(tmp_path: Path) -> None:
    output, staging = tmp_path / "out.npz", tmp_path / "out.npz.partial"
    staging.mkdir()
    first = open_writer(output, staging, _spec(), "row_id")
    first.resume({})
    first.write(*_chunk(0, 10))
    position = json.loads(json.dumps(first.commit()))  # as the state file keeps it
    first.write(*_chunk(10, 20))  # written, never committed: the crash
    first.close()

    second = open_writer(output, staging, _spec(), "row_id")
    second.resume(position)
    second.write(*_chunk(10, 25))
    second.commit()
    second.finish()

    with zipfile.ZipFile(output) as archive:
        assert archive.testzip() is None  # every member's CRC
        assert archive.namelist() == ["row_id.npy", "flag.npy", "embedding.npy", "label.npy"]
    ids, expected = _chunk(0, 25)
    with np.load(output) as loaded:
        np.testing.assert_array_equal(loaded["row_id"], ids)
        for name, array in expected.items():
            np.testing.assert_array_equal(loaded[name], array)
            assert loaded[name].dtype == array.dtype
    assert not (staging / "output.npz").exists()


def test_a_run_without_rows_writes_an_empty_archive(tmp_path: Path) -> None:
    output, staging = tmp_path / "out.npz", tmp_path / "out.npz.partial"
    staging.mkdir()
    writer = open_writer(output, staging, _spec(), "row_id")
    writer.resume({})
    writer.commit()
    writer.finish()
    with np.load(output) as loaded:
        assert loaded.files == []
