"""The bundled demo models and the test-only models, checked in-process with onnxruntime.

These tests pin the tensor names, datatypes and shapes that the server, the
clients and the other tests rely on, and check each model computes what it claims.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from models import build_gather_model, build_slow_model, save_model
from onnx import TensorProto, numpy_helper

from infergate import demo

DEMO_MODELS = ["matmul16", "mlp", "cnn", "multi_io", "identity_all"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Written once per module: the mlp alone is ~40 MB of weights.
    root = tmp_path_factory.mktemp("demo_repository")
    demo.write_demo_repository(root)
    return root


@pytest.fixture(scope="module")
def sessions(repository: Path) -> dict[str, ort.InferenceSession]:
    return {name: _session(repository / name / "1" / "model.onnx") for name in DEMO_MODELS}


def _session(model: Path | onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine's cores are shared
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, **inputs: np.ndarray) -> dict[str, Any]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def _load(repository: Path, name: str) -> onnx.ModelProto:
    return onnx.load(str(repository / name / "1" / "model.onnx"))


# --------------------------------------------------------------------------- repository layout


def test_write_demo_repository_returns_every_model_name(tmp_path: Path) -> None:
    assert demo.write_demo_repository(tmp_path) == DEMO_MODELS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_MODELS)


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_each_model_has_version_1_and_a_config(repository: Path, name: str) -> None:
    assert (repository / name / "1" / "model.onnx").is_file()
    assert (repository / name / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("name", "expected_config"),
    [
        (
            "matmul16",
            {
                "max_batch_size": 64,
                "dynamic_batching": {
                    "max_queue_delay_microseconds": 0,
                    "max_queue_size": 1024,
                    "min_batch_interval_microseconds": 500,
                },
                "session_options": {"intra_op_num_threads": 1},
            },
        ),
        (
            "mlp",
            {
                "max_batch_size": 64,
                "dynamic_batching": {"max_queue_delay_microseconds": 0, "max_queue_size": 1024},
            },
        ),
        (
            "cnn",
            {
                "max_batch_size": 32,
                "dynamic_batching": {"max_queue_delay_microseconds": 0, "max_queue_size": 1024},
            },
        ),
        ("multi_io", {"max_batch_size": 16}),
        ("identity_all", {"max_batch_size": 16}),
    ],
)
def test_config_yaml_is_commented_and_holds_the_batching_settings(
    repository: Path, name: str, expected_config: dict[str, Any]
) -> None:
    text = (repository / name / "config.yaml").read_text(encoding="utf-8")
    assert text.startswith(f"# {name}: ")
    assert yaml.safe_load(text) == expected_config


@pytest.mark.parametrize("build", [demo.build_matmul16, demo.build_cnn, demo.build_multi_io, demo.build_identity_all])
def test_builders_are_deterministic(build: Any) -> None:
    assert build().SerializeToString() == build().SerializeToString()


# --------------------------------------------------------------------------- signatures

F32, I64, F16, BOOL, STR = (
    TensorProto.FLOAT,
    TensorProto.INT64,
    TensorProto.FLOAT16,
    TensorProto.BOOL,
    TensorProto.STRING,
)
IDENTITY_SIGNATURE = [
    (f"{prefix}_{dt}", elem, ["batch", f"n_{dt}"])
    for prefix in ("in", "out")
    for dt, elem in demo.IDENTITY_DATATYPES.items()
]

# name -> [(tensor, ONNX element type, shape)], inputs then outputs in graph order.
SIGNATURES: dict[str, tuple[list[tuple[str, int, list[Any]]], list[tuple[str, int, list[Any]]]]] = {
    "matmul16": ([("x", F32, ["batch", 16])], [("y", F32, ["batch", 16])]),
    "mlp": ([("x", F32, ["batch", 512])], [("y", F32, ["batch", 512])]),
    "cnn": (
        [("image", F32, ["batch", 3, 64, 64])],
        [("probabilities", F32, ["batch", 10])],
    ),
    "multi_io": (
        [
            ("a", F32, ["batch", 4]),
            ("b", I64, ["batch", 4]),
            ("flag", BOOL, ["batch", 1]),
            ("text", STR, ["batch", 2]),
        ],
        [
            ("sum", F32, ["batch", 4]),
            ("doubled", I64, ["batch", 4]),
            ("not_flag", BOOL, ["batch", 1]),
            ("text_out", STR, ["batch", 2]),
            ("half", F16, ["batch", 4]),
        ],
    ),
    "identity_all": (
        IDENTITY_SIGNATURE[: len(demo.IDENTITY_DATATYPES)],
        IDENTITY_SIGNATURE[len(demo.IDENTITY_DATATYPES) :],
    ),
}


def _signature(values: Any) -> list[tuple[str, int, list[Any]]]:
    result = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        result.append((value.name, tensor_type.elem_type, dims))
    return result


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_model_is_valid_opset_17_with_the_documented_signature(repository: Path, name: str) -> None:
    model = _load(repository, name)
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    expected_inputs, expected_outputs = SIGNATURES[name]
    assert _signature(model.graph.input) == expected_inputs
    assert _signature(model.graph.output) == expected_outputs


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_model_loads_in_onnxruntime(sessions: dict[str, ort.InferenceSession], name: str) -> None:
    session = sessions[name]
    inputs, outputs = SIGNATURES[name]
    assert [i.name for i in session.get_inputs()] == [n for n, _, _ in inputs]
    assert [o.name for o in session.get_outputs()] == [n for n, _, _ in outputs]


# --------------------------------------------------------------------------- behaviour


def test_matmul16_multiplies_by_its_weight_matrix(repository: Path, sessions: dict[str, ort.InferenceSession]) -> None:
    (weight_proto,) = _load(repository, "matmul16").graph.initializer
    weight = numpy_helper.to_array(weight_proto)
    assert weight.shape == (16, 16) and weight.dtype == np.float32
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    y = _run(sessions["matmul16"], x=x)["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-5)


def test_mlp_output_is_finite_with_width_512(sessions: dict[str, ort.InferenceSession]) -> None:
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    y = _run(sessions["mlp"], x=x)["y"]
    assert y.shape == (3, 512) and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert np.abs(y).max() > 0  # not collapsed to zero by dead ReLUs


def test_cnn_outputs_a_probability_distribution_per_image(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    image = np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32)
    probabilities = _run(sessions["cnn"], image=image)["probabilities"]
    assert probabilities.shape == (2, 10) and probabilities.dtype == np.float32
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_multi_io_computes_all_five_outputs(sessions: dict[str, ort.InferenceSession]) -> None:
    a = np.array([[0.5, -1.0, 2.25, 3.0], [1e3, 0.0, -0.5, 7.0]], dtype=np.float32)
    b = np.array([[1, 2, 3, 4], [-5, 0, 100, -(2**40)]], dtype=np.int64)
    flag = np.array([[True], [False]])
    text = np.array([["hello", ""], ["wörld", "a b"]], dtype=object)

    out = _run(sessions["multi_io"], a=a, b=b, flag=flag, text=text)

    assert out["sum"].dtype == np.float32
    np.testing.assert_array_equal(out["sum"], a + b.astype(np.float32))
    assert out["doubled"].dtype == np.int64
    np.testing.assert_array_equal(out["doubled"], b * 2)
    assert out["not_flag"].dtype == np.bool_
    np.testing.assert_array_equal(out["not_flag"], [[False], [True]])
    assert out["text_out"].tolist() == text.tolist()
    assert out["half"].dtype == np.float16
    np.testing.assert_array_equal(out["half"], a.astype(np.float16))


def _identity_sample(datatype: str, shape: tuple[int, int]) -> np.ndarray:
    """Edge values of each datatype (extremes, NaN/Inf/-0.0, unicode), tiled to shape."""
    count = shape[0] * shape[1]
    if datatype == "BYTES":
        values: list[Any] = ["", "ascii", "ünïcødé", "tab\tnew\nline"]
        return np.array((values * count)[:count], dtype=object).reshape(shape)
    if datatype == "BOOL":
        flags: np.ndarray = np.arange(count) % 2 == 0
        return flags.reshape(shape)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(demo.IDENTITY_DATATYPES[datatype])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max // 3]
    else:
        finfo = np.finfo(dtype)
        values = [np.nan, np.inf, -np.inf, -0.0, finfo.max, finfo.tiny, 1 / 3]
    return np.array((values * count)[:count], dtype=dtype).reshape(shape)


@pytest.mark.parametrize("datatype", list(demo.IDENTITY_DATATYPES))
def test_identity_all_round_trips_every_datatype_exactly(
    sessions: dict[str, ort.InferenceSession], datatype: str
) -> None:
    # onnxruntime requires every graph input on every run, so all 13 are fed.
    feeds = {f"in_{dt}": _identity_sample(dt, (3, 5)) for dt in demo.IDENTITY_DATATYPES}
    x = feeds[f"in_{datatype}"]
    (y,) = sessions["identity_all"].run([f"out_{datatype}"], feeds)
    assert y.dtype == x.dtype and y.shape == x.shape
    if datatype == "BYTES":
        assert y.tolist() == x.tolist()
    else:
        assert y.tobytes() == x.tobytes()  # bitwise: NaN payloads and -0.0 included


def test_identity_all_inputs_have_independent_second_dimensions(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    feeds = {f"in_{dt}": _identity_sample(dt, (2, width)) for width, dt in enumerate(demo.IDENTITY_DATATYPES, start=1)}
    outputs = _run(sessions["identity_all"], **feeds)
    for dt in demo.IDENTITY_DATATYPES:
        assert outputs[f"out_{dt}"].shape == feeds[f"in_{dt}"].shape


# --------------------------------------------------------------------------- test-only models


def test_save_model_writes_the_repository_layout(tmp_path: Path) -> None:
    path = save_model(build_gather_model(), tmp_path, "gather", version=3, config_yaml="x: 1\n")
    assert path == tmp_path / "gather" / "3" / "model.onnx"
    assert onnx.load(str(path)).graph.output[0].name == "y"
    assert (tmp_path / "gather" / "config.yaml").read_text() == "x: 1\n"
    assert not (tmp_path / "other").exists()
    save_model(build_gather_model(), tmp_path, "other")
    assert (tmp_path / "other" / "1" / "model.onnx").is_file()
    assert not (tmp_path / "other" / "config.yaml").exists()


@pytest.mark.parametrize("batch", [1, 7])
def test_slow_model_returns_its_input_bit_for_bit(batch: int) -> None:
    session = _session(build_slow_model(milliseconds_hint=2))
    x = np.array([np.nan, np.inf, -np.inf, -0.0] * batch, dtype=np.float32).reshape(batch, 4)
    x[0] = [1.5, -2.0, 3e38, 1e-45]
    (y,) = session.run(["y"], {"x": x})
    assert y.dtype == np.float32 and y.shape == (batch, 4)
    assert y.tobytes() == x.tobytes()


def test_slow_model_really_spends_time_at_run_time() -> None:
    # Only a lower bound: a loaded machine is slower, never faster. The hint is
    # calibrated to ~50 ms; a constant-folded loop would take well under 1 ms.
    session = _session(build_slow_model(milliseconds_hint=50))
    x = np.ones((2, 4), dtype=np.float32)
    session.run(["y"], {"x": x})  # warm-up
    started = time.perf_counter()
    session.run(["y"], {"x": x})
    assert time.perf_counter() - started > 0.010


def test_gather_model_looks_up_the_table() -> None:
    session = _session(build_gather_model())
    idx = np.array([[0], [9], [-1], [-10], [4]], dtype=np.int64)
    (y,) = session.run(["y"], {"idx": idx})
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[0.0], [9.0], [9.0], [0.0], [4.0]])


@pytest.mark.parametrize("bad_index", [10, -11, 2**40])
def test_gather_model_raises_at_run_time_on_an_out_of_range_index(bad_index: int) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the expected failure need not be logged to stderr
    session = ort.InferenceSession(
        build_gather_model().SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    idx = np.array([[1], [bad_index]], dtype=np.int64)
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(["y"], {"idx": idx})
