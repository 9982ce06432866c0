"""The ModelConfig message for Triton's example models, as tritonclient parses it.

Triton's image clients read ``input[0].format``; perf_analyzer and sequence
clients read ``sequence_batching``. The message is built from real loaded
stand-ins and parsed with tritonclient's own ``model_config_pb2``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import onnx
import pytest
import tritonclient.grpc.model_config_pb2 as triton_mc
from google.protobuf import json_format
from triton_models import stand_in

from infergate.models.config import load_model_config
from infergate.models.version import ModelVersion, load_model_version
from infergate.serving.protocol import model_config_message

Load = Callable[..., Awaitable[triton_mc.ModelConfig]]


@pytest.fixture
async def config_of(tmp_path: Path) -> AsyncIterator[Load]:
    versions: list[ModelVersion] = []

    async def _config(name: str, extra_yaml: str = "") -> triton_mc.ModelConfig:
        model = stand_in(name)
        directory = tmp_path / name
        (directory / "1").mkdir(parents=True)
        onnx.save_model(model.build(), str(directory / "1" / "model.onnx"))
        (directory / "config.yaml").write_text(model.config_yaml + extra_yaml, encoding="utf-8")
        for filename, text in model.files:
            (directory / filename).write_text(text, encoding="utf-8")
        version = load_model_version(directory / "1", name, 1, load_model_config(directory / "config.yaml"))
        versions.append(version)
        parsed = triton_mc.ModelConfig()
        parsed.ParseFromString(model_config_message(version).SerializeToString())
        return parsed

    yield _config
    for version in versions:
        await version.aclose()


async def test_a_sequence_model_reports_its_sequence_batching_and_only_the_client_s_tensors(config_of: Load) -> None:
    config = await config_of("simple_dyna_sequence")
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    batching = config.sequence_batching
    assert batching.max_sequence_idle_microseconds == 10_000_000
    assert batching.oldest.max_candidate_sequences == 1024
    controls = {c.name: c.control[0] for c in batching.control_input}
    assert controls["START"].kind == triton_mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START
    assert list(controls["START"].int32_false_true) == [0, 1]
    assert controls["CORRID"].data_type == triton_mc.TYPE_UINT64
    assert [i.name for i in config.input] == ["INPUT"]
    assert [o.name for o in config.output] == ["OUTPUT"]


async def test_implicit_state_is_reported_and_the_default_strategy_is_direct(config_of: Load) -> None:
    config = await config_of("simple_sequence_implicit")
    batching = config.sequence_batching
    assert batching.WhichOneof("strategy_choice") == "direct"
    [state] = batching.state
    assert (state.input_name, state.output_name, list(state.dims)) == ("INPUT_STATE", "OUTPUT_STATE", [1])
    assert state.initial_state[0].zero_data
    assert [o.name for o in config.output] == ["OUTPUT"]


async def test_an_image_model_reports_its_input_format_and_labels_file(config_of: Load) -> None:
    config = await config_of("densenet_onnx")
    assert config.max_batch_size == 0
    assert config.input[0].format == triton_mc.ModelInput.FORMAT_NCHW
    assert list(config.input[0].dims) == [3, 224, 224]
    assert config.output[0].label_filename == "densenet_labels.txt"
    config = await config_of("inception_onnx")
    assert config.input[0].format == triton_mc.ModelInput.FORMAT_NHWC


async def test_a_plain_model_keeps_dynamic_batching(config_of: Load) -> None:
    config = await config_of("simple")
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.input[0].format == triton_mc.ModelInput.FORMAT_NONE
    assert len(config.model_warmup) == 0


async def test_warm_up_samples_are_reported(config_of: Load) -> None:
    sample = "  inputs:\n" + "".join(
        f"    {n}: {{data_type: TYPE_INT32, dims: [16], random_data: true}}\n" for n in ("INPUT0", "INPUT1")
    )
    config = await config_of("simple", "model_warmup:\n- name: noise\n  batch_size: 2\n" + sample)
    [warmup] = config.model_warmup
    assert (warmup.name, warmup.batch_size) == ("noise", 2)
    assert warmup.inputs["INPUT1"].random_data and list(warmup.inputs["INPUT1"].dims) == [16]


@pytest.mark.parametrize(
    ("policy_yaml", "expected"),
    [
        ("", {"latest": {"num_versions": 1}}),
        ("version_policy: {latest: {num_versions: 2}}\n", {"latest": {"num_versions": 2}}),
        ("version_policy: {all: {}}\n", {"all": {}}),
        # int64 versions: strings in protobuf's JSON form
        ("version_policy: {specific: {versions: [1, 3]}}\n", {"specific": {"versions": ["1", "3"]}}),
    ],
)
async def test_the_version_policy_reported_is_the_models_own(
    config_of: Load, policy_yaml: str, expected: dict[str, object]
) -> None:
    """A config read back and sent to RepositoryModelLoad must serve the same versions."""
    config = await config_of("simple", policy_yaml)
    assert json_format.MessageToDict(config.version_policy, preserving_proto_field_name=True) == expected
