"""Test-only ONNX models, built in code, plus a helper to place them in a repository.

These complement the demo repository (``infergate.demo``) with models whose
behaviour tests need to control: one that is slow on purpose (batching, queueing,
timeouts, cancellation; it lives in load_tests/models.py, which the load scenarios
share) and one that fails at run time on bad input (error mapping).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from load_tests.models import build_slow_model, make_model

__all__ = ["build_gather_model", "build_slow_model", "save_model"]


def build_gather_model() -> onnx.ModelProto:
    """``y[i, 0] = table[idx[i, 0]]`` with ``table = [0.0, 1.0, ..., 9.0]``.

    ``idx`` INT64 [batch,1] -> ``y`` FP32 [batch,1]. An index outside [-10, 9]
    makes onnxruntime's ``run`` raise ("indices element out of data bounds"),
    which is how tests provoke a model execution error on demand.
    """
    table = np.arange(10, dtype=np.float32)
    graph = helper.make_graph(
        # Gather on axis 0 of a 1-D table keeps the index shape: [batch,1] -> [batch,1].
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return make_model(graph)


def save_model(
    model: onnx.ModelProto,
    repo: Path,
    name: str,
    version: int = 1,
    config_yaml: str | None = None,
) -> Path:
    """Write ``repo/name/version/model.onnx`` (and ``repo/name/config.yaml`` if given).

    Returns the path of the written ``model.onnx``.
    """
    model_dir = Path(repo) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    model_path = version_dir / "model.onnx"
    onnx.save_model(model, str(model_path))
    if config_yaml is not None:
        (model_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    return model_path
