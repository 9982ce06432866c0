"""A small classifier and a monitored repository for the drift-monitoring tests.

``classifier`` takes ``x`` FP32 [batch, 4] and answers ``probabilities`` FP32
[batch, 3] = softmax(3·x0, 3·x1, 0): feature 0 votes for class 0, feature 1
for class 1, and features 2 and 3 change nothing. On reference traffic
(every feature standard normal) the classes come out about 37/37/25 %;
shifting feature 3 moves an input feature and no output, shifting feature 0
changes the predicted class mix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from models import save_model
from onnx import TensorProto, helper, numpy_helper

from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.monitoring.profiling import profile_version

__all__ = [
    "FEATURES",
    "build_classifier",
    "reference_rows",
    "spec",
    "tensor",
    "write_monitored_repository",
]

FEATURES = 4
REFERENCE_ROWS = 4000


def build_classifier() -> onnx.ModelProto:
    weights = np.zeros((FEATURES, 3), dtype=np.float32)
    weights[0, 0] = weights[1, 1] = 3.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def reference_rows(rows: int, seed: int, shift: dict[int, float] | None = None) -> npt.NDArray[np.float32]:
    """Rows drawn from the reference distribution (standard normal), feature j moved by ``shift[j]`` sigmas."""
    x = np.random.default_rng(seed).standard_normal((rows, FEATURES))
    for feature, sigmas in (shift or {}).items():
        x[:, feature] += sigmas
    return x.astype(np.float32)


def write_monitored_repository(
    root: Path,
    monitoring: str,
    *,
    profile: bool = True,
    name: str = "classifier",
    sample: npt.NDArray[np.float32] | None = None,
) -> Path:
    """``root/<name>/1`` with the classifier, a config.yaml holding ``monitoring`` (YAML under
    ``monitoring:``), and, with ``profile``, a reference profile written by ``infergate profile``'s code
    from ``sample`` (default: :func:`reference_rows` of the reference distribution)."""
    config = "max_batch_size: 64\nsession_options: {intra_op_num_threads: 1}\n"
    if monitoring:
        config += "monitoring:\n" + "".join(f"  {line}\n" for line in monitoring.strip().splitlines())
    save_model(build_classifier(), root, name, 1, config)
    if profile:
        path = root / f"{name}-sample.npy"
        np.save(path, reference_rows(REFERENCE_ROWS, seed=1) if sample is None else sample)
        profile_version(root, name, 1, path, progress=False)
        path.unlink()
    return root


def spec(*inputs: TensorSpec, outputs: tuple[TensorSpec, ...] = (), batch: int = 64) -> ModelSpec:
    """A model ``m`` version 1 with these tensors (batching unless ``batch`` is 0)."""
    return ModelSpec("m", 1, inputs, outputs, batch)


def tensor(name: str, datatype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, DATATYPES[datatype], shape)
