"""Warm-up at load: data valid for every datatype, Triton's model_warmup samples, and failures that say why.

Pure tables for the feeds, then real onnxruntime loads: a model that parses
its strings loads with the default warm-up, and a warm-up that fails names
each input and the value it was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from models import save_model
from onnx import TensorProto
from triton_models import build_simple

from infergate.models.config import ModelConfig
from infergate.models.datatypes import DATATYPES, encode_bytes_tensor
from infergate.models.runner import ModelLoadError, OnnxRunner
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.models.warmup import describe_feeds, valid_inputs, warmup_runs


def tensor(name: str, datatype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, DATATYPES[datatype], shape)


SPEC = ModelSpec(
    "m",
    1,
    inputs=(tensor("text", "BYTES", -1, 2), tensor("n", "INT8", -1, -1), tensor("flag", "BOOL", -1, 1)),
    outputs=(tensor("y", "FP32", -1, 1),),
    max_batch_size=8,
)


def config(text: str) -> ModelConfig:
    return ModelConfig.model_validate(yaml.safe_load(text) or {})


# --------------------------------------------------------------------------- default warm-up


def test_default_warm_up_data_is_zero_in_each_datatype_and_bytes_get_the_text_zero() -> None:
    feeds = valid_inputs(SPEC, 3)
    assert feeds["text"].tolist() == [["0", "0"]] * 3
    assert feeds["n"].dtype == np.int8 and feeds["n"].shape == (3, 1)  # a variable dim becomes 1
    assert feeds["flag"].tolist() == [[False]] * 3


@pytest.mark.parametrize(
    ("text", "spec_batches", "expected"),
    [
        pytest.param("", True, [("at batch 1", 1, 1)], id="defaults"),
        pytest.param(
            "warmup: {batch_sizes: [1, 4, 100], iterations: 2}",
            True,
            [("at batch 1", 1, 2), ("at batch 4", 4, 2), ("at batch 100", 8, 2)],
            id="sizes past max_batch_size run at it",
        ),
        pytest.param("warmup: {iterations: 0}", True, [], id="off"),
        pytest.param("warmup: {batch_sizes: [4]}", False, [("at batch 1", None, 1)], id="a model that does not batch"),
    ],
)
def test_default_warm_up_runs_one_request_per_batch_size(
    text: str, spec_batches: bool, expected: list[tuple[str, int | None, int]]
) -> None:
    spec = SPEC if spec_batches else ModelSpec("m", 1, (tensor("x", "FP32", 3),), (tensor("y", "FP32", 3),), 0)
    runs = warmup_runs(spec, config(text), Path("unused"))
    got = [(r.name, r.feeds[spec.inputs[0].name].shape[0] if spec.batches else None, r.count) for r in runs]
    assert got == expected


# --------------------------------------------------------------------------- model_warmup samples

SAMPLE = """
model_warmup:
- name: sample
  batch_size: 2
  count: 3
  inputs:
    text: {data_type: TYPE_STRING, dims: [2], zero_data: true}
    n: {data_type: TYPE_INT8, dims: [4], random_data: true}
    flag: {data_type: TYPE_BOOL, dims: [1], input_data_file: flag.bin}
"""


def test_a_model_warmup_sample_gives_each_input_its_data_repeated_for_the_batch(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "flag.bin").write_bytes(b"\x01")
    [run] = warmup_runs(SPEC, config(SAMPLE), tmp_path)
    assert (run.name, run.count) == ("'sample'", 3)
    assert run.feeds["text"].tolist() == [["0", "0"], ["0", "0"]]
    assert run.feeds["n"].shape == (2, 4) and run.feeds["n"].dtype == np.int8
    assert (run.feeds["n"][0] == run.feeds["n"][1]).all()
    assert run.feeds["flag"].tolist() == [[True], [True]]


def test_model_warmup_samples_replace_the_default_warm_up_and_count_zero_runs_once(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "flag.bin").write_bytes(b"\x00")
    runs = warmup_runs(SPEC, config(SAMPLE.replace("count: 3", "count: 0")), tmp_path)
    assert [(r.name, r.count) for r in runs] == [("'sample'", 1)]


def test_a_bytes_input_data_file_holds_length_prefixed_elements(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "text.bin").write_bytes(encode_bytes_tensor(np.array(["12", "-3"], dtype=object)))
    (tmp_path / "warmup" / "flag.bin").write_bytes(b"\x00")
    text = SAMPLE.replace("zero_data: true}", "input_data_file: text.bin}", 1)
    [run] = warmup_runs(SPEC, config(text), tmp_path)
    assert run.feeds["text"].tolist() == [["12", "-3"], ["12", "-3"]]


@pytest.mark.parametrize(
    ("replace", "by", "says"),
    [
        pytest.param(
            "    flag: {data_type: TYPE_BOOL, dims: [1], input_data_file: flag.bin}\n",
            "",
            "missing ['flag']",
            id="an input left out",
        ),
        pytest.param("    n:", "    m:", "unknown ['m']", id="an unknown input"),
        pytest.param(
            "TYPE_INT8", "TYPE_INT16", "input 'n': data_type TYPE_INT16, the model takes TYPE_INT8", id="datatype"
        ),
        pytest.param("dims: [2], zero", "dims: [3], zero", "input 'text': dims [3], the model takes [2]", id="dims"),
        pytest.param("batch_size: 2", "batch_size: 9", "batch_size 9 exceeds max_batch_size 8", id="batch"),
        pytest.param("flag.bin", "nothing.bin", "cannot read", id="a missing file"),
    ],
)
def test_a_sample_that_does_not_fit_the_model_says_what(tmp_path: Path, replace: str, by: str, says: str) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "flag.bin").write_bytes(b"\x01")
    with pytest.raises(ValueError) as refused:
        warmup_runs(SPEC, config(SAMPLE.replace(replace, by)), tmp_path)
    assert says in str(refused.value)


def test_a_sample_for_a_model_that_does_not_batch_has_batch_size_one() -> None:
    spec = ModelSpec("m", 1, (tensor("x", "FP32", 3),), (tensor("y", "FP32", 3),), 0)
    text = "model_warmup: [{name: s, batch_size: 2, inputs: {x: {data_type: TYPE_FP32, dims: [3], zero_data: true}}}]"
    with pytest.raises(ValueError, match="batch_size is 2 but the model does not batch"):
        warmup_runs(spec, config(text), Path("unused"))


@pytest.mark.parametrize(
    ("feeds", "expected"),
    [
        pytest.param({"t": np.full((1, 16), "0", dtype=object)}, "t BYTES [1, 16] = '0' in all 16 elements", id="same"),
        pytest.param({"x": np.zeros((1,), dtype=np.float32)}, "x FP32 [1] = 0.0", id="one element"),
        pytest.param({"x": np.array([1, 2, 3, 4], dtype=np.int64)}, "x INT64 [4] = [1, 2, 3, ...]", id="different"),
        pytest.param(
            {"a": np.zeros((0,), dtype=np.int32), "b": np.array([True])},
            "a INT32 [0] = (empty); b BOOL [1] = True",
            id="two inputs",
        ),
    ],
)
def test_a_description_of_the_feeds_names_each_input_and_its_value(feeds: dict[str, Any], expected: str) -> None:
    assert describe_feeds(feeds) == expected


# --------------------------------------------------------------------------- real loads


def test_a_model_that_parses_its_strings_loads_with_the_default_warm_up(tmp_path: Path) -> None:
    path = save_model(build_simple(TensorProto.STRING, "simple_string"), tmp_path, "simple_string")
    runner = OnnxRunner.load(path, ModelConfig(max_batch_size=8), "simple_string", 1)
    runner.close()


def test_a_failing_warm_up_names_the_sample_each_input_and_its_value(tmp_path: Path) -> None:
    path = save_model(build_simple(TensorProto.STRING, "simple_string"), tmp_path, "simple_string")
    warmup = tmp_path / "simple_string" / "warmup"
    warmup.mkdir()
    (warmup / "words.bin").write_bytes(encode_bytes_tensor(np.array(["seven"] * 16, dtype=object)))
    text = """
max_batch_size: 8
model_warmup:
- name: words
  inputs:
    INPUT0: {data_type: TYPE_STRING, dims: [16], input_data_file: words.bin}
    INPUT1: {data_type: TYPE_STRING, dims: [16], zero_data: true}
"""
    with pytest.raises(ModelLoadError) as refused:
        OnnxRunner.load(path, config(text), "simple_string", 1)
    message = str(refused.value)
    assert message.startswith("warm-up 'words' failed: ")
    assert "INPUT0 BYTES [1, 16] = 'seven' in all 16 elements; INPUT1 BYTES [1, 16] = '0' in all 16 elements" in message


def test_a_sample_that_does_not_fit_fails_the_load_saying_what(tmp_path: Path) -> None:
    path = save_model(build_simple(), tmp_path, "simple")
    text = "model_warmup: [{name: s, inputs: {INPUT0: {data_type: TYPE_INT32, dims: [16], zero_data: true}}}]"
    with pytest.raises(ModelLoadError, match=r"model_warmup 's': give every model input once \(missing \['INPUT1'\]"):
        OnnxRunner.load(path, config(text), "simple", 1)
