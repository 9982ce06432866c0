"""A model directory copied from a Triton repository serves with its config.pbtxt.

infergate reads Triton's protobuf text format with the fields it takes and
validates the result as it validates a config.yaml: a field it does not take
is refused naming the file and the line, never ignored. Against a real server
with tritonclient, and through ``infergate check`` (the CI gate).
"""

from __future__ import annotations

import asyncio
import copy
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import running_server
from triton_models import stand_in, write_stand_in

from infergate.check import check_repository
from infergate.cli import main
from infergate.configfile import ConfigError
from infergate.models.config_files import read_model_config
from infergate.models.overrides import config_from_json
from tests.test_model_control import build_scale_model  # y = x * factor, x FP32 [batch, 4]

# What a Triton user writes for an onnxruntime model, comments and both list spellings included.
TRITON_CONFIG = """
name: "scale"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x", data_type: TYPE_FP32, dims: [ 4 ] } ]
output {
  name: "y"
  data_type: TYPE_FP32
  dims: [ 4 ]
}
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 200
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 64 }
}
version_policy: { latest: { num_versions: 2 } }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def write_model(root: Path, config: str, name: str = "scale", file: str = "config.pbtxt") -> Path:
    directory = root / name
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.onnx").write_bytes(build_scale_model(3.0).SerializeToString())
    (directory / file).write_text(textwrap.dedent(config))
    return directory


def test_a_triton_config_pbtxt_serves_as_triton_would_serve_it(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, TRITON_CONFIG)
    with running_server(root, tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("scale", [tensor], priority=1).as_numpy("y"), x * 3)
        config = client.get_model_config("scale").config
    assert config.max_batch_size == 8
    assert [g.count for g in config.instance_group] == [2]
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 200
    assert (batching.priority_levels, batching.default_priority_level) == (2, 2)
    assert batching.default_queue_policy.max_queue_size == 64


def test_the_onnxruntime_backends_parameters_become_session_options(tmp_path: Path) -> None:
    config = read_model_config(write_model(tmp_path, TRITON_CONFIG))
    assert config.session_options.intra_op_num_threads == 1
    assert config.version_policy.select([1, 2, 3]) == [2, 3]


@pytest.mark.parametrize(("level", "session_level"), [(-1, "basic"), (1, "extended"), (2, "disable"), (0, "all")])
def test_the_graph_optimization_level_is_read_as_the_onnxruntime_backend_reads_it(
    tmp_path: Path, level: int, session_level: str
) -> None:
    config = read_model_config(write_model(tmp_path, f"optimization {{ graph {{ level: {level} }} }}\n"))
    assert config.session_options.graph_optimization_level == session_level


# Triton's ensemble syntax: ``scale`` twice. Named to sort before its step model: it still loads after it.
ENSEMBLE = """
name: "a_pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "INPUT", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUTPUT", data_type: TYPE_FP32, dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "scale"
      model_version: -1
      input_map { key: "x" value: "INPUT" }
      output_map { key: "y" value: "tripled" }
    },
    {
      model_name: "scale"
      model_version: 1
      input_map { key: "x" value: "tripled" }
      output_map { key: "y" value: "OUTPUT" }
    }
  ]
}
"""


def test_an_ensemble_in_a_config_pbtxt_runs_its_steps(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, TRITON_CONFIG)
    (root / "a_pipeline" / "1").mkdir(parents=True)
    (root / "a_pipeline" / "config.pbtxt").write_text(ENSEMBLE)
    with running_server(root, tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        x = np.ones((1, 4), dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("a_pipeline", [tensor]).as_numpy("OUTPUT"), x * 9)
        assert client.get_model_metadata("a_pipeline").platform == "ensemble"


def test_max_batch_size_0_written_does_not_batch_and_left_out_takes_infergates_default(tmp_path: Path) -> None:
    """Triton's 0 is "no batching"; leaving it out gets what a config.yaml without it gets."""
    written = read_model_config(write_model(tmp_path, "max_batch_size: 0\n", name="written"))
    left_out = read_model_config(write_model(tmp_path, 'platform: "onnxruntime_onnx"\n', name="left_out"))
    assert written.max_batch_size == 0
    assert left_out.max_batch_size is None


def test_the_int64_fields_protobuf_s_json_writes_as_strings_read_as_integers(tmp_path: Path) -> None:
    """A config.pbtxt reaches the config.yaml checks as protobuf's JSON, which writes int64 as strings."""
    config = read_model_config(
        write_model(
            tmp_path,
            """
            max_batch_size: 8
            input [ { name: "x", data_type: TYPE_FP32, dims: [ -1 ] } ]
            output [ { name: "y", data_type: TYPE_FP32, dims: [ -1 ] } ]
            version_policy { specific { versions: [ 1, 3 ] } }
            dynamic_batching {
              max_queue_delay_microseconds: 200
              default_queue_policy { default_timeout_microseconds: 5000, max_queue_size: 64 }
            }
            model_warmup [ { name: "w", batch_size: 2, inputs { key: "x", value: {
              data_type: TYPE_FP32, dims: [ 4 ], zero_data: true } } } ]
            """,
        )
    )
    assert (config.input[0].dims, config.output[0].dims) == ([-1], [-1])
    assert config.version_policy.select([1, 2, 3]) == [1, 3]
    batching = config.dynamic_batching
    assert (batching.max_queue_delay_microseconds, batching.default_timeout_microseconds) == (200, 5000)
    assert config.model_warmup[0].inputs["x"].dims == [4]


@pytest.mark.parametrize(
    ("config", "said"),
    [
        pytest.param(
            'name: "scale"\nmodel_transaction_policy { decoupled: true }\n',
            'config.pbtxt: 2:1 : Message type "inference.ModelConfig" has no field named "model_transaction_policy"',
            id="a field infergate does not take",
        ),
        pytest.param(
            "max_batch_size: eight\n",
            "config.pbtxt: 1:17 : 'max_batch_size: eight': Couldn't parse integer",
            id="a value of the wrong type",
        ),
        pytest.param(
            "instance_group [ { kind: KIND_GPU, gpus: [ 0, 1 ] } ]\n",
            "config.pbtxt: instance_group.0.gpus: [0, 1]: infergate runs a model on one GPU",
            id="instances on two GPUs",
        ),
        pytest.param(
            'parameters { key: "enable_mem_arena" value: { string_value: "0" } }\n',
            "config.pbtxt: parameters.enable_mem_arena: not taken",
            id="an onnxruntime parameter infergate does not take",
        ),
        pytest.param('name: "other"\n', "config.pbtxt: name: must be 'scale' (or left out)", id="another model's name"),
        pytest.param(
            "dynamic_batching { preferred_batch_size: [ 0 ] }\n",
            "config.pbtxt: dynamic_batching.preferred_batch_size.0",
            id="a value the config.yaml check refuses",
        ),
    ],
)
def test_what_infergate_cannot_honour_is_refused_naming_the_file(tmp_path: Path, config: str, said: str) -> None:
    directory = write_model(tmp_path, config)
    with pytest.raises(ConfigError) as refused:
        read_model_config(directory)
    assert said in str(refused.value)
    assert str(directory / "config.pbtxt") in str(refused.value)


def test_a_directory_with_both_config_files_is_refused(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "max_batch_size: 8\n")
    (directory / "config.yaml").write_text("max_batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"both config\.yaml and config\.pbtxt; keep one"):
        read_model_config(directory)


def test_the_ci_gate_reads_config_pbtxt_as_the_server_does(tmp_path: Path) -> None:
    write_model(tmp_path, TRITON_CONFIG)
    write_model(tmp_path, 'name: "broken"\nmodel_transaction_policy { }\n', name="broken")
    report = asyncio.run(check_repository(tmp_path))
    config = {(f.model, f.level): f.message for f in report.findings if f.check == "config"}
    assert config[("scale", "ok")] == str(tmp_path / "scale" / "config.pbtxt")
    assert 'has no field named "model_transaction_policy"' in config[("broken", "error")]
    assert {f.model for f in report.findings if f.check == "load" and f.level == "ok"} == {"scale"}


def test_the_example_in_the_docs_reads_as_documented(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "triton.md").read_text(encoding="utf-8")
    example = text[text.index("## config.pbtxt") :].split("```")[1]
    config = read_model_config(write_model(tmp_path, example))
    assert (config.max_batch_size, config.instance_group.count) == (8, 2)
    assert (config.dynamic_batching.priority_levels, config.session_options.intra_op_num_threads) == (2, 1)


# Triton's example models configured in Triton's own syntax (the stand-ins' ONNX graphs, see
# triton_models.py), against the same models configured with config.yaml.
_BOOL = "int32_false_true: [ 0, 1 ]"
TRITON_EXAMPLES = {
    "simple": """
        name: "simple"
        platform: "onnxruntime_onnx"
        max_batch_size: 8
        input [
          { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
          { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
        ]
        output [
          { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
          { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
        ]
    """,
    "simple_sequence": f"""
        name: "simple_sequence"
        max_batch_size: 8
        sequence_batching {{
          control_input [
            {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START {_BOOL} }} ] }},
            {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY {_BOOL} }} ] }}
          ]
        }}
    """,
    "simple_dyna_sequence": f"""
        name: "simple_dyna_sequence"
        max_batch_size: 8
        instance_group [ {{ kind: KIND_CPU count: 2 }} ]
        sequence_batching {{
          max_sequence_idle_microseconds: 10000000
          oldest {{ max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }}
          control_input [
            {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START {_BOOL} }} ] }},
            {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END {_BOOL} }} ] }},
            {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY {_BOOL} }} ] }},
            {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
          ]
        }}
    """,
    "densenet_onnx": """
        name: "densenet_onnx"
        platform: "onnxruntime_onnx"
        max_batch_size: 0
        input [ { name: "data_0" format: FORMAT_NCHW } ]
        output [ { name: "fc6_1" label_filename: "densenet_labels.txt" } ]
    """,
}


def _count_unread(answers: dict[str, Any]) -> dict[str, Any]:
    """The answers with each ``instance_group`` count left out: with ``count: auto`` (neither file sets
    one) each load measures whether the model runs on the event loop, with one instance, and on a busy
    machine two loads of a model near the bound may differ. test_instance_count.py tests the count."""
    unread = copy.deepcopy(answers)
    for answer in unread.values():
        for group in answer["config"]["instance_group"]:
            group.pop("count")
    return unread


def test_triton_s_example_models_configure_alike_from_config_pbtxt_and_config_yaml(tmp_path: Path) -> None:
    """The ModelConfig each server answers (tritonclient's JSON) is the same, model by model."""
    answers = []
    for kind in ("yaml", "pbtxt"):
        root = tmp_path / kind
        for name, pbtxt in TRITON_EXAMPLES.items():
            directory = write_stand_in(root, stand_in(name))
            if kind == "pbtxt":
                (directory / "config.yaml").unlink()
                (directory / "config.pbtxt").write_text(textwrap.dedent(pbtxt))
        with running_server(root, tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
            answers.append({name: client.get_model_config(name, as_json=True) for name in TRITON_EXAMPLES})
    from_yaml, from_pbtxt = (_count_unread(answer) for answer in answers)
    assert from_pbtxt == from_yaml
    # What tritonclient's JSON leaves out (a control's kind at CONTROL_SEQUENCE_START, enum value 0)
    # still loads back as an override, as a config.pbtxt's does.
    sequence = from_pbtxt["simple_dyna_sequence"]["config"]
    assert "kind" not in sequence["sequence_batching"]["control_input"][0]["control"][0]
    loaded = config_from_json("simple_dyna_sequence", json.dumps(sequence)).sequence_batching
    assert loaded is not None and loaded.control_input[0].control[0].kind == "CONTROL_SEQUENCE_START"


def test_a_gpu_instance_group_runs_the_model_with_cuda(tmp_path: Path) -> None:
    """What the server makes of it; running it needs a GPU (docs/gpu.md has the GPU runs)."""
    config = read_model_config(write_model(tmp_path, "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]\n"))
    assert [(p.name, p.options) for p in config.execution_providers] == [("cuda", {"device_id": 0})]


# What a Triton user's GPU config for an onnxruntime model commonly says.
TRITON_GPU_CONFIG = """
platform: "onnxruntime_onnx"
max_batch_size: 8
instance_group [ { count: 2, kind: KIND_GPU, gpus: [ 0 ] } ]
optimization { execution_accelerators {
  gpu_execution_accelerator : [ {
    name : "tensorrt"
    parameters { key: "precision_mode" value: "FP16" }
    parameters { key: "max_workspace_size_bytes" value: "1073741824" }
  } ]
} }
"""


def test_a_tensorrt_accelerator_runs_the_model_with_tensorrt_then_cuda(tmp_path: Path) -> None:
    """What the server makes of it, as Triton's onnxruntime backend would; running it needs a GPU."""
    config = read_model_config(write_model(tmp_path, TRITON_GPU_CONFIG))
    assert config.instance_group.count == 2
    assert [(p.name, p.options) for p in config.execution_providers] == [
        ("tensorrt", {"device_id": 0, "trt_fp16_enable": "True", "trt_max_workspace_size": "1073741824"}),
        ("cuda", {"device_id": 0}),
    ]


@pytest.mark.parametrize("pbtxt", [TRITON_CONFIG, TRITON_GPU_CONFIG, ENSEMBLE], ids=["cpu", "gpu", "ensemble"])
def test_infergate_config_prints_a_config_yaml_that_reads_back_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pbtxt: str
) -> None:
    """To move a model from its config.pbtxt to a config.yaml (and to infergate's own keys)."""
    name = "a_pipeline" if "ensemble" in pbtxt else "scale"
    source = write_model(tmp_path / "pbtxt", pbtxt, name=name)
    assert main(["config", str(source)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# {name}/config.yaml\n")
    moved = write_model(tmp_path / "yaml", printed, name=name, file="config.yaml")
    assert read_model_config(moved) == read_model_config(source)


def test_infergate_config_of_a_config_it_refuses_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_model(tmp_path, "model_transaction_policy { decoupled: true }\n")
    assert main(["config", str(source)]) == 1
    assert 'has no field named "model_transaction_policy"' in capsys.readouterr().err


def test_triton_s_command_line_serves_a_triton_repository(tmp_path: Path) -> None:
    """docs/triton.md, "Moving a Triton deployment": Triton's flags, as Triton spells them, on config.pbtxt files."""
    root = tmp_path / "models"
    for name in ("simple", "simple_sequence"):
        directory = write_stand_in(root, stand_in(name))
        (directory / "config.yaml").unlink()
        (directory / "config.pbtxt").write_text(textwrap.dedent(TRITON_EXAMPLES[name]))
    flags = ("--model-control-mode=explicit", "--load-model=simple", "--grpc-port=0")
    with running_server(root, tmp_path, *flags) as server, grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("simple") and not client.is_model_ready("simple_sequence")
        a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.ones((1, 16), dtype=np.int32)
        inputs = [grpcclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_strict_readiness_false_readies_the_server_though_a_model_failed(tmp_path: Path) -> None:
    """Triton's ``--strict-readiness=false``: ServerReady once loading finished, the failed model unready."""
    root = tmp_path / "models"
    directory = write_stand_in(root, stand_in("simple"))
    (directory / "config.yaml").unlink()
    (directory / "config.pbtxt").write_text(textwrap.dedent(TRITON_EXAMPLES["simple"]))
    write_model(root, "model_transaction_policy { decoupled: true }\n", name="broken")
    with running_server(root, tmp_path, "--strict-readiness=false") as server:
        with grpcclient.InferenceServerClient(server.url) as client:
            assert client.is_server_ready()
            assert client.is_model_ready("simple") and not client.is_model_ready("broken")


def test_model_config_answers_with_the_onnxruntime_parameters_and_loads_back_the_same(tmp_path: Path) -> None:
    """ModelConfig names onnxruntime's thread options and graph optimization level as Triton's backend
    does; its JSON loads back to them."""
    options = "session_options: {intra_op_num_threads: 1, execution_mode: parallel, graph_optimization_level: basic}\n"
    directory = write_model(tmp_path / "models", f"max_batch_size: 8\n{options}", file="config.yaml")
    with running_server(directory.parent, tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        served = client.get_model_config("scale", as_json=True)["config"]
    parameters = {k: v["string_value"] for k, v in served["parameters"].items() if k != "sha256"}
    assert parameters == {"intra_op_thread_count": "1", "execution_mode": "1"}
    assert served["optimization"]["graph"] == {"level": -1}
    assert config_from_json("scale", json.dumps(served)).session_options == read_model_config(directory).session_options
