"""Reference profiles: what they hold, how they are checked against a model, and ``infergate profile``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import save_model
from monitoring_support import build_classifier, reference_rows, spec, tensor
from onnx import TensorProto, helper

from infergate.cli import main
from infergate.configfile import ConfigError
from infergate.monitoring.profile import (
    MAX_CATEGORIES,
    CategoricalFeature,
    NumericFeature,
    build_profile,
    check_profile,
    read_profile,
    write_profile,
)
from infergate.monitoring.profiling import profile_version


def test_numeric_features_keep_quantile_bins_counts_and_moments() -> None:
    x = np.random.default_rng(0).normal(5.0, 2.0, (5000, 2)).astype(np.float32)
    profile = build_profile(spec(tensor("x", "FP32", -1, 2)), {"x": x}, {}, source="s.npy")
    first = profile.inputs["x"].features[0]
    assert isinstance(first, NumericFeature)
    assert (first.name, first.count) == ("0", 5000)
    assert first.mean == pytest.approx(5.0, abs=0.1) and first.std == pytest.approx(2.0, abs=0.1)
    assert len(first.edges) == 9 and sum(first.counts) == 5000
    assert max(first.counts) - min(first.counts) <= 2  # quantile bins hold a tenth each
    assert first.quantiles[0] == first.min and first.quantiles[-1] == first.max and len(first.quantiles) == 101


def test_text_integer_and_boolean_features_are_categorical() -> None:
    rng = np.random.default_rng(0)
    model = spec(tensor("city", "BYTES", -1), tensor("code", "INT64", -1), tensor("flag", "BOOL", -1))
    rows = 500
    sample = {
        "city": np.array([*rng.choice(["paris", "oslo"], rows).tolist(), "alice@example.com"], dtype=object),
        "code": rng.integers(0, 4, rows + 1),
        "flag": rng.random(rows + 1) < 0.3,
    }
    profile = build_profile(model, sample, {}, source="s.npz")
    city, code, flag = (profile.inputs[n].features[0] for n in ("city", "code", "flag"))
    assert isinstance(city, CategoricalFeature) and set(city.categories) == {"paris", "oslo"}
    assert city.other == 1  # a value seen once is not kept: a profile holds no rare free text
    assert isinstance(code, CategoricalFeature) and set(code.categories) == {"0", "1", "2", "3"}
    assert isinstance(flag, CategoricalFeature) and set(flag.categories) == {"true", "false"}


def test_an_integer_feature_with_many_values_is_numeric() -> None:
    profile = build_profile(spec(tensor("n", "INT64", -1)), {"n": np.arange(1000)}, {}, source="s")
    assert isinstance(profile.inputs["n"].features[0], NumericFeature)


def test_categories_are_capped() -> None:
    text = np.array([f"c{i % 80}" for i in range(8000)], dtype=object)
    feature = build_profile(spec(tensor("t", "BYTES", -1)), {"t": text}, {}, source="s").inputs["t"].features[0]
    assert isinstance(feature, CategoricalFeature)
    assert len(feature.categories) == MAX_CATEGORIES and feature.other == 8000 - 100 * MAX_CATEGORIES


def test_classifier_outputs_are_profiled_as_class_frequencies_with_every_class() -> None:
    model = spec(tensor("x", "FP32", -1, 1), outputs=(tensor("p", "FP32", -1, 4),))
    scores = np.tile(np.array([[0.1, 0.7, 0.1, 0.1]], dtype=np.float32), (10, 1))
    profile = build_profile(model, {"x": np.zeros((10, 1))}, {"p": scores}, source="s")
    classes = profile.outputs["p"].features[0]
    assert profile.outputs["p"].reduction == "argmax"
    assert isinstance(classes, CategoricalFeature)
    assert classes.categories == {"0": 0, "1": 10, "2": 0, "3": 0}


def test_tensors_that_cannot_be_monitored_are_listed_with_the_reason() -> None:
    model = spec(tensor("x", "FP32", -1, 1), tensor("words", "BYTES", -1, -1))
    sample = {"x": np.zeros((3, 1)), "words": np.array([["a"], ["b"], ["c"]], dtype=object)}
    profile = build_profile(model, sample, {}, source="s")
    assert list(profile.inputs) == ["x"]
    assert "no per-row categories" in profile.skipped["input words"]


def test_a_feature_without_a_finite_value_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"input x: feature '1' has no finite value"):
        build_profile(spec(tensor("x", "FP32", -1, 2)), {"x": np.array([[1.0, np.nan]] * 3)}, {}, source="s")


def test_a_profile_round_trips_through_its_file(tmp_path: Path) -> None:
    profile = build_profile(spec(tensor("x", "FP32", -1, 3)), {"x": reference_rows(100, 0)[:, :3]}, {}, source="s")
    path = tmp_path / "reference_profile.json"
    write_profile(profile, path)
    assert read_profile(path) == profile
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed away


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(rows=0), "rows: Input should be greater than or equal to 1"),
        (lambda d: d["inputs"]["x"]["features"][0].update(counts=[1]), r"inputs\.x\.features\.0\.numeric: Value error"),
        (lambda d: d.update(format="other/9"), "format: Input should be 'infergate.reference_profile/1'"),
        (lambda d: d.update(extra=1), "extra: Extra inputs are not permitted"),
    ],
)
def test_a_damaged_profile_is_refused_naming_the_file_and_field(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    profile = build_profile(spec(tensor("x", "FP32", -1, 1)), {"x": np.arange(20.0).reshape(20, 1)}, {}, source="s")
    data = json.loads(profile.model_dump_json())
    edit(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        read_profile(path)


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_profile(path)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (spec(tensor("z", "FP32", -1, 2)), r"inputs\.x: model m has no such input \(it has z\)"),
        (spec(tensor("x", "FP64", -1, 2)), r"inputs\.x: profiled as FP32, but the model's is FP64"),
        (spec(tensor("x", "FP32", -1, 3)), r"inputs\.x: 2 features, but shape \[-1, 3\] has 3"),
        (spec(tensor("x", "FP32", -1, 2, 2)), r"inputs\.x: reduction 'columns' does not fit shape"),
    ],
)
def test_a_profile_that_does_not_describe_the_model_is_refused(model, message: str) -> None:  # type: ignore[no-untyped-def]
    profile = build_profile(spec(tensor("x", "FP32", -1, 2)), {"x": np.zeros((5, 2))}, {}, source="s")
    with pytest.raises(ConfigError, match=rf"^p\.json: {message}"):
        check_profile(profile, model, Path("p.json"))


# --- the command -----------------------------------------------------------------------------


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    save_model(build_classifier(), tmp_path / "models", "classifier", 3)
    return tmp_path / "models"


def test_profile_writes_inputs_and_predicted_classes_next_to_the_version(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = tmp_path / "sample.npy"
    np.save(sample, reference_rows(3000, seed=2))
    code = main(["profile", "--model-repository", str(repository), "--model", "classifier", "--data", str(sample)])
    written = repository / "classifier" / "3" / "reference_profile.json"
    assert code == 0 and capsys.readouterr().out.strip() == f"wrote {written}"
    profile = read_profile(written)
    assert (profile.model, profile.version, profile.rows, profile.source) == ("classifier", 3, 3000, "sample.npy")
    assert [f.name for f in profile.inputs["x"].features] == ["0", "1", "2", "3"]
    classes = profile.outputs["probabilities"].features[0]
    assert isinstance(classes, CategoricalFeature)
    share = {k: v / 3000 for k, v in classes.categories.items()}
    assert share["0"] == pytest.approx(0.375, abs=0.05) and share["2"] == pytest.approx(0.25, abs=0.05)


def test_profile_refuses_a_sample_that_does_not_fit_naming_file_and_column(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = tmp_path / "sample.csv"
    sample.write_text("a,b,c,d\n1,2,3,4\n1,2,x,4\n")
    code = main(["profile", "--model-repository", str(repository), "--model", "classifier", "--data", str(sample)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"infergate profile: {sample}: column 'c', row 2: 'x' is not a FP32 (input x)"
    )
    assert not (repository / "classifier" / "3" / "reference_profile.json").exists()


def test_profile_names_a_missing_version(repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "s.npy", reference_rows(10, 0))
    argv = ["profile", "--model-repository", str(repository), "--model", "classifier", "--version", "9"]
    assert main([*argv, "--data", str(tmp_path / "s.npy")]) == 2
    assert "classifier/9/model.onnx: no such file" in capsys.readouterr().err


def test_the_installed_command_writes_to_output_with_a_table_sample(repository: Path, tmp_path: Path) -> None:
    """The real console script, as an operator runs it (a table's header names the features)."""
    sample = tmp_path / "sample.csv"
    rows = reference_rows(200, seed=4)
    sample.write_text("age,income,tenure,score\n" + "".join(",".join(map(str, r)) + "\n" for r in rows.tolist()))
    output = tmp_path / "out" / "profile.json"
    command = [sys.executable, "-m", "infergate", "profile", "--model-repository", str(repository),
               "--model", "classifier", "--version", "3", "--data", str(sample), "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [f.name for f in read_profile(output).inputs["x"].features] == ["age", "income", "tenure", "score"]


def test_a_model_that_does_not_batch_runs_one_request_per_sample_row(tmp_path: Path) -> None:
    """A fixed-shape model ([4] in, [4] out, max_batch_size 0): each sample row is one full request."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    save_model(model, tmp_path / "models", "fixed", 1)
    np.save(tmp_path / "s.npy", np.arange(40, dtype=np.float32).reshape(10, 4))
    path = profile_version(tmp_path / "models", "fixed", None, tmp_path / "s.npy", progress=False)
    profile = read_profile(path)
    assert profile.rows == 10 and profile.outputs["y"].reduction == "argmax"
    x0 = profile.inputs["x"].features[0]
    assert isinstance(x0, NumericFeature) and (x0.min, x0.max) == (0.0, 36.0)
    classes = profile.outputs["y"].features[0]
    assert isinstance(classes, CategoricalFeature) and classes.categories["0"] == 10  # -x is largest at column 0
