"""A batch's outputs are cut back per request only when they follow the batch: never another request's rows.

A graph whose first dimensions are all symbolic looks batchable, though an output's
first dimension need not be the batch (a transpose, a count that depends on the
data). The runner here is real: onnxruntime on a model built in the test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from infergate.models.config import ModelConfig
from infergate.models.runner import OnnxRunner, UnbatchedOutput, split


def transposing_model(path: Path) -> Path:
    """y[M, N] = transpose(x[N, M]): both first dimensions symbolic, y's is not the batch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "m"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", "n"])
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"])], "transpose", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def run(runner: OnnxRunner, payloads: list[dict[str, Any]]) -> Any:
    async def main() -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        runner.start(payloads, [len(p["x"]) for p in payloads], future.set_result)
        return await asyncio.wait_for(future, 30.0)

    return asyncio.run(main())


def test_a_model_that_only_looks_batchable_is_served_without_batching(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its config says nothing of batching, and every first dimension of the graph is symbolic."""
    runner = OnnxRunner.load(transposing_model(tmp_path / "model.onnx"), ModelConfig(), "transpose", 1)
    try:
        assert not runner.spec.batches  # so the batcher never puts two requests together
        assert "its first dimension is not the batch, so it is served without batching" in caplog.text
    finally:
        runner.close()


def test_a_batch_whose_outputs_do_not_follow_it_is_run_again_one_request_at_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its config says it batches; each request still gets its own answer, never another's rows."""
    config = ModelConfig(max_batch_size=8)
    runner = OnnxRunner.load(transposing_model(tmp_path / "model.onnx"), config, "transpose", 1)
    try:
        a = {"x": np.array([[1.0, 2.0, 3.0]], np.float32)}
        b = {"x": np.array([[10.0, 20.0, 30.0]], np.float32)}
        (alone_a,), _ = run(runner, [a])
        (answer_a, answer_b), _ = run(runner, [a, b])
        np.testing.assert_array_equal(answer_a["y"], alone_a["y"])  # [[1], [2], [3]], none of b's values
        np.testing.assert_array_equal(answer_b["y"], [[10.0], [20.0], [30.0]])
        assert "batches of several requests run one request at a time" in caplog.text
    finally:
        runner.close()


def test_split_refuses_outputs_that_do_not_have_the_batchs_rows() -> None:
    rows = [1, 2]
    assert [r["y"].tolist() for r in split(["y"], [np.arange(3)], rows)] == [[0], [1, 2]]
    with pytest.raises(UnbatchedOutput, match="'y' has 2 rows for a batch of 3"):
        split(["y"], [np.zeros((2, 3))], rows)
    with pytest.raises(UnbatchedOutput):
        split(["y"], [np.zeros((4, 3))], rows)  # more rows than the batch: not padding, unless said so
    assert len(split(["y"], [np.zeros((4, 3))], rows, padded=True)) == 2  # a padded graph's outputs
