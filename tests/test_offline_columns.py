"""One rule for reading a table's values as an input's datatype, whatever the file: CSV text, JSON values, Parquet
columns (docs/offline.md, "Bad rows").

A number is taken when the datatype holds it: a whole number in range for an integer input (2.0 is 2), 0 or 1
for BOOL, any number for a float input (rounded to the nearest value it holds). Text is read as CSV reads it.
BYTES takes text only. Anything else makes the row bad, and the reason names the column (or list element) and
the value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infergate.cli import main
from infergate.demo import build_multi_io
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.offline.columns import InputPlan, arrow_to_tensors, plan_inputs, records_to_tensors
from tests.models import save_model


def _plans(datatype: str, shape: tuple[int, ...] = (1,)) -> list[InputPlan]:
    inputs = (TensorSpec("v", DATATYPES[datatype], (-1, *shape)),)
    spec = ModelSpec("m", 1, inputs, (TensorSpec("y", DATATYPES["FP32"], (-1, 1)),), 8)
    return plan_inputs(spec, ["v"], None)


def _outcomes(tensors: dict[str, Any], bad: dict[int, str], rows: int) -> list[Any]:
    """Each row's values as a list (one value: the value itself), or the reason it is bad."""
    values = tensors["v"].reshape(rows, -1).tolist()
    return [bad[i] if i in bad else (values[i][0] if len(values[i]) == 1 else values[i]) for i in range(rows)]


def _from_json(values: list[Any], datatype: str, shape: tuple[int, ...] = (1,)) -> list[Any]:
    tensors, bad = records_to_tensors([{"v": v} for v in values], _plans(datatype, shape), None)
    return _outcomes(tensors, bad, len(values))


def _from_arrow(values: list[Any], datatype: str, shape: tuple[int, ...] = (1,)) -> list[Any]:
    kind = pa.array([v for v in values if v is not None]).type  # the type Parquet would hold for these values
    batch = pa.record_batch({"v": pa.array(values, kind)})
    tensors, bad = arrow_to_tensors(batch, _plans(datatype, shape))
    return _outcomes(tensors, bad, len(values))


def _same(got: Any, expected: Any) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(got, float) and math.isnan(got)
    return bool(got == expected and type(got) is type(expected))


NO = "v: cannot read {!r} as {}"  # the reason a value that does not fit gives

VALUES = [
    # BOOL: true/false, 0 and 1, and the text CSV reads as a bool (true/false/1/0 in any case)
    ("BOOL", True, True),
    ("BOOL", False, False),
    ("BOOL", 1, True),
    ("BOOL", 0, False),
    ("BOOL", "false", False),
    ("BOOL", "TRUE", True),
    ("BOOL", "0", False),
    ("BOOL", 5, NO.format(5, "bool")),
    ("BOOL", 0.5, NO.format(0.5, "bool")),
    ("BOOL", "abc", NO.format("abc", "bool")),
    ("BOOL", "yes", NO.format("yes", "bool")),
    # integers: whole numbers in range (a number 2.0 is 2); text as CSV reads it, so "2.0" is not an integer
    ("INT64", 3, 3),
    ("INT64", -3, -3),
    ("INT64", 2.0, 2),
    ("INT64", "12", 12),
    ("INT64", 1.7, NO.format(1.7, "int64")),
    ("INT64", 2.5, NO.format(2.5, "int64")),
    ("INT64", 1e30, NO.format(1e30, "int64")),
    ("INT32", 2**31, NO.format(2**31, "int32")),
    ("INT64", float("nan"), NO.format(float("nan"), "int64")),
    ("INT64", True, NO.format(True, "int64")),
    ("INT64", "1.7", NO.format("1.7", "int64")),
    ("INT64", "2.0", NO.format("2.0", "int64")),
    ("INT8", 127, 127),
    ("INT8", 128, NO.format(128, "int8")),
    ("INT8", -129, NO.format(-129, "int8")),
    ("INT8", "128", NO.format("128", "int8")),
    ("UINT8", 255, 255),
    ("UINT8", -1, NO.format(-1, "uint8")),
    # floats: any number, NaN and infinities included, and the text CSV reads as a number
    ("FP32", 1.5, 1.5),
    ("FP32", 2, 2.0),
    ("FP32", "1.5", 1.5),
    ("FP32", "nan", float("nan")),
    ("FP32", "-inf", -math.inf),
    ("FP32", math.inf, math.inf),
    ("FP32", 1e39, math.inf),  # beyond float32's range, as CSV reads "1e39"
    ("FP32", "1e39", math.inf),
    ("FP32", True, NO.format(True, "float32")),
    ("FP32", "abc", NO.format("abc", "float32")),
    ("FP16", 0.25, 0.25),
    ("FP64", "0.1", 0.1),
    # text: strings only
    ("BYTES", "abc", "abc"),
    ("BYTES", "", ""),
    ("BYTES", 5, NO.format(5, "text")),
    ("BYTES", True, NO.format(True, "text")),
    # no value
    ("FP32", "", "v: no value"),
    ("INT64", None, "v: no value"),
]


@pytest.mark.parametrize(("datatype", "value", "expected"), VALUES)
@pytest.mark.parametrize("read", [_from_json, _from_arrow], ids=["json", "arrow"])
def test_a_value_is_read_by_the_same_rule_from_json_parquet_and_csv(
    read: Any, datatype: str, value: Any, expected: Any
) -> None:
    """Arrow columns are Parquet's; a string column is what CSV reads every value as."""
    alone, beside_a_bad_row = read([value], datatype), read([value, None], datatype)
    assert _same(alone[0], expected), alone
    assert _same(beside_a_bad_row[0], expected), beside_a_bad_row  # the row-by-row path agrees with the column one
    assert beside_a_bad_row[1] == "v: no value"


@pytest.mark.parametrize("read", [_from_json, _from_arrow], ids=["json", "arrow"])
def test_a_list_value_names_the_element_that_cannot_be_read(read: Any) -> None:
    rows = [[1, 2, 3, 4], [1.7, 2, 3, 4], [2.0, 3.0, 4.0, 5.0], [1, 2, 3], [1, 2, 3, 2.5]]
    assert read(rows, "INT64", (4,)) == [
        [1, 2, 3, 4],
        "v[0]: cannot read 1.7 as int64",
        [2, 3, 4, 5],
        "v: 3 value(s) of shape [3]; expected [4]",
        "v[3]: cannot read 2.5 as int64",
    ]


@pytest.mark.parametrize("read", [_from_json, _from_arrow], ids=["json", "arrow"])
def test_a_nested_list_value_names_the_element_by_its_position(read: Any) -> None:
    rows = [[[1, 0], [0, 1]], [[1, 0], [0, 5]], [[0, 0], [1, 1]]]
    assert read(rows, "BOOL", (2, 2)) == [
        [True, False, False, True],
        "v[1][1]: cannot read 5 as bool",
        [False, False, True, True],
    ]


@pytest.mark.parametrize("datatype", ["FP32", "INT64"])
def test_a_null_inside_a_parquet_list_is_no_value(datatype: str) -> None:
    assert _from_arrow([[1.0, None, 3.0], [1.0, 2.0, 3.0]], datatype, (3,)) == ["v[1]: no value", [1, 2, 3]]


def test_json_rows_may_give_a_list_flat_or_nested_and_a_lone_value_bare_or_in_a_list() -> None:
    assert _from_json([[[1, 2], [3, 4]], [5, 6, 7, 8]], "INT32", (2, 2)) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert _from_json([7, [8]], "INT32") == [7, 8]


def test_json_element_columns_name_the_column_like_csv() -> None:
    spec = ModelSpec("m", 1, (TensorSpec("b", DATATYPES["INT64"], (-1, 2)),), (), 8)
    plans = plan_inputs(spec, ["b_0", "b_1"], None)
    tensors, bad = records_to_tensors([{"b_0": 1, "b_1": 2}, {"b_0": 1, "b_1": 1.7}], plans, None)
    assert bad == {1: "b_1: cannot read 1.7 as int64"}
    assert tensors["b"][0].tolist() == [1, 2]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """multi_io: a FP32[4], b INT64[4], flag BOOL[1], text BYTES[2] -> sum = a + b, doubled = 2b, not_flag."""
    root = tmp_path_factory.mktemp("columns-models")
    save_model(build_multi_io(), root, "multi_io", config_yaml="max_batch_size: 16\n")
    return root


def _run(repository: Path, source: Path, tmp_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score ``source`` skipping bad rows: (output lines, errors file lines)."""
    output, errors = tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    args = ["--input", str(source), "--output", str(output), "--on-error", "skip", "--errors", str(errors)]
    assert main(["batch", "--model-repository", str(repository), "--model", "multi_io", *args]) == 0
    return [json.loads(line) for line in output.read_text().splitlines()], [
        json.loads(line) for line in errors.read_text().splitlines()
    ]


def test_json_lines_values_that_do_not_fit_the_input_are_bad_rows(repository: Path, tmp_path: Path) -> None:
    good = {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4], "flag": [True], "text": ["x", "y"]}
    rows = [
        good,
        good | {"b": [1.7, 2, 3, 4]},
        good | {"flag": [5]},
        good | {"b": [1e30, 2, 3, 4]},
        good | {"a": ["1.5", 2, 3, 4], "b": [2.0, 3, 4, 5], "flag": ["false"]},  # all readable
        good | {"flag": ["abc"]},
        good | {"text": ["x", 5]},
        good | {"b": [True, 2, 3, 4]},
        good | {"flag": 0},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scored, errors = _run(repository, source, tmp_path)
    assert [(e["row"], e["error"]) for e in errors] == [
        (1, "b[0]: cannot read 1.7 as int64"),
        (2, "flag: cannot read 5 as bool"),
        (3, "b[0]: cannot read 1e+30 as int64"),
        (5, "flag: cannot read 'abc' as bool"),
        (6, "text[1]: cannot read 5 as text"),
        (7, "b[0]: cannot read True as int64"),
    ]
    assert [(s["row_id"], s["doubled"], s["sum"], s["not_flag"]) for s in scored] == [
        (0, [2, 4, 6, 8], [2, 4, 6, 8], False),
        (4, [4, 6, 8, 10], [3.5, 5, 7, 9], True),
        (8, [2, 4, 6, 8], [2, 4, 6, 8], True),
    ]


def test_parquet_list_values_that_do_not_fit_the_input_are_bad_rows(repository: Path, tmp_path: Path) -> None:
    b = [[1.0, 2.0, 3.0, 4.0], [1.7, 2.0, 3.0, 4.0], [2.5, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]]
    table = pa.table(
        {
            "a": pa.array([[1.0, 2.0, 3.0, 4.0]] * 4, pa.list_(pa.float64())),
            "b": pa.array(b, pa.list_(pa.float64())),
            "flag": pa.array([1, 0, 1, 7]),  # 0 and 1 are a bool's values; 7 is not
            "text": pa.array([["x", "y"]] * 4),
        }
    )
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    scored, errors = _run(repository, source, tmp_path)
    assert [(e["row"], e["error"]) for e in errors] == [
        (1, "b[0]: cannot read 1.7 as int64"),
        (2, "b[0]: cannot read 2.5 as int64"),
        (3, "flag: cannot read 7 as bool"),
    ]
    assert [(s["row_id"], s["doubled"], s["not_flag"]) for s in scored] == [(0, [2, 4, 6, 8], False)]


def test_whole_parquet_columns_of_another_type_that_fit_are_read(repository: Path, tmp_path: Path) -> None:
    """double for INT64 (whole numbers), int64 for BOOL (0 and 1), int64 for FP32: no bad rows."""
    table = pa.table(
        {
            "a": pa.array([[1, 2, 3, 4], [5, 6, 7, 8]], pa.list_(pa.int64())),
            "b": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(8, dtype=np.float64)), 4),
            "flag": pa.array([0, 1]),
            "text": pa.array([["x", "y"], ["z", ""]], pa.list_(pa.large_string())),
        }
    )
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    scored, errors = _run(repository, source, tmp_path)
    assert errors == []
    assert [(s["doubled"], s["sum"], s["not_flag"], s["text_out"]) for s in scored] == [
        ([0, 2, 4, 6], [1, 3, 5, 7], True, ["x", "y"]),
        ([8, 10, 12, 14], [9, 11, 13, 15], False, ["z", ""]),
    ]
