"""config.yaml's ``input``/``output`` entries checked against the graph's tensors."""

from __future__ import annotations

import pytest

from infergate.models.config import InputConfig, OutputConfig
from infergate.models.datatypes import DATATYPES
from infergate.models.spec import ModelSpec, TensorSpec, check_tensor_config

IMAGE = ModelSpec(
    "densenet_onnx",
    1,
    inputs=(TensorSpec("data_0", DATATYPES["FP32"], (3, 224, 224)),),
    outputs=(TensorSpec("fc6_1", DATATYPES["FP32"], (1000,)),),
    max_batch_size=0,
)
BATCHING = ModelSpec(
    "simple",
    1,
    inputs=(TensorSpec("INPUT0", DATATYPES["INT32"], (-1, 16)),),
    outputs=(TensorSpec("OUTPUT0", DATATYPES["INT32"], (-1, -1)),),
    max_batch_size=8,
)


@pytest.mark.parametrize(
    ("spec", "inputs", "outputs"),
    [
        pytest.param(IMAGE, [InputConfig(name="data_0", format="FORMAT_NCHW")], [], id="format only"),
        pytest.param(
            IMAGE,
            [InputConfig(name="data_0", data_type="TYPE_FP32", dims=[3, 224, 224])],
            [OutputConfig(name="fc6_1", dims=[1000], label_filename="labels.txt")],
            id="Triton's full entries",
        ),
        pytest.param(
            BATCHING,
            [InputConfig(name="INPUT0", dims=[16])],
            [OutputConfig(name="OUTPUT0", dims=[16])],
            id="dims without the batch; a variable graph dim takes any",
        ),
    ],
)
def test_entries_that_match_the_graph_pass(
    spec: ModelSpec, inputs: list[InputConfig], outputs: list[OutputConfig]
) -> None:
    check_tensor_config(spec, inputs, outputs)


@pytest.mark.parametrize(
    ("inputs", "outputs", "says"),
    [
        pytest.param([InputConfig(name="image")], [], "input 'image': the model has no input of that name", id="name"),
        pytest.param(
            [InputConfig(name="data_0", data_type="TYPE_UINT8")],
            [],
            "input 'data_0': data_type TYPE_UINT8, the model's is TYPE_FP32",
            id="type",
        ),
        pytest.param(
            [],
            [OutputConfig(name="fc6_1", dims=[1, 1000])],
            "output 'fc6_1': dims [1, 1000], the model's are [1000]",
            id="dims",
        ),
    ],
)
def test_entries_that_do_not_match_the_graph_say_which(
    inputs: list[InputConfig], outputs: list[OutputConfig], says: str
) -> None:
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        check_tensor_config(IMAGE, inputs, outputs)
