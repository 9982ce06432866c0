"""Stand-ins for the models Triton's example clients expect, built with ``onnx.helper``.

Triton's client repository ships example scripts (``src/python/examples``)
that talk to a fixed set of models: ``simple``, ``simple_int8``,
``simple_string``, ``simple_identity``, ``simple_sequence``,
``simple_dyna_sequence``, ``densenet_onnx`` and ``inception_onnx``. This
module builds models with the same names, tensor names, datatypes, shapes and
arithmetic, each with a ``config.yaml`` in infergate's schema, so tests (and
anyone checking compatibility by hand) can run those clients against
infergate. Nothing is downloaded or copied: every graph is assembled here.

Why here and not in ``infergate.demo``: these models exist to check
compatibility with another server's clients. They are not examples of what to
deploy, and the package should not ship models named after another project's.
Run ``python tests/triton_models.py DIR`` to write the repository by hand.

What each model computes (Triton's example models, reproduced):

``simple`` / ``simple_int8``
    ``OUTPUT0 = INPUT0 + INPUT1``, ``OUTPUT1 = INPUT0 - INPUT1``, INT32 / INT8 [batch,16].
``simple_string``
    The same on BYTES [batch,16] whose elements are decimal integers (parsed by a Cast).
``simple_identity``
    ``OUTPUT0 = INPUT0``, BYTES [batch,-1].
``simple_sequence``
    ``OUTPUT = READY * (INPUT + START)``, all INT32 [batch,1]; the server fills
    START and READY (``sequence_batching``, direct strategy). Stateless, like Triton's.
``simple_dyna_sequence``
    ``OUTPUT = READY * (INPUT + START + END * CORRID)``; CORRID UINT64 (oldest strategy).
``densenet_onnx`` / ``inception_onnx``
    An image in (FP32 [3,224,224] NCHW / [299,299,3] NHWC, no batching) and a
    score vector out ([1000] / [1001]) with a labels file, for classification.
    The compute is tiny (channel means times a fixed matrix): only the interface matters.

Extra stateful models (not in Triton's example repository, so not in
:data:`TRITON_EXAMPLE_MODELS`; Triton's client examples count exactly eight models):

``simple_string_dyna_sequence``
    What Triton's ``-d`` example runs use: a running sum kept as implicit state
    (``INPUT_STATE`` in, ``OUTPUT_STATE`` out); on END the output adds CORRID,
    a BYTES correlation id holding a decimal integer.
``simple_sequence_implicit``
    A running sum kept as implicit state, direct strategy: ``OUTPUT`` is the
    sum of the sequence's inputs so far.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "EXTRA_SEQUENCE_MODELS",
    "TRITON_EXAMPLE_MODELS",
    "StandIn",
    "running_sum",
    "stand_in",
    "write_stand_in",
    "write_triton_repository",
]

_OPSET = 17
_IR_VERSION = 8
_BATCH = "batch"

# Labels files of the image stand-ins: how many classes each scores.
DENSENET_CLASSES = 1000
INCEPTION_CLASSES = 1001


def _io(name: str, elem_type: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, dims)


def _batched(name: str, elem_type: int, *dims: int | str) -> onnx.ValueInfoProto:
    return _io(name, elem_type, [_BATCH, *dims])


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION)
    onnx.checker.check_model(model)
    return model


def build_simple(elem_type: int = TensorProto.INT32, name: str = "simple") -> onnx.ModelProto:
    """Sum and difference of two [batch,16] tensors of ``elem_type`` (INT32, INT8 or STRING)."""
    # Add/Sub have no INT8 or string kernels: compute in INT32 and cast back, as Triton's models do.
    widen = elem_type != TensorProto.INT32
    a, b = ("A", "B") if widen else ("INPUT0", "INPUT1")
    nodes = []
    if widen:
        nodes += [
            helper.make_node("Cast", ["INPUT0"], ["A"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["B"], to=TensorProto.INT32),
        ]
    nodes += [
        helper.make_node("Add", [a, b], ["SUM"]),
        helper.make_node("Sub", [a, b], ["DIFF"]),
        helper.make_node("Cast", ["SUM"], ["OUTPUT0"], to=elem_type),
        helper.make_node("Cast", ["DIFF"], ["OUTPUT1"], to=elem_type),
    ]
    return _model(
        name,
        nodes,
        [_batched("INPUT0", elem_type, 16), _batched("INPUT1", elem_type, 16)],
        [_batched("OUTPUT0", elem_type, 16), _batched("OUTPUT1", elem_type, 16)],
    )


def build_identity() -> onnx.ModelProto:
    """``OUTPUT0 = INPUT0``, BYTES [batch,-1]."""
    return _model(
        "simple_identity",
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [_batched("INPUT0", TensorProto.STRING, "n")],
        [_batched("OUTPUT0", TensorProto.STRING, "n")],
    )


def build_sequence() -> onnx.ModelProto:
    """``OUTPUT = READY * (INPUT + START)``, INT32 [batch,1]: Triton's ``simple_sequence``."""
    int32 = TensorProto.INT32
    return _model(
        "simple_sequence",
        [
            helper.make_node("Add", ["INPUT", "START"], ["SUM"]),
            helper.make_node("Mul", ["READY", "SUM"], ["OUTPUT"]),
        ],
        [_batched(n, int32, 1) for n in ("INPUT", "START", "READY")],
        [_batched("OUTPUT", int32, 1)],
    )


def build_dyna_sequence() -> onnx.ModelProto:
    """``OUTPUT = READY * (INPUT + START + END * int32(CORRID))``: Triton's ``simple_dyna_sequence``."""
    int32 = TensorProto.INT32
    return _model(
        "simple_dyna_sequence",
        [
            helper.make_node("Cast", ["CORRID"], ["CORRID32"], to=int32),
            helper.make_node("Add", ["INPUT", "START"], ["SUM0"]),
            helper.make_node("Mul", ["END", "CORRID32"], ["TAIL"]),
            helper.make_node("Add", ["SUM0", "TAIL"], ["SUM1"]),
            helper.make_node("Mul", ["READY", "SUM1"], ["OUTPUT"]),
        ],
        [
            *(_batched(n, int32, 1) for n in ("INPUT", "START", "END", "READY")),
            _batched("CORRID", TensorProto.UINT64, 1),
        ],
        [_batched("OUTPUT", int32, 1)],
    )


def _running_sum_nodes() -> list[onnx.NodeProto]:
    """``SUM = INPUT + (1 - START) * INPUT_STATE``: the state is ignored on a sequence's first request."""
    return [
        helper.make_node("Sub", ["ONE", "START"], ["KEEP"]),
        helper.make_node("Mul", ["KEEP", "INPUT_STATE"], ["CARRIED"]),
        helper.make_node("Add", ["INPUT", "CARRIED"], ["SUM"]),
    ]


def _one() -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(1, dtype=np.int32), "ONE")


def build_sequence_implicit() -> onnx.ModelProto:
    """A running sum in implicit state: ``OUTPUT = OUTPUT_STATE = INPUT + (1 - START) * INPUT_STATE``."""
    int32 = TensorProto.INT32
    return _model(
        "simple_sequence_implicit",
        [
            *_running_sum_nodes(),
            helper.make_node("Mul", ["READY", "SUM"], ["OUTPUT"]),
            helper.make_node("Identity", ["SUM"], ["OUTPUT_STATE"]),
        ],
        [_batched(n, int32, 1) for n in ("INPUT", "START", "READY", "INPUT_STATE")],
        [_batched("OUTPUT", int32, 1), _batched("OUTPUT_STATE", int32, 1)],
        [_one()],
    )


def build_string_dyna_sequence() -> onnx.ModelProto:
    """Running sum in implicit state; on END the output adds the BYTES CORRID parsed as an integer."""
    int32 = TensorProto.INT32
    return _model(
        "simple_string_dyna_sequence",
        [
            *_running_sum_nodes(),
            helper.make_node("Cast", ["CORRID"], ["CORRID32"], to=int32),
            helper.make_node("Mul", ["END", "CORRID32"], ["TAIL"]),
            helper.make_node("Add", ["SUM", "TAIL"], ["TOTAL"]),
            helper.make_node("Mul", ["READY", "TOTAL"], ["OUTPUT"]),
            helper.make_node("Identity", ["SUM"], ["OUTPUT_STATE"]),
        ],
        [
            *(_batched(n, int32, 1) for n in ("INPUT", "START", "END", "READY", "INPUT_STATE")),
            _batched("CORRID", TensorProto.STRING, 1),
        ],
        [_batched("OUTPUT", int32, 1), _batched("OUTPUT_STATE", int32, 1)],
        [_one()],
    )


def _image_classifier(
    name: str, input_name: str, output_name: str, shape: list[int], channel_axis: int, classes: int
) -> onnx.ModelProto:
    """Scores = channel means @ W (fixed): the image clients' interface at a negligible cost."""
    spatial = [axis for axis in range(3) if axis != channel_axis]
    rng = np.random.default_rng(classes)
    weights = rng.standard_normal((1, 3, classes)).astype(np.float32)
    return _model(
        name,
        [
            helper.make_node("ReduceMean", [input_name], ["MEANS"], axes=spatial, keepdims=0),
            helper.make_node("Unsqueeze", ["MEANS", "AXIS0"], ["ROW"]),
            helper.make_node("MatMul", ["ROW", "W"], ["SCORES"]),
            helper.make_node("Reshape", ["SCORES", "FLAT"], [output_name]),
        ],
        [_io(input_name, TensorProto.FLOAT, list(shape))],
        [_io(output_name, TensorProto.FLOAT, [classes])],
        [
            numpy_helper.from_array(weights[0], "W"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "AXIS0"),
            numpy_helper.from_array(np.array([classes], dtype=np.int64), "FLAT"),
        ],
    )


def build_densenet() -> onnx.ModelProto:
    return _image_classifier("densenet_onnx", "data_0", "fc6_1", [3, 224, 224], 0, DENSENET_CLASSES)


def build_inception() -> onnx.ModelProto:
    return _image_classifier(
        "inception_onnx", "input:0", "InceptionV3/Predictions/Softmax:0", [299, 299, 3], 2, INCEPTION_CLASSES
    )


def running_sum(values: list[int]) -> list[int]:
    """What ``simple_sequence_implicit`` answers to a sequence of ``values``."""
    return [int(x) for x in np.cumsum(values)]


# --------------------------------------------------------------------------- configs

_BOOL_CONTROL = "    control:\n      - kind: {kind}\n        int32_false_true: [0, 1]\n"


def _controls(*pairs: tuple[str, str]) -> str:
    lines = "  control_input:\n"
    for name, kind in pairs:
        if kind == "CONTROL_SEQUENCE_CORRID":
            lines += f"  - name: {name}\n    control:\n      - kind: {kind}\n        data_type: {{corrid_type}}\n"
        else:
            lines += f"  - name: {name}\n" + _BOOL_CONTROL.format(kind=kind)
    return lines


_STATE = """  state:
  - input_name: INPUT_STATE
    output_name: OUTPUT_STATE
    data_type: TYPE_INT32
    dims: [1]
    initial_state:
    - data_type: TYPE_INT32
      dims: [1]
      zero_data: true
      name: zeros
"""

_START_READY = _controls(("START", "CONTROL_SEQUENCE_START"), ("READY", "CONTROL_SEQUENCE_READY"))
_DYNA = _controls(
    ("START", "CONTROL_SEQUENCE_START"),
    ("END", "CONTROL_SEQUENCE_END"),
    ("READY", "CONTROL_SEQUENCE_READY"),
    ("CORRID", "CONTROL_SEQUENCE_CORRID"),
)
_OLDEST = """  max_sequence_idle_microseconds: 10000000
  oldest:
    max_candidate_sequences: 1024
    max_queue_delay_microseconds: 10000
"""


def _image_config(input_name: str, fmt: str, output_name: str, labels: str) -> str:
    return (
        "max_batch_size: 0\n"
        f"input:\n- name: {input_name!r}\n  format: {fmt}\n"
        f"output:\n- name: {output_name!r}\n  label_filename: {labels}\n"
    )


@dataclass(frozen=True)
class StandIn:
    """One model of the repository: how to build it, its config.yaml and any extra files."""

    name: str
    build: Callable[[], onnx.ModelProto]
    config_yaml: str
    files: tuple[tuple[str, str], ...] = ()  # (file name in the model directory, text)


def _labels(count: int) -> str:
    return "".join(f"CLASS_{i}\n" for i in range(count))


TRITON_EXAMPLE_MODELS: tuple[StandIn, ...] = (
    StandIn("simple", build_simple, "max_batch_size: 8\n"),
    StandIn("simple_int8", lambda: build_simple(TensorProto.INT8, "simple_int8"), "max_batch_size: 8\n"),
    StandIn("simple_string", lambda: build_simple(TensorProto.STRING, "simple_string"), "max_batch_size: 8\n"),
    StandIn("simple_identity", build_identity, "max_batch_size: 8\n"),
    StandIn("simple_sequence", build_sequence, "max_batch_size: 8\nsequence_batching:\n" + _START_READY),
    StandIn(
        "simple_dyna_sequence",
        build_dyna_sequence,
        "max_batch_size: 8\ninstance_group:\n  count: 2\nsequence_batching:\n"
        + _OLDEST
        + _DYNA.format(corrid_type="TYPE_UINT64"),
    ),
    StandIn(
        "densenet_onnx",
        build_densenet,
        _image_config("data_0", "FORMAT_NCHW", "fc6_1", "densenet_labels.txt"),
        (("densenet_labels.txt", _labels(DENSENET_CLASSES)),),
    ),
    StandIn(
        "inception_onnx",
        build_inception,
        _image_config("input:0", "FORMAT_NHWC", "InceptionV3/Predictions/Softmax:0", "inception_labels.txt"),
        (("inception_labels.txt", _labels(INCEPTION_CLASSES)),),
    ),
)

EXTRA_SEQUENCE_MODELS: tuple[StandIn, ...] = (
    StandIn(
        "simple_string_dyna_sequence",
        build_string_dyna_sequence,
        "max_batch_size: 8\ninstance_group:\n  count: 2\nsequence_batching:\n"
        + _OLDEST
        + _DYNA.format(corrid_type="TYPE_STRING")
        + _STATE,
    ),
    StandIn(
        "simple_sequence_implicit",
        build_sequence_implicit,
        "max_batch_size: 8\nsequence_batching:\n  max_sequence_idle_microseconds: 5000000\n" + _START_READY + _STATE,
    ),
)

_ALL = {m.name: m for m in (*TRITON_EXAMPLE_MODELS, *EXTRA_SEQUENCE_MODELS)}


def stand_in(name: str) -> StandIn:
    """The stand-in called ``name`` (KeyError if there is none)."""
    return _ALL[name]


def write_triton_repository(root: Path, names: list[str] | None = None) -> list[str]:
    """Write ``root/<name>/1/model.onnx``, ``root/<name>/config.yaml`` and extra files.

    ``names`` defaults to Triton's eight example models. Returns the names written.
    """
    chosen = names if names is not None else [m.name for m in TRITON_EXAMPLE_MODELS]
    for name in chosen:
        write_stand_in(root, _ALL[name])
    return chosen


def write_stand_in(root: Path, model: StandIn, versions: tuple[int, ...] = (1,)) -> Path:
    """Write one model (say, a stand-in with another name or config) under ``root``; returns its directory."""
    model_dir = Path(root) / model.name
    for version in versions:
        (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
        onnx.save_model(model.build(), str(model_dir / str(version) / "model.onnx"))
    (model_dir / "config.yaml").write_text(model.config_yaml, encoding="utf-8")
    for filename, text in model.files:
        (model_dir / filename).write_text(text, encoding="utf-8")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("root", type=Path, help="repository directory to write")
    parser.add_argument("--all", action="store_true", help="also write the extra stateful sequence models")
    args = parser.parse_args(argv)
    names = list(_ALL) if args.all else None
    for name in write_triton_repository(args.root, names):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
