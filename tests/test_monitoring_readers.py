"""Sample files for ``infergate profile``: every format, and a refusal that names the file and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from monitoring_support import spec, tensor

from infergate.monitoring.readers import SampleError, read_sample

SINGLE = spec(tensor("x", "FP32", -1, 3))
MULTI = spec(tensor("x", "FP32", -1, 2), tensor("id", "INT64", -1), tensor("city", "BYTES", -1, 1))


def test_npy_holds_the_single_input(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.arange(12, dtype=np.float64).reshape(4, 3))
    sample = read_sample(tmp_path / "s.npy", SINGLE)
    assert sample.rows == 4 and sample.inputs["x"].dtype == np.float32


def test_npz_holds_one_array_per_input(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros((2, 2)), id=np.array([1, 2]), city=np.array([["oslo"], ["rome"]]))
    sample = read_sample(path, MULTI)
    assert sample.inputs["city"].dtype == object and sample.inputs["city"].tolist() == [["oslo"], ["rome"]]


def test_parquet_columns_are_the_features_of_a_single_input(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"age": [1.0, 2.0], "income": [3.0, 4.0], "tenure": [5, 6]}), path)
    sample = read_sample(path, SINGLE, progress=False)
    assert sample.inputs["x"].tolist() == [[1, 3, 5], [2, 4, 6]]
    assert sample.feature_names == {"x": ["age", "income", "tenure"]}


def test_csv_columns_are_named_input_or_input_dot_feature(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("x.height,x.weight,id,city\n1.5,60,7,oslo\n1.8,,8,rome\n")
    sample = read_sample(path, MULTI, progress=False)
    assert sample.inputs["x"][0].tolist() == [1.5, 60.0] and np.isnan(sample.inputs["x"][1, 1])
    assert sample.inputs["id"].tolist() == [7, 8] and sample.inputs["city"].tolist() == [["oslo"], ["rome"]]
    assert sample.feature_names["x"] == ["height", "weight"]


def test_max_rows_keeps_the_first_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("a,b,c\n" + "1,2,3\n" * 50)
    assert read_sample(path, SINGLE, max_rows=7, progress=False).rows == 7


@pytest.mark.parametrize(
    ("name", "content", "model", "message"),
    [
        ("s.npy", np.zeros((3, 4)), SINGLE, r"s\.npy: input x has 4 in dimension 1; input x needs 3"),
        ("s.npy", np.zeros(3), SINGLE, r"s\.npy: input x has shape \[3\]; input x needs \[rows, 3\]"),
        ("s.npy", np.zeros((1, 2)), MULTI, r"s\.npy: a \.npy file holds one array, but model m has inputs x, id, city"),
        ("s.npy", np.array([["a", "b", "c"]]), SINGLE, r"s\.npy: input x holds text; input x takes FP32"),
        ("s.npy", np.zeros((2, 3), dtype=np.complex64), SINGLE, r"holds complex64, which does not convert to FP32"),
        ("s.npz", {"x": np.zeros((1, 2)), "bogus": np.zeros(1)}, MULTI, r"s\.npz: keys \['bogus'\] are not inputs"),
        ("s.npz", {"x": np.zeros((1, 2))}, MULTI, r"s\.npz: no array for input\(s\) \['id', 'city'\]"),
        ("s.csv", "a,b\n1,2\n", SINGLE, r"s\.csv: input x has 3 features, but the file has 2 columns for it"),
        ("s.csv", "x.a,x.b,zip,city\n1,2,3,a\n", MULTI, r"s\.csv: column 'zip' matches no input of model m"),
        ("s.csv", "x.a,x.b,id,city\n1,2,3.5,a\n", MULTI, r"s\.csv: column 'id', row 1: '3\.5' is not a INT64"),
        ("s.csv", "x.a,x.b,id,city\n1,2,,a\n", MULTI, r"s\.csv: column 'id', row 1: '' is not a INT64"),
        ("s.csv", "a,b,c\n1,2\n", SINGLE, r"s\.csv: line 2 has 2 fields, the header 3"),
        ("s.csv", "a,a,c\n1,2,3\n", SINGLE, r"s\.csv: columns \['a'\] appear more than once"),
        ("s.csv", "a,b,c\n", SINGLE, r"s\.csv: the sample holds no rows"),
        ("s.txt", "", SINGLE, r"s\.txt: unknown sample format '\.txt'"),
    ],
)
def test_a_sample_that_does_not_fit_is_refused_naming_the_file_and_column(
    tmp_path: Path, name: str, content: object, model: object, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        np.save(path, content)
    with pytest.raises(SampleError, match=message):
        read_sample(path, model, progress=False)  # type: ignore[arg-type]


def test_a_pickled_array_is_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "s.npy"
    np.save(path, np.array([[{"a": 1}, None, 3]], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match=r"s\.npy: cannot read: .*(pickle|Python objects)"):
        read_sample(path, SINGLE)


def test_a_file_that_is_not_parquet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    path.write_text("nope")
    with pytest.raises(SampleError, match=r"s\.parquet: not a readable Parquet file"):
        read_sample(path, SINGLE, progress=False)


def test_a_table_cannot_hold_an_image_input(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("a\n1\n")
    with pytest.raises(SampleError, match=r"input x has shape \[-1, 3, 8, 8\]; a table holds 1-D and 2-D inputs"):
        read_sample(path, spec(tensor("x", "FP32", -1, 3, 8, 8)), progress=False)
