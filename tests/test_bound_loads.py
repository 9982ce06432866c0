"""A bound model (IO binding) loads as a plain one does: the batching probe, and the configured warm-up.

IO binding is the default on CUDA; ``io_binding: true`` binds on the CPU provider
through the same calls, so these load real onnxruntime sessions that way.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from models import save_model
from onnx import TensorProto, helper

from infergate.demo import build_matmul16
from infergate.models.binding import BoundSession
from infergate.models.config import model_config_from_data
from infergate.models.runner import OnnxRunner


def build_twice() -> onnx.ModelProto:
    """``y`` is ``x`` twice over, along the first dimension: symbolic, but not the batch."""
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=0)],
        "twice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def load(path: Path, **config: Any) -> OnnxRunner:
    data = {"device_execution": {"io_binding": True}, "instance_group": {"inline_max_microseconds": 0}, **config}
    return OnnxRunner.load(path, model_config_from_data(data, "config.yaml"), "m", 1)


def row(value: float) -> dict[str, Any]:
    return {"x": np.full((1, 4), value, np.float32)}


def test_a_bound_model_whose_output_only_looks_batched_is_probed_and_served_without_batching(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "infergate.models.runner")
    runner = load(save_model(build_twice(), tmp_path, "m"))
    try:
        assert runner.execution == "io binding on cpu"
        assert runner.spec.max_batch_size == 0
        assert "its first dimension is not the batch" in caplog.text
        results, _ = runner._run_sync(runner._instances.instances[0], [row(1)], [1])
        assert not isinstance(results[0], Exception), results[0].__cause__
        assert results[0]["y"].tolist() == [[1.0] * 4] * 2
    finally:
        runner.close()


def test_a_bound_model_told_to_batch_whose_output_does_not_runs_each_request_alone(tmp_path: Path) -> None:
    """max_batch_size in the config: no probe decides, so each batch's outputs are checked (``split``)."""
    runner = load(save_model(build_twice(), tmp_path, "m"), max_batch_size=8)
    try:
        assert runner.execution == "io binding on cpu"
        results, _ = runner._run_sync(runner._instances.instances[0], [row(1), row(2)], [1, 1])
        assert [r["y"].tolist() for r in results if not isinstance(r, Exception)] == [
            [[1.0] * 4] * 2,
            [[2.0] * 4] * 2,
        ]
    finally:
        runner.close()


def build_range() -> onnx.ModelProto:
    """``Range(0, 4, d)``: a delta of zero is an error, so zeros do not suit it."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["s"], value=helper.make_tensor("s", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Constant", [], ["l"], value=helper.make_tensor("l", TensorProto.FLOAT, [], [4.0])),
            helper.make_node("Range", ["s", "l", "d"], ["y"]),
        ],
        "range",
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["K"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


ONE = {"name": "one", "inputs": {"d": {"data_type": "TYPE_FP32", "dims": [], "random_data": True}}}


def test_a_bound_model_warms_up_on_its_model_warmup_samples_not_on_zeros(tmp_path: Path) -> None:
    runner = load(save_model(build_range(), tmp_path, "m"), max_batch_size=0, model_warmup=[ONE])
    try:
        assert runner.execution == "io binding on cpu"
        results, _ = runner._run_sync(runner._instances.instances[0], [{"d": np.array(1.0, np.float32)}], [1])
        assert results[0]["y"].tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        runner.close()


def test_a_bound_model_runs_the_configured_warm_up_iterations_and_none_when_they_are_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: Counter[int] = Counter()  # bound runs, by the rows of their batch
    real = BoundSession.stage

    def counted(bound: BoundSession, payloads: Any, count: int) -> Any:
        rows[count] += 1
        return real(bound, payloads, count)

    monkeypatch.setattr(BoundSession, "stage", counted)
    path = save_model(build_matmul16(), tmp_path, "m")
    for iterations, expected in ((0, {}), (3, {1: 3, 8: 3})):
        rows.clear()
        load(path, max_batch_size=8, warmup={"iterations": iterations, "batch_sizes": [1, 8]}).close()
        assert rows == expected, iterations
