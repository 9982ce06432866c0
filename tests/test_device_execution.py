"""Device-resident execution (models/binding.py): batches through onnxruntime IO binding.

CI has no GPU, so these run the binding code with the CPU execution provider,
which binds host buffers through the same calls (staging, bucket copies,
binding by address, outputs written into host arrays, padding to captured
sizes). Only capturing and replaying CUDA graphs needs a GPU; that part is
checked by scripts/gpu_check.sh on a GPU machine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess, running_server
from models import build_gather_model, save_model
from onnx import TensorProto, helper
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.demo import IDENTITY_DATATYPES, build_matmul16, build_mlp, build_multi_io
from infergate.models.binding import BindingPlan, BoundSession, bucket_sizes, plan_binding
from infergate.models.config import DeviceExecution
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, spec_from_graph

CUDA = "CUDAExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()


def _session(model: onnx.ModelProto, path: Path) -> ort.InferenceSession:
    onnx.save_model(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _spec(session: ort.InferenceSession, max_batch_size: int | None = 64) -> ModelSpec:
    return spec_from_graph("m", 1, session.get_inputs(), session.get_outputs(), max_batch_size)


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("capacity", "graphs", "expected"),
    [
        (64, (), [1, 2, 4, 8, 16, 32, 64]),
        (48, (), [1, 2, 4, 8, 16, 32, 48]),
        (1, (), [1]),
        (64, (1, 8, 64), [1, 8, 64]),
        (64, (1, 8), [1, 8, 16, 32, 64]),
        (64, (3, 24), [3, 24, 32, 64]),
    ],
)
def test_buckets_are_the_graph_sizes_then_powers_of_two_up_to_the_capacity(
    capacity: int, graphs: tuple[int, ...], expected: list[int]
) -> None:
    assert bucket_sizes(capacity, graphs) == expected


@pytest.fixture(scope="module")
def mlp_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    return _spec(_session(build_mlp(), tmp_path_factory.mktemp("mlp") / "model.onnx"))


@pytest.mark.parametrize(
    ("device", "provider", "options", "expected"),
    [
        (DeviceExecution(), "CPUExecutionProvider", {}, None),
        (DeviceExecution(io_binding=True), "CPUExecutionProvider", {}, BindingPlan("cpu")),
        (DeviceExecution(), CUDA, {"device_id": "1"}, BindingPlan("cuda", 1)),
        (DeviceExecution(), "TensorrtExecutionProvider", {}, BindingPlan("cuda")),
        (DeviceExecution(io_binding=False), CUDA, {}, None),
        (DeviceExecution(cuda_graph_batch_sizes=[8, 1]), CUDA, {}, BindingPlan("cuda", 0, (1, 8))),
    ],
    ids=["auto on cpu", "forced on cpu", "auto on cuda", "auto on tensorrt", "off on cuda", "graphs on cuda"],
)
def test_io_binding_is_planned_for_the_provider_the_session_landed_on(
    mlp_spec: ModelSpec, device: DeviceExecution, provider: str, options: dict[str, str], expected: BindingPlan | None
) -> None:
    assert plan_binding(device, provider, options, mlp_spec) == expected


def test_graphs_on_a_session_that_fell_back_to_the_cpu_are_dropped_with_a_warning(
    mlp_spec: ModelSpec, caplog: pytest.LogCaptureFixture
) -> None:
    device = DeviceExecution(cuda_graph_batch_sizes=[1, 8])
    with caplog.at_level(logging.WARNING):
        assert plan_binding(device, "CPUExecutionProvider", {}, mlp_spec) is None
    assert "cuda_graph_batch_sizes ignored: the model runs on CPUExecutionProvider" in caplog.text


def test_a_model_with_bytes_tensors_runs_with_session_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = _spec(_session(build_multi_io(), tmp_path / "model.onnx"), 16)
    with caplog.at_level(logging.WARNING):
        assert plan_binding(DeviceExecution(io_binding=True), CUDA, {}, spec) is None
    assert "BYTES, which onnxruntime cannot bind" in caplog.text


@pytest.mark.parametrize(
    ("model", "max_batch_size", "says"),
    [
        pytest.param(build_matmul16(), 0, "does not batch", id="not batching"),
        pytest.param(build_matmul16(), 4, "[8] exceed max_batch_size 4", id="size above max_batch_size"),
        pytest.param(None, 16, "variable dimensions", id="variable inner dims"),
    ],
)
def test_graphs_are_refused_where_a_model_cannot_replay_one(
    tmp_path: Path, model: onnx.ModelProto | None, max_batch_size: int, says: str
) -> None:
    spec = _spec(_session(model or _identity_model(TensorProto.FLOAT, "n"), tmp_path / "model.onnx"), max_batch_size)
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes") as refused:
        plan_binding(DeviceExecution(cuda_graph_batch_sizes=[1, 8]), CUDA, {}, spec)
    assert says in str(refused.value)


# --------------------------------------------------------------------------- bound runs against session.run


def _identity_model(elem_type: int, inner: int | str = 3) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem_type, ["batch", inner])
    y = helper.make_tensor_value_info("y", elem_type, ["batch", inner])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run_both(bound: BoundSession, session: ort.InferenceSession, payloads: list[dict[str, np.ndarray]]) -> int:
    """Run ``payloads`` as one bound batch and as one session.run; assert equal; return the rows computed."""
    rows = sum(len(next(iter(p.values()))) for p in payloads)
    staged = bound.stage(payloads, rows)
    outputs = bound.execute(staged)
    names = [o.name for o in session.get_outputs()]
    expected = session.run(names, {n: np.concatenate([p[n] for p in payloads]) for n in payloads[0]})
    for name, got, want in zip(names, outputs, expected, strict=True):
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    return staged.run_rows


@pytest.mark.parametrize("datatype", [d for d in IDENTITY_DATATYPES if d != "BYTES"])
def test_every_numeric_datatype_round_trips_through_bound_buffers(tmp_path: Path, datatype: str) -> None:
    session = _session(_identity_model(IDENTITY_DATATYPES[datatype]), tmp_path / "model.onnx")
    bound = BoundSession(session, _spec(session, 8), BindingPlan("cpu"))
    rng = np.random.default_rng(1)
    dtype = DATATYPES[datatype].numpy
    payloads = [{"x": (rng.random((n, 3)) * 100).astype(dtype)} for n in (1, 2, 4)]
    _run_both(bound, session, payloads)


@pytest.mark.parametrize(
    ("rows", "computed"),
    [
        ([1], 1),
        ([1, 2], 4),  # padded up to the captured size 4
        ([3, 5, 8], 16),
        ([16], 16),
        ([9, 8], 17),  # above the largest captured size: an ordinary bucket, no padding
        ([64], 64),
    ],
)
def test_batches_are_padded_to_the_captured_sizes_and_the_padding_is_cut_off(
    tmp_path: Path, rows: list[int], computed: int
) -> None:
    session = _session(build_mlp(), tmp_path / "model.onnx")
    bound = BoundSession(session, _spec(session), BindingPlan("cpu", 0, (1, 4, 16)))
    rng = np.random.default_rng(2)
    payloads = [{"x": rng.standard_normal((n, 512), dtype=np.float32)} for n in rows]
    assert _run_both(bound, session, payloads) == computed


def test_a_batch_after_a_larger_one_sees_none_of_its_rows(tmp_path: Path) -> None:
    session = _session(build_matmul16(), tmp_path / "model.onnx")
    bound = BoundSession(session, _spec(session), BindingPlan("cpu", 0, (8,)))
    _run_both(bound, session, [{"x": np.full((8, 16), 7.0, dtype=np.float32)}])
    # Three rows padded to 8: the five padding rows are zeros, not the previous batch's sevens.
    staged = bound.stage([{"x": np.ones((3, 16), dtype=np.float32)}], 3)
    assert staged.run_rows == 8
    (y,) = bound.execute(staged)
    assert y.shape == (3, 16)
    np.testing.assert_allclose(y, session.run(None, {"x": np.ones((3, 16), dtype=np.float32)})[0], rtol=1e-6)


def test_outputs_of_one_batch_survive_the_next(tmp_path: Path) -> None:
    session = _session(build_matmul16(), tmp_path / "model.onnx")
    bound = BoundSession(session, _spec(session), BindingPlan("cpu"))
    (first,) = bound.execute(bound.stage([{"x": np.ones((2, 16), dtype=np.float32)}], 2))
    kept = first.copy()
    bound.execute(bound.stage([{"x": np.zeros((2, 16), dtype=np.float32)}], 2))
    np.testing.assert_array_equal(first, kept)  # callers hold views of these arrays until serialised


def test_a_request_of_the_wrong_shape_is_refused_not_broadcast(tmp_path: Path) -> None:
    session = _session(build_matmul16(), tmp_path / "model.onnx")
    bound = BoundSession(session, _spec(session), BindingPlan("cpu"))
    with pytest.raises(ValueError, match=r"input x: shape \[1, 16\], expected \[2, 16\]"):
        bound.stage([{"x": np.ones((1, 16), dtype=np.float32)}], 2)


# --------------------------------------------------------------------------- through a real server

BATCH_WINDOW = "dynamic_batching: {max_queue_delay_microseconds: 200000}\n"
BOUND = "device_execution: {io_binding: true}\n"


@pytest.fixture(scope="module")
def bound_server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[tuple[ServerProcess, Path]]:
    repo = tmp_path_factory.mktemp("bound-repo")
    save_model(build_mlp(), repo, "mlp", config_yaml="max_batch_size: 16\n" + BATCH_WINDOW + BOUND)
    save_model(build_gather_model(), repo, "gather", config_yaml="max_batch_size: 16\n" + BATCH_WINDOW + BOUND)
    save_model(_identity_model(TensorProto.FLOAT, "n"), repo, "identity", config_yaml="max_batch_size: 16\n" + BOUND)
    save_model(
        build_matmul16(),
        repo,
        "graphs_or_fallback",
        config_yaml="execution_providers: [{name: cuda}, {name: cpu}]\n"
        "device_execution: {cuda_graph_batch_sizes: [1, 4, 16]}\nmax_batch_size: 16\n" + BATCH_WINDOW,
    )
    with running_server(repo, log_dir) as server:
        yield server, repo


def _input(name: str, array: np.ndarray) -> InferInput:
    tensor = InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


async def _infer_all(url: str, model: str, name: str, arrays: list[np.ndarray]) -> list[object]:
    async with aioclient.InferenceServerClient(url) as client:
        calls = (client.infer(model, [_input(name, a)]) for a in arrays)
        return await asyncio.gather(*calls, return_exceptions=True)


async def test_concurrent_requests_are_batched_through_io_binding_and_answered_exactly(
    bound_server: tuple[ServerProcess, Path],
) -> None:
    server, repo = bound_server
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((n, 512), dtype=np.float32) for n in (1, 3, 2, 1, 4, 5)]
    results = await _infer_all(server.url, "mlp", "x", inputs)
    reference = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for x, result in zip(inputs, results, strict=True):
        assert not isinstance(result, BaseException), result
        np.testing.assert_allclose(result.as_numpy("y"), reference.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
    async with aioclient.InferenceServerClient(server.url) as client:
        stats = (await client.get_inference_statistics("mlp")).model_stats[0]
    assert max(b.batch_size for b in stats.batch_stats) > 1, stats.batch_stats
    server.logged("model mlp version 1: io binding on cpu")


async def test_a_request_that_fails_in_a_bound_batch_fails_alone(bound_server: tuple[ServerProcess, Path]) -> None:
    server, _ = bound_server
    indices = [np.array([[i]], dtype=np.int64) for i in range(5)] + [np.array([[100]], dtype=np.int64)]
    *good, bad = await _infer_all(server.url, "gather", "idx", indices)
    for i, result in enumerate(good):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), [[float(i)]])  # type: ignore[attr-defined]
    assert isinstance(bad, InferenceServerException)
    assert bad.status() == "StatusCode.INTERNAL"


async def test_inputs_with_variable_dimensions_are_bound_as_they_come(bound_server: tuple[ServerProcess, Path]) -> None:
    server, _ = bound_server
    inputs = [np.full((2, 3 + i), i, dtype=np.float32) for i in range(4)]
    for x, result in zip(inputs, await _infer_all(server.url, "identity", "x", inputs), strict=True):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), x)  # type: ignore[attr-defined]


async def test_a_model_asking_for_cuda_graphs_serves_where_cuda_is_missing(
    bound_server: tuple[ServerProcess, Path],
) -> None:
    server, repo = bound_server
    inputs = [np.full((n, 16), n, dtype=np.float32) for n in (1, 2, 3)]
    reference = ort.InferenceSession(
        str(repo / "graphs_or_fallback" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for x, result in zip(inputs, await _infer_all(server.url, "graphs_or_fallback", "x", inputs), strict=True):
        assert not isinstance(result, BaseException), result
        np.testing.assert_allclose(result.as_numpy("y"), reference.run(None, {"x": x})[0], rtol=1e-5)  # type: ignore[attr-defined]
    if HAS_CUDA:
        server.logged("io binding on cuda:0 with CUDA graphs at batch 1, 4, 16")
    else:
        server.logged("providers ['cuda'] unavailable, using CPUExecutionProvider")
        server.logged("cuda_graph_batch_sizes ignored")
