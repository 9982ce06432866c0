"""The bundled demo model repository, built from code with ``onnx.helper``.

Nothing here is downloaded: every model is assembled node by node with
deterministic weights (``numpy.random.default_rng`` with a fixed seed per model),
so the repository is reproducible byte for byte and works offline.

Every input and output has a symbolic first dimension named ``batch``; the server
reads that as "this model batches along axis 0".

Models and their tensors (names are relied on by clients, benchmarks and tests):

``matmul16``
    ``x`` FP32 [batch,16] -> ``y`` FP32 [batch,16] = x @ W. Tiny, so a benchmark
    against it measures the server's per-request overhead, not the model.
``mlp``
    ``x`` FP32 [batch,512] -> ``y`` FP32 [batch,512]; 512 -> 3x2048 -> 512 with ReLU.
    Compute-bound enough for batching to pay off.
``cnn``
    ``image`` FP32 [batch,3,64,64] -> ``probabilities`` FP32 [batch,10]; two
    conv/relu/maxpool stages, global average pool, Gemm, Softmax.
``multi_io``
    ``a`` FP32 [batch,4], ``b`` INT64 [batch,4], ``flag`` BOOL [batch,1],
    ``text`` BYTES [batch,2] -> ``sum`` FP32 = a + float(b), ``doubled`` INT64 = b * 2,
    ``not_flag`` BOOL = not flag, ``text_out`` BYTES = text, ``half`` FP16 = fp16(a).
``identity_all``
    ``in_<DT>`` -> ``out_<DT>`` (Identity), shape [batch, n_<DT>], for every
    datatype DT in :data:`IDENTITY_DATATYPES` (all 13 run on onnxruntime's CPU
    Identity kernel; none had to be left out).
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "DEMO_MODEL_NAMES",
    "IDENTITY_DATATYPES",
    "OPSET",
    "build_cnn",
    "build_identity_all",
    "build_matmul16",
    "build_mlp",
    "build_multi_io",
    "write_demo_repository",
]

# Opset 17 with IR version 8 (the IR that introduced opset 17): old enough for
# every onnxruntime the project supports (>=1.20), new enough for all ops used.
OPSET = 17
_IR_VERSION = 8
_BATCH = "batch"

# V2 datatype name -> ONNX element type, in the order the identity model lists them.
# V2 "BYTES" is ONNX STRING.
IDENTITY_DATATYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}

Float32Array = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- helpers


def _tensor(name: str, elem_type: int, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    """A batched graph input/output: ``batch`` is always prepended as dimension 0."""
    return helper.make_tensor_value_info(name, elem_type, [_BATCH, *dims])


def _init(name: str, array: npt.NDArray[np.generic]) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name=name)


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> Float32Array:
    # He scaling keeps activations O(1) through ReLU layers, so outputs stay finite.
    scale = np.float32(np.sqrt(2.0 / fan_in))
    weights: Float32Array = rng.standard_normal(shape, dtype=np.float32) * scale
    return weights


def _make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=_IR_VERSION,
        producer_name="infergate.demo",
        doc_string=doc,
    )
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- builders


def build_matmul16() -> onnx.ModelProto:
    """``y = x @ W`` with a fixed 16x16 ``W``: overhead-bound benchmark model."""
    rng = np.random.default_rng(16)
    weight = (rng.standard_normal((16, 16)) / 4.0).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul16",
        [_tensor("x", TensorProto.FLOAT, [16])],
        [_tensor("y", TensorProto.FLOAT, [16])],
        initializer=[_init("W", weight)],
    )
    return _make_model(graph, "y = x @ W, W fixed 16x16")


def build_mlp() -> onnx.ModelProto:
    """512 -> 2048 -> 2048 -> 2048 -> 512 perceptron, ReLU after each hidden layer."""
    rng = np.random.default_rng(512)
    widths = [512, 2048, 2048, 2048, 512]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "x"
    last = len(widths) - 2
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        weight, bias = f"W{layer}", f"B{layer}"
        inits.append(_init(weight, _he_normal(rng, (fan_in, fan_out), fan_in)))
        inits.append(_init(bias, (rng.standard_normal(fan_out) * 0.01).astype(np.float32)))
        product, pre = f"matmul{layer}", ("y" if layer == last else f"pre{layer}")
        nodes.append(helper.make_node("MatMul", [current, weight], [product]))
        nodes.append(helper.make_node("Add", [product, bias], [pre]))
        if layer != last:
            current = f"relu{layer}"
            nodes.append(helper.make_node("Relu", [pre], [current]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_tensor("x", TensorProto.FLOAT, [512])],
        [_tensor("y", TensorProto.FLOAT, [512])],
        initializer=inits,
    )
    return _make_model(graph, "MLP 512 -> 3x2048 -> 512")


def _conv_stage(
    rng: np.random.Generator, stage: int, source: str, in_ch: int, out_ch: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Conv 3x3 pad 1 + Relu + MaxPool 2x2; returns nodes, initializers, output name."""
    weight, bias = f"conv{stage}_W", f"conv{stage}_B"
    conv, relu, pool = f"conv{stage}", f"relu{stage}", f"pool{stage}"
    inits = [
        _init(weight, _he_normal(rng, (out_ch, in_ch, 3, 3), in_ch * 9)),
        _init(bias, np.zeros(out_ch, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", [source, weight, bias], [conv], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [conv], [relu]),
        helper.make_node("MaxPool", [relu], [pool], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    return nodes, inits, pool


def build_cnn() -> onnx.ModelProto:
    """Small image classifier: 3x64x64 image -> 10 class probabilities."""
    rng = np.random.default_rng(64)
    nodes1, inits1, out1 = _conv_stage(rng, 1, "image", 3, 16)
    nodes2, inits2, out2 = _conv_stage(rng, 2, out1, 16, 32)
    head_w = _he_normal(rng, (32, 10), 32)
    head = [
        helper.make_node("GlobalAveragePool", [out2], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        [*nodes1, *nodes2, *head],
        "cnn",
        [_tensor("image", TensorProto.FLOAT, [3, 64, 64])],
        [_tensor("probabilities", TensorProto.FLOAT, [10])],
        initializer=[
            *inits1,
            *inits2,
            _init("fc_W", head_w),
            _init("fc_B", np.zeros(10, dtype=np.float32)),
        ],
    )
    return _make_model(graph, "CNN classifier 3x64x64 -> 10 probabilities")


def build_multi_io() -> onnx.ModelProto:
    """Several inputs and outputs of different datatypes, for protocol tests."""
    nodes = [
        helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_float"], ["sum"]),
        helper.make_node("Mul", ["b", "two"], ["doubled"]),
        helper.make_node("Not", ["flag"], ["not_flag"]),
        helper.make_node("Identity", ["text"], ["text_out"]),
        helper.make_node("Cast", ["a"], ["half"], to=TensorProto.FLOAT16),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_io",
        [
            _tensor("a", TensorProto.FLOAT, [4]),
            _tensor("b", TensorProto.INT64, [4]),
            _tensor("flag", TensorProto.BOOL, [1]),
            _tensor("text", TensorProto.STRING, [2]),
        ],
        [
            _tensor("sum", TensorProto.FLOAT, [4]),
            _tensor("doubled", TensorProto.INT64, [4]),
            _tensor("not_flag", TensorProto.BOOL, [1]),
            _tensor("text_out", TensorProto.STRING, [2]),
            _tensor("half", TensorProto.FLOAT16, [4]),
        ],
        # A scalar broadcasts over [batch, 4].
        initializer=[_init("two", np.array(2, dtype=np.int64))],
    )
    return _make_model(graph, "multi-input/multi-output datatype test model")


def build_identity_all() -> onnx.ModelProto:
    """``out_<DT> = in_<DT>`` for every V2 datatype; both dimensions symbolic."""
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    for datatype, elem_type in IDENTITY_DATATYPES.items():
        source, target = f"in_{datatype}", f"out_{datatype}"
        # The same dim_param on input and output tells shape inference they match.
        inner = [f"n_{datatype}"]
        nodes.append(helper.make_node("Identity", [source], [target]))
        inputs.append(_tensor(source, elem_type, inner))
        outputs.append(_tensor(target, elem_type, inner))
    graph = helper.make_graph(nodes, "identity_all", inputs, outputs)
    return _make_model(graph, "Identity for every datatype")


# --------------------------------------------------------------------------- repository

_BATCHING_CONFIG = """\
max_batch_size: {max_batch_size}
dynamic_batching:
  max_queue_delay_microseconds: 0
  max_queue_size: 1024
{pacing}"""


def _batching_config(purpose: str, max_batch_size: int, min_batch_interval_us: int = 0) -> str:
    pacing = f"  min_batch_interval_microseconds: {min_batch_interval_us}\n" if min_batch_interval_us else ""
    return f"# {purpose}\n" + _BATCHING_CONFIG.format(max_batch_size=max_batch_size, pacing=pacing)


def _plain_config(purpose: str, max_batch_size: int) -> str:
    return f"# {purpose}\nmax_batch_size: {max_batch_size}\n"


@dataclass(frozen=True)
class _DemoModel:
    name: str
    build: Callable[[], onnx.ModelProto]
    config_yaml: str


_DEMO_MODELS: tuple[_DemoModel, ...] = (
    _DemoModel(
        "matmul16",
        build_matmul16,
        # Overhead-bound: under load, batches start at most every 0.5 ms so the thread hop that
        # keeps session.run off the event loop is paid for several requests at once.
        _batching_config(
            "matmul16: y = x @ W (16x16); tiny, so benchmarks measure server overhead.", 64, min_batch_interval_us=500
        )
        # A 16x16 product gains nothing from a thread pool; waking one costs more than the product.
        + "session_options:\n  intra_op_num_threads: 1\n",
    ),
    _DemoModel(
        "mlp",
        build_mlp,
        _batching_config("mlp: 512 -> 3x2048 -> 512 ReLU perceptron; compute-bound batching benchmark.", 64),
    ),
    _DemoModel(
        "cnn",
        build_cnn,
        _batching_config("cnn: 3x64x64 image -> 10 softmax probabilities; convolutional workload.", 32),
    ),
    _DemoModel(
        "multi_io",
        build_multi_io,
        _plain_config("multi_io: several inputs/outputs of mixed datatypes, for protocol tests.", 16),
    ),
    _DemoModel(
        "identity_all",
        build_identity_all,
        _plain_config("identity_all: out_<DT> = in_<DT> for every datatype, for round-trip tests.", 16),
    ),
)

DEMO_MODEL_NAMES: tuple[str, ...] = tuple(model.name for model in _DEMO_MODELS)


def write_demo_repository(root: pathlib.Path) -> list[str]:
    """Write every demo model as root/<name>/1/model.onnx plus root/<name>/config.yaml.

    Existing files at those paths are overwritten; anything else under ``root``
    is left alone. Returns the model names in a fixed order.
    """
    root = pathlib.Path(root)
    for demo in _DEMO_MODELS:
        model_dir = root / demo.name
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        onnx.save_model(demo.build(), str(version_dir / "model.onnx"))
        (model_dir / "config.yaml").write_text(demo.config_yaml, encoding="utf-8")
    return list(DEMO_MODEL_NAMES)
