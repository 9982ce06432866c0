"""RepositoryModelLoad's ``config`` and ``file:`` overrides, validated like config.yaml.

Messages start with Triton's ``failed to load '<model>'`` (what its clients
match on) and go on to say what was wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infergate._proto import grpc_service_pb2 as pb
from infergate.errors import InvalidArgument, Status
from infergate.models.config import PROVIDERS, model_config_from_data
from infergate.models.overrides import LoadOverride, PollFailed, parse_load_parameters, placement, stage_files

MODEL = "simple"


def params(values: dict[str, Any]) -> dict[str, pb.ModelRepositoryParameter]:
    """Parameters as RepositoryModelLoadRequest carries them, each value in the field of its type."""
    kinds = {bytes: "bytes_param", str: "string_param", int: "int64_param", bool: "bool_param"}
    return {name: pb.ModelRepositoryParameter(**{kinds[type(value)]: value}) for name, value in values.items()}


def test_no_parameters_override_nothing() -> None:
    assert parse_load_parameters(MODEL, {}) == LoadOverride()


def test_triton_s_example_override_sets_max_batch_size_even_as_a_string() -> None:
    override = parse_load_parameters(MODEL, params({"config": '{"max_batch_size":"16"}'}))
    assert override.config is not None and override.config.max_batch_size == 16
    assert override.files == {}


def test_the_parameters_model_config_answers_with_load_back_as_metadata() -> None:
    """ModelConfig serves governance metadata as string parameters (and the file's sha256, which the
    server computes itself and this drops): tritonclient's JSON of a model loads back as its override."""
    served = {
        "owner": "risk-team",
        "tags": "fraud,tabular",
        "label.stage": "prod",
        "sha256": "ab" * 32,
        "intra_op_thread_count": "2",
    }
    text = json.dumps({"max_batch_size": "8", "parameters": {k: {"string_value": v} for k, v in served.items()}})
    config = parse_load_parameters(MODEL, params({"config": text})).config
    assert config is not None
    assert (config.metadata.owner, config.metadata.tags) == ("risk-team", ["fraud", "tabular"])
    assert (config.metadata.labels, config.metadata.sha256) == ({"stage": "prod"}, None)
    assert config.session_options.intra_op_num_threads == 2


def test_a_sequence_model_config_is_taken_in_json() -> None:
    text = (
        '{"max_batch_size": 8, "sequence_batching": {"control_input": [{"name": "START", "control": '
        '[{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]}]}}'
    )
    override = parse_load_parameters(MODEL, params({"config": text}))
    assert override.config is not None and override.config.sequence_batching is not None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param(
            '"parameters": {"config": {{"max_batch_size": "16"}}}',
            "failed to load 'simple': Invalid config override: not valid JSON",
            id="Triton's example of a wrong format",
        ),
        pytest.param("[1, 2]", "the JSON must be an object, not list", id="not an object"),
        pytest.param(
            '{"max_batch_size": -1}',
            "failed to load 'simple': Invalid config override: max_batch_size: Input should be greater than or equal",
            id="a bad value names the field",
        ),
        pytest.param('{"dynamic_batching": {"delay": 5}}', "dynamic_batching.delay: Extra inputs", id="unknown key"),
        pytest.param('{"name": "other"}', "name: must be 'simple'", id="another model's name"),
        pytest.param('{"platform": "tensorrt_plan"}', "platform: must be 'onnxruntime_onnx'", id="another platform"),
        pytest.param(
            '{"maxBatchSize": 4}', "snake_case as config.yaml does (maxBatchSize -> max_batch_size)", id="camel"
        ),
        pytest.param(
            '{"instance_group": [{"count": 1, "kind": "KIND_MODEL"}]}',
            "instance_group.0.kind: KIND_MODEL is not taken; choose devices with execution_providers",
            id="instances the model places",
        ),
        pytest.param(
            '{"instance_group": [{"kind": "KIND_GPU", "gpus": [0, 1]}]}',
            "instance_group.0.gpus: [0, 1]: infergate runs a model on one GPU",
            id="instances on two GPUs",
        ),
        pytest.param(
            '{"instance_group": [{"kind": "KIND_GPU"}, {"kind": "KIND_CPU"}]}',
            "instance_group: infergate runs a model's instances on one device",
            id="instances on a GPU and on the CPU",
        ),
        pytest.param(
            '{"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [8]}}',
            "dynamic_batching.preferred_batch_size: [8] exceed max_batch_size 4",
            id="the same cross-field checks as config.yaml",
        ),
    ],
)
def test_a_bad_config_override_is_refused_saying_what(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_load_parameters(MODEL, params({"config": text}))
    assert "failed to load 'simple'" in refused.value.message
    assert says in refused.value.message, refused.value.message


@pytest.mark.parametrize(
    ("group", "provider"),
    [
        pytest.param('{"count": 2, "kind": "KIND_GPU", "gpus": ["1"]}', {"device_id": 1}, id="on GPU 1"),
        pytest.param('{"count": 2, "kind": "KIND_GPU"}', {}, id="on the GPU onnxruntime picks (device 0)"),
    ],
)
def test_gpu_instances_run_on_cuda_as_in_triton(group: str, provider: dict[str, int]) -> None:
    """Triton's onnxruntime backend runs a KIND_GPU instance with CUDA; nothing falls back to the CPU."""
    config = parse_load_parameters(MODEL, params({"config": f'{{"instance_group": [{group}]}}'})).config
    assert config is not None and config.instance_group.count == 2
    assert [(p.name, p.options) for p in config.execution_providers] == [("cuda", provider)]


TENSORRT = {
    "name": "tensorrt",
    "parameters": {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": "1073741824",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/cache",
    },
}


@pytest.mark.parametrize(
    ("config", "providers"),
    [
        pytest.param(
            {"instance_group": [{"kind": "KIND_GPU", "gpus": [1]}], "optimization": {"execution_accelerators": {
                "gpu_execution_accelerator": [TENSORRT]}}},
            [
                # onnxruntime's Python bindings take a switch as "True", never Triton's "1"
                ("tensorrt", {"device_id": 1, "trt_fp16_enable": "True", "trt_max_workspace_size": "1073741824",
                              "trt_engine_cache_enable": "True", "trt_engine_cache_path": "/cache"}),
                ("cuda", {"device_id": 1}),
            ],
            id="TensorRT on GPU 1, then CUDA",
        ),
        pytest.param(
            {"optimization": {"execution_accelerators": {"gpu_execution_accelerator": [{"name": "tensorrt"}]}}},
            [("tensorrt", {}), ("cuda", {})],
            id="TensorRT with no instance group (KIND_AUTO: the GPU)",
        ),
        pytest.param(
            {"instance_group": [{"kind": "KIND_CPU"}], "optimization": {"execution_accelerators": {
                "cpu_execution_accelerator": [{"name": "openvino"}]}}},
            [("openvino", {}), ("cpu", {})],
            id="OpenVINO, then the CPU",
        ),
    ],
)  # fmt: skip
def test_triton_s_execution_accelerators_become_execution_providers(
    config: dict[str, Any], providers: list[tuple[str, dict[str, Any]]]
) -> None:
    """As Triton's onnxruntime backend runs them (checked as configuration: running TensorRT needs a GPU)."""
    loaded = parse_load_parameters(MODEL, params({"config": json.dumps(config)})).config
    assert loaded is not None
    assert [(p.name, p.options) for p in loaded.execution_providers] == providers


TENSORRT_OPTIONS = {
    "device_id": 1,
    "trt_fp16_enable": True,
    "trt_max_workspace_size": 1073741824,
    "trt_engine_cache_path": "/cache",
}


@pytest.mark.parametrize(
    ("providers", "running", "loads_back_as"),
    [
        pytest.param([{"name": "cuda", "options": {"device_id": 1}}], "cuda", [("cuda", {"device_id": 1})],
                     id="CUDA on GPU 1"),
        pytest.param([{"name": "cuda"}, {"name": "cpu"}], "cuda", [("cuda", {"device_id": 0})],
                     id="CUDA with a CPU fallback: the GPU (a Triton GPU instance has no fallback)"),
        pytest.param([{"name": "cuda"}, {"name": "cpu"}], "cpu", [("cpu", {})],
                     id="CUDA asked for, fell back to the CPU: the CPU"),
        pytest.param(
            [{"name": "tensorrt", "options": TENSORRT_OPTIONS}, {"name": "cuda", "options": {"device_id": 1}}],
            "tensorrt",
            [("tensorrt", {"device_id": 1, "trt_fp16_enable": "True", "trt_max_workspace_size": "1073741824",
                           "trt_engine_cache_path": "/cache"}), ("cuda", {"device_id": 1})],
            id="TensorRT in FP16 on GPU 1, then CUDA",
        ),
        pytest.param([{"name": "openvino"}, {"name": "cpu"}], "openvino", [("openvino", {}), ("cpu", {})],
                     id="OpenVINO: the CPU with an accelerator, never a GPU"),
        pytest.param([{"name": "cpu"}], "cpu", [("cpu", {})], id="the CPU"),
    ],
)  # fmt: skip
def test_model_config_names_where_a_model_runs_and_its_json_loads_back_there(
    providers: list[dict[str, Any]], running: str, loads_back_as: list[tuple[str, dict[str, Any]]]
) -> None:
    """ModelConfig's instance group and accelerators, from the providers configured and the one the
    session runs on. Checked as configuration: no GPU, TensorRT or OpenVINO session runs here."""
    configured = model_config_from_data({"execution_providers": providers}, "config.yaml").execution_providers
    group, optimization = placement(configured, PROVIDERS[running])
    answered = {"instance_group": [{"count": 1, **group}], "optimization": optimization}
    loaded = parse_load_parameters(MODEL, params({"config": json.dumps(answered)})).config
    assert loaded is not None
    assert [(p.name, p.options) for p in loaded.execution_providers] == loads_back_as


@pytest.mark.parametrize(
    ("config", "says"),
    [
        pytest.param(
            {"optimization": {"cuda": {"graphs": True}}},
            "optimization: ['cuda'] not taken (execution_accelerators and graph are)",
            id="Triton's CUDA graphs (infergate's are device_execution.cuda_graph_batch_sizes)",
        ),
        pytest.param(
            {"optimization": {"graph": {"level": 3}}},
            "optimization.graph.level: 3 not taken (-1 basic, 1 extended, 2 none, 0 all)",
            id="a graph level the onnxruntime backend does not define",
        ),
        pytest.param(
            {"optimization": {"execution_accelerators": {"gpu_execution_accelerator": [{"name": "cuda"}]}}},
            "gpu_execution_accelerator: ['cuda'] not taken (infergate takes one, 'tensorrt')",
            id="another GPU accelerator",
        ),
        pytest.param(
            {"instance_group": [{"kind": "KIND_CPU"}],
             "optimization": {"execution_accelerators": {"gpu_execution_accelerator": [TENSORRT]}}},
            "gpu_execution_accelerator: the instance_group is KIND_CPU",
            id="TensorRT on CPU instances",
        ),
        pytest.param(
            {"optimization": {"execution_accelerators": {"gpu_execution_accelerator": [
                {"name": "tensorrt", "parameters": {"precision_mode": "FP8"}}]}}},
            "parameters.precision_mode: 'FP8' not taken (FP32, FP16, INT8)",
            id="a precision TensorRT is not given",
        ),
        pytest.param(
            {"optimization": {"execution_accelerators": {"gpu_execution_accelerator": [
                {"name": "tensorrt", "parameters": {"minimum_segment_size": "3"}}]}}},
            "gpu_execution_accelerator.0.parameters.minimum_segment_size: not taken",
            id="TensorFlow's TensorRT parameter",
        ),
        pytest.param(
            {"instance_group": [{"kind": "KIND_GPU"}], "execution_providers": [{"name": "cpu"}]},
            "a KIND_GPU instance_group or an accelerator, and execution_providers: give one of them",
            id="GPU instances and providers of its own",
        ),
    ],
)  # fmt: skip
def test_accelerators_infergate_cannot_honour_are_refused_naming_them(config: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_load_parameters(MODEL, params({"config": json.dumps(config)}))
    assert says in refused.value.message, refused.value.message


def test_triton_s_json_shapes_are_translated() -> None:
    text = (
        '{"name": "simple", "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": 8,'
        ' "instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"kind": "KIND_AUTO"}],'
        ' "dynamic_batching": {"max_queue_delay_microseconds": 100, "default_queue_policy":'
        ' {"max_queue_size": 7, "default_timeout_microseconds": 9, "allow_timeout_override": true}},'
        ' "input": [{"name": "INPUT0", "data_type": "TYPE_INT32", "dims": ["16"]}]}'
    )
    config = parse_load_parameters(MODEL, params({"config": text})).config
    assert config is not None
    assert config.instance_group.count == 3
    assert (config.dynamic_batching.max_queue_size, config.dynamic_batching.default_timeout_microseconds) == (7, 9)
    assert config.input[0].dims == [16]


def test_files_come_with_a_config_and_a_version_directory() -> None:
    override = parse_load_parameters(
        MODEL, params({"config": "{}", "file:1/model.onnx": b"onnx", "file:labels.txt": b"a\n"})
    )
    assert override.files == {"1/model.onnx": b"onnx", "labels.txt": b"a\n"}


@pytest.mark.parametrize(
    ("given", "says"),
    [
        pytest.param({"file:1/model.onnx": b"x"}, "file overrides need a 'config' parameter too", id="no config"),
        pytest.param({"config": "{}", "file:model.onnx": b"x"}, "hold no '<version>/model.onnx'", id="no version"),
        pytest.param({"config": "{}", "file:../1/model.onnx": b"x"}, "must be a relative path", id="escapes"),
        pytest.param({"config": "{}", "file:/etc/1/model.onnx": b"x"}, "must be a relative path", id="absolute"),
        pytest.param({"config": "{}", "file:": b"x"}, "must be a relative path", id="empty"),
        pytest.param({"config": "{}", "file:1/model.onnx": "text"}, "must have bytes type", id="file as a string"),
        pytest.param({"config": 5}, "Config parameter 'config' must have string type", id="config as a number"),
        pytest.param({"colour": True}, "Unrecognized load parameter 'colour' with type 'bool_param'", id="unknown"),
    ],
)
def test_bad_file_overrides_are_refused(given: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_load_parameters(MODEL, params(given))
    assert says in refused.value.message


def test_a_file_name_longer_than_the_filesystem_allows_fails_to_poll_as_in_triton() -> None:
    raw = {
        "config": pb.ModelRepositoryParameter(string_param="{}"),
        "file:" + "A" * 256: pb.ModelRepositoryParameter(bytes_param=b"a"),
    }
    with pytest.raises(PollFailed) as refused:
        parse_load_parameters(MODEL, raw)
    assert refused.value.status is Status.INTERNAL  # what Triton answers, and what its example client checks
    assert "failed to load 'simple', failed to poll from model repository" in refused.value.message


def test_staged_files_lay_out_the_model_directory(tmp_path: Path) -> None:
    override = LoadOverride(files={"1/model.onnx": b"onnx", "labels.txt": b"a\n"})
    stage_files(override, tmp_path / "simple")
    assert (tmp_path / "simple" / "1" / "model.onnx").read_bytes() == b"onnx"
    assert (tmp_path / "simple" / "labels.txt").read_text() == "a\n"


# --------------------------------------------------------------------------- numbers protobuf's JSON writes as strings

# Triton's JSON, as protobuf's JSON mapping writes it: every 64-bit integer a string, wherever it is
# (MessageToJson of a ModelConfig, tritonclient's get_model_config(as_json=True), Triton's own overrides).
SEQUENCE_TENSORS = '"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4"]}]'


@pytest.mark.parametrize(
    ("text", "read", "expected"),
    [
        pytest.param(
            '{"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "4"]}]}',
            lambda c: c.input[0].dims, [-1, 4], id="input dims",
        ),
        pytest.param(
            '{"output": [{"name": "y", "data_type": "TYPE_FP32", "dims": ["4"]}]}',
            lambda c: c.output[0].dims, [4], id="output dims",
        ),
        pytest.param(
            '{"version_policy": {"specific": {"versions": ["1", "3"]}}}',
            lambda c: c.version_policy.specific.versions, [1, 3], id="specific versions",
        ),
        pytest.param(
            '{"dynamic_batching": {"max_queue_delay_microseconds": "100", "priority_levels": "2",'
            ' "default_priority_level": "1", "default_queue_policy": {"default_timeout_microseconds": "250"}}}',
            lambda c: (
                c.dynamic_batching.max_queue_delay_microseconds, c.dynamic_batching.priority_levels,
                c.dynamic_batching.default_priority_level, c.dynamic_batching.default_timeout_microseconds,
            ),
            (100, 2, 1, 250), id="dynamic batching and its queue policy",
        ),
        pytest.param(
            '{"max_batch_size": 8, ' + SEQUENCE_TENSORS + ', "model_warmup": [{"name": "w", "batch_size": 2,'
            ' "inputs": {"x": {"data_type": "TYPE_FP32", "dims": ["4"], "zero_data": true}}}]}',
            lambda c: c.model_warmup[0].inputs["x"].dims, [4], id="warm-up input dims, in a map",
        ),
        pytest.param(
            '{"sequence_batching": {"max_sequence_idle_microseconds": "5000000", "oldest":'
            ' {"max_queue_delay_microseconds": "100"}, "state": [{"input_name": "s_in", "output_name": "s_out",'
            ' "data_type": "TYPE_FP32", "dims": ["-1"]}]}}',
            lambda c: (
                c.sequence_batching.max_sequence_idle_microseconds,
                c.sequence_batching.oldest.max_queue_delay_microseconds, c.sequence_batching.state[0].dims,
            ),
            (5_000_000, 100, [-1]), id="sequence batching",
        ),
        pytest.param(
            '{"platform": "ensemble", "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4"]}],'
            ' "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": ["4"]}], "ensemble_scheduling": {"step":'
            ' [{"model_name": "m", "model_version": "-1", "input_map": {"x": "x"}, "output_map": {"y": "y"}}]}}',
            lambda c: c.ensemble_scheduling.step[0].model_version, -1, id="ensemble step version",
        ),
    ],
)  # fmt: skip
def test_int64_fields_that_triton_s_json_writes_as_strings_load_wherever_they_are(
    text: str, read: Any, expected: Any
) -> None:
    config = parse_load_parameters(MODEL, params({"config": text})).config
    assert config is not None
    assert read(config) == expected


@pytest.mark.parametrize(
    ("config", "says"),
    [
        # infergate's own keys, which Triton's proto does not have: config.yaml's numbers, never strings
        pytest.param(
            {"dynamic_batching": {"max_queue_size": "8"}},
            "dynamic_batching.max_queue_size: Input should be a valid integer",
            id="infergate's max_queue_size (Triton's is in default_queue_policy)",
        ),
        pytest.param(
            {"session_options": {"intra_op_num_threads": "2"}},
            "session_options.intra_op_num_threads: Input should be a valid integer",
            id="session options",
        ),
        pytest.param(
            {"warmup": {"batch_sizes": ["4"]}}, "warmup.batch_sizes.0: Input should be a valid integer", id="warmup"
        ),
        pytest.param(
            {"sequence_batching": {"max_backlog_sequences": "8"}},
            "sequence_batching.max_backlog_sequences: Input should be a valid integer",
            id="a sequence model's backlog",
        ),
        pytest.param(
            {"instance_group": {"count": "2"}},
            "instance_group.count: Value error, expected a number of instances from 1 to 64, or auto; got '2'",
            id="config.yaml's instance_group, not Triton's list",
        ),
        pytest.param(
            {"routing": {"weights": {"1": "90"}}}, "routing.weights.1: Input should be a valid number", id="weights"
        ),
        # in Triton's fields: only an integer written as one
        pytest.param({"max_batch_size": "16.0"}, "max_batch_size: Input should be a valid integer", id="16.0"),
        pytest.param({"max_batch_size": " 16"}, "max_batch_size: Input should be a valid integer", id="a space"),
        pytest.param({"max_batch_size": True}, "max_batch_size: Input should be a valid integer", id="a bool"),
        pytest.param(
            {"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4.0"]}]},
            "input.0.dims.0: Input should be a valid integer",
            id="a fraction in dims",
        ),
        pytest.param(
            {"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": "4"}]},
            "input.0.dims: Input should be a valid list",
            id="a string for a list",
        ),
        pytest.param(
            {"sequence_batching": {"direct": {"minimum_slot_utilization": "0.5"}}},
            "sequence_batching.direct.minimum_slot_utilization: Input should be a valid number",
            id="a float field",
        ),
    ],
)
def test_a_number_as_a_string_is_refused_outside_triton_s_integer_fields(config: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_load_parameters(MODEL, params({"config": json.dumps(config)}))
    assert f"failed to load 'simple': Invalid config override: {says}" in refused.value.message, refused.value.message
