"""ONNX models for load scenarios, built in code: a model that takes a set time per batch.

The test suite uses it too (tests/models.py), to hold batches "running" while
requests queue behind them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_slow_model", "make_model"]

_OPSET = 17
_IR_VERSION = 8  # the IR version that introduced opset 17; loads in any supported onnxruntime


def make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """``graph`` as a checked model at opset 17: what every model built in code for tests and load scenarios uses."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION)
    onnx.checker.check_model(model)
    return model


# The slow model spins a Loop over an NxN MatMul. N is small enough that a single
# iteration is short (fine-grained control over the total) yet large enough that
# the MatMul, not Loop bookkeeping, dominates each iteration.
_SLOW_MATRIX_SIZE = 256
# Loop iterations per hinted millisecond, calibrated with onnxruntime 1.23 on one
# thread of the development VM's x86-64 CPU (see build_slow_model's docstring).
_SLOW_ITERATIONS_PER_MS = 3.2


def _slow_loop_body() -> onnx.GraphProto:
    """Loop body: ``state = Tanh(state @ A)``; ``A`` comes from the outer scope.

    Tanh keeps every element in [-1, 1], so however many iterations run, the
    state never overflows to Inf or NaN.
    """
    return helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "A"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "slow_body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, None),
        ],
    )


def build_slow_model(milliseconds_hint: int = 100) -> onnx.ModelProto:
    """``y = x`` (bitwise) for ``x`` FP32 [batch,4], taking about ``milliseconds_hint`` ms.

    The delay is a Loop of ``3.2 * milliseconds_hint`` iterations of a 256x256
    MatMul + Tanh (about 0.31 ms each on one core). The loop's starting state is
    derived from ``Shape(x)`` (symbolic batch dimension), so onnxruntime cannot
    constant-fold it, and its cost does not depend on the batch size. The loop
    result feeds ``y = Where(IsNaN(sum), x, x)``: ``y`` depends on the loop (so it
    must run) but both branches are ``x``, so ``y`` is ``x`` bit for bit,
    including NaN, Inf and -0.0.

    Measured with onnxruntime 1.23, ``intra_op_num_threads=1``, on the 2-core
    AMD EPYC development VM: hint 50 -> 50 ms, hint 200 -> 200-205 ms per run,
    for batch 1 and batch 64 alike. Faster or busier machines will differ; treat
    the hint as an order of magnitude, not a timer.
    """
    iterations = max(1, round(milliseconds_hint * _SLOW_ITERATIONS_PER_MS))
    size = _SLOW_MATRIX_SIZE
    rng = np.random.default_rng(1234)
    matrix = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    nodes = [
        # A run-time scalar (batch + 4, always finite) seeds the loop state.
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Cast", ["x_shape"], ["x_shape_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["x_shape_f"], ["seed"], keepdims=0),
        helper.make_node("Mul", ["A", "seed"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["state0"]),
        helper.make_node("Loop", ["trip_count", "keep_going", "state0"], ["state"], body=_slow_loop_body()),
        helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
        helper.make_node("IsNaN", ["total"], ["is_nan"]),
        helper.make_node("Where", ["is_nan", "x", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(matrix, "A"),
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trip_count"),
            numpy_helper.from_array(np.array(True), "keep_going"),
        ],
    )
    return make_model(graph)
