"""Triton's classification extension as pure functions: the parameter, the strings, the labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument
from infergate.models.config import ModelConfig, OutputConfig
from infergate.models.datatypes import DATATYPES
from infergate.models.labels import load_labels, output_labels
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.serving.classification import classification_counts, classify, classify_outputs

Requested = pb.ModelInferRequest.InferRequestedOutputTensor


def requested(name: str, **parameter: Any) -> Requested:
    output = Requested(name=name)
    for kind, value in parameter.items():
        setattr(output.parameters["classification"], kind, value)
    return output


def test_outputs_that_ask_for_classes_are_counted() -> None:
    outputs = [requested("scores", int64_param=3), requested("raw"), requested("other", int64_param=1)]
    assert classification_counts(outputs) == {"scores": 3, "other": 1}


@pytest.mark.parametrize(
    ("parameter", "says"),
    [
        pytest.param(
            {"string_param": "3"},
            "invalid value type for 'classification' parameter, expected int64_param",
            id="string",
        ),
        pytest.param(
            {"int64_param": 0},
            "invalid value for 'classification' parameter, expected >= 0 (output 's' asks for 0",
            id="0",
        ),
        pytest.param({"int64_param": -2}, "expected >= 0 (output 's' asks for -2", id="negative"),
    ],
)
def test_a_bad_classification_parameter_is_refused_in_triton_s_words(parameter: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        classification_counts([requested("s", **parameter)])
    assert says in refused.value.message


@pytest.mark.parametrize(
    ("scores", "count", "labels", "batches", "expected"),
    [
        pytest.param(
            np.array([1.1, 3.3, 0.5, 2.4], dtype=np.float32),
            2,
            (),
            False,
            ["3.300000:1", "2.400000:3"],
            id="Triton's example: six decimals, as std::to_string prints",
        ),
        pytest.param(
            np.array([1.1, 3.3, 0.5, 2.4], dtype=np.float32),
            2,
            ("index_0", "index_1", "index_2", "index_3"),
            False,
            ["3.300000:1:index_1", "2.400000:3:index_3"],
            id="with labels",
        ),
        pytest.param(
            np.array([1, 5, 10, 4], dtype=np.uint32), 4, (), False, ["10:2", "5:1", "4:3", "1:0"], id="integers"
        ),
        pytest.param(np.array([-3, -1], dtype=np.int8), 5, (), False, ["-1:1", "-3:0"], id="count above n: all"),
        pytest.param(
            np.array([2.0, 7.0, 7.0, 2.0], dtype=np.float64),
            3,
            (),
            False,
            ["7.000000:1", "7.000000:2", "2.000000:0"],
            id="ties by lower index",
        ),
        pytest.param(
            np.array([0.5, np.nan, 0.25], dtype=np.float32),
            3,
            (),
            False,
            ["0.500000:0", "0.250000:2", "nan:1"],
            id="NaN last",
        ),
        pytest.param(
            np.array([0.1, 0.9, 0.3], dtype=np.float32),
            2,
            ("a", "", "c"),
            False,
            ["0.900000:1", "0.300000:2:c"],
            id="an empty label line means no label",
        ),
        pytest.param(
            np.array([0.1, 0.9, 0.3], dtype=np.float32),
            1,
            ("only_zero",),
            False,
            ["0.900000:1"],
            id="an index past the labels has none",
        ),
    ],
)
def test_classes_are_triton_s_score_index_label_strings(
    scores: np.ndarray[Any, Any], count: int, labels: tuple[str, ...], batches: bool, expected: list[str]
) -> None:
    assert classify(scores, count, labels, batches).tolist() == expected


def test_a_batching_model_gets_classes_per_row_over_the_row_s_elements() -> None:
    scores = np.array([[[1, 9], [3, 4]], [[8, 2], [0, 7]]], dtype=np.int32)  # [batch 2, 2, 2]
    classes = classify(scores, 2, (), batches=True)
    assert classes.shape == (2, 2)
    assert classes.tolist() == [["9:1", "4:3"], ["8:0", "7:3"]]


def test_a_model_that_does_not_batch_classifies_its_whole_output() -> None:
    scores = np.array([[0.1], [0.7], [0.2]], dtype=np.float32)  # shape [3, 1], like [1000, 1, 1]
    assert classify(scores, 1, (), batches=False).tolist() == ["0.700000:1"]


@pytest.mark.parametrize(
    ("scores", "type_name"),
    [
        pytest.param(np.array([True, False]), "BOOL", id="bool"),
        pytest.param(np.array([1.0], dtype=np.float16), "FP16", id="fp16"),
        pytest.param(np.array(["a"], dtype=object), "BYTES", id="bytes"),
    ],
)
def test_outputs_triton_cannot_classify_are_refused(scores: np.ndarray[Any, Any], type_name: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        classify(scores, 1, (), batches=False)
    assert refused.value.message == f"class result not available for output due to unsupported type '{type_name}'"


def test_only_the_outputs_asked_for_are_replaced() -> None:
    spec = ModelSpec(
        "m",
        1,
        inputs=(TensorSpec("x", DATATYPES["FP32"], (-1, 3)),),
        outputs=(TensorSpec("p", DATATYPES["FP32"], (-1, 3)), TensorSpec("q", DATATYPES["FP32"], (-1, 3))),
        max_batch_size=4,
    )
    scores = np.array([[0.2, 0.5, 0.3]], dtype=np.float32)
    out = classify_outputs({"p": scores, "q": scores}, {"p": 1}, spec, {"p": ("x", "y", "z")})
    assert out["p"].tolist() == [["0.500000:1:y"]]
    assert out["q"] is scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("cat\ndog\n", ("cat", "dog"), id="one per line"),
        pytest.param("cat\ndog", ("cat", "dog"), id="no final newline"),
        pytest.param("cat\r\ndog\r\n", ("cat", "dog"), id="windows line ends"),
        pytest.param("cat\n\nbird\n", ("cat", "", "bird"), id="an empty line keeps its index"),
    ],
)
def test_labels_are_the_lines_of_the_file(tmp_path: Path, text: str, expected: tuple[str, ...]) -> None:
    path = tmp_path / "labels.txt"
    path.write_bytes(text.encode())
    assert load_labels(path) == expected


def test_output_labels_come_from_the_config_s_label_filename(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    config = ModelConfig(output=[OutputConfig(name="p", label_filename="labels.txt"), OutputConfig(name="q")])
    assert output_labels(config, tmp_path) == {"p": ("a", "b")}


@pytest.mark.parametrize(
    ("filename", "says"),
    [
        pytest.param("missing.txt", "cannot read labels", id="missing"),
        pytest.param("../x.txt", "leads out of the", id="outside"),
    ],
)
def test_a_bad_label_file_is_named(tmp_path: Path, filename: str, says: str) -> None:
    config = ModelConfig(output=[OutputConfig(name="p", label_filename=filename)])
    with pytest.raises(ValueError, match=says):
        output_labels(config, tmp_path)
