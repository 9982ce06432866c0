"""A bad configuration is refused at load with ``file: field.path: message`` (docs/configuration.md).

Each row is a real file and the exact fragment its error must hold: a key given
twice (YAML would keep only the last), a value of the wrong type that lax
parsing would coerce (``true`` or ``"8"`` for an integer), a check across
fields (which names the field it is about, never the top level), a command-line
flag (blamed on the command line, not on the file), and ``reuse_port``, which
only the ``--workers`` supervisor sets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infergate.config import ConfigError, load_server_config
from infergate.models.config import load_model_config

ROOT = Path(__file__).resolve().parent.parent

ENSEMBLE_TENSORS = (
    "platform: ensemble\n"
    "input: [{name: x, data_type: TYPE_FP32, dims: [16]}]\n"
    "output: [{name: y, data_type: TYPE_FP32, dims: [16]}]\n"
)


def _ensemble(steps: str, extra: str = "") -> str:
    return f"{ENSEMBLE_TENSORS}{extra}ensemble_scheduling:\n  step:\n{steps}"


# (the file's text, the fragment after "<file>: ")
BAD_MODEL_CONFIGS = [
    # 1. a key given twice
    pytest.param(
        "dynamic_batching: {max_queue_size: 4}\nmax_batch_size: 8\ndynamic_batching: {max_queue_size: 8}\n",
        "dynamic_batching: duplicate key on line 3 (first on line 1)",
        id="duplicate top-level key",
    ),
    pytest.param(
        "dynamic_batching:\n  max_queue_size: 4\n  max_queue_size: 8\n",
        "dynamic_batching.max_queue_size: duplicate key on line 3 (first on line 2)",
        id="duplicate nested key",
    ),
    pytest.param(
        "input:\n- name: a\n  data_type: TYPE_FP32\n  name: b\n",
        "input.0.name: duplicate key on line 4 (first on line 2)",
        id="duplicate key in a list item",
    ),
    # 2. no lax coercion to integers
    pytest.param("max_batch_size: true\n", "max_batch_size: Input should be a valid integer", id="bool for an int"),
    pytest.param('max_batch_size: "8"\n', "max_batch_size: Input should be a valid integer", id="string for an int"),
    pytest.param("max_batch_size: 8.0\n", "max_batch_size: Input should be a valid integer", id="float for an int"),
    # config.yaml is no protobuf JSON: where Triton's JSON may write int64 as a string, config.yaml may not
    pytest.param(
        'input: [{name: x, data_type: TYPE_FP32, dims: ["4"]}]\n',
        "input.0.dims.0: Input should be a valid integer",
        id="string in dims",
    ),
    pytest.param(
        'version_policy: {specific: {versions: ["1"]}}\n',
        "version_policy.specific.versions.0: Input should be a valid integer",
        id="string version",
    ),
    pytest.param(
        'dynamic_batching: {max_queue_delay_microseconds: "100"}\n',
        "dynamic_batching.max_queue_delay_microseconds: Input should be a valid integer",
        id="string delay",
    ),
    pytest.param(
        _ensemble('  - {model_name: m, model_version: "-1", input_map: {x: x}, output_map: {y: y}}\n'),
        "ensemble_scheduling.step.0.model_version: Input should be a valid integer",
        id="string step version",
    ),
    pytest.param(
        "dynamic_batching: {max_queue_size: yes}\n",
        "dynamic_batching.max_queue_size: Input should be a valid integer",
        id="nested bool for an int",
    ),
    pytest.param(
        "warmup: {batch_sizes: [1, true]}\n",
        "warmup.batch_sizes.1: Input should be a valid integer",
        id="bool in a list",
    ),
    pytest.param(
        "instance_group: {count: true}\n",
        "instance_group.count: Value error, expected a number of instances from 1 to 64, or auto; got True",
        id="bool for a count",
    ),
    pytest.param(
        "session_options: {allow_spinning: 1}\n",
        "session_options.allow_spinning: Input should be a valid boolean",
        id="int for a bool",
    ),
    # 3. checks across fields name the field they are about
    pytest.param(
        "input: [{name: a}, {name: a}]\n", "input: Value error, ['a'] listed more than once", id="input twice"
    ),
    pytest.param(
        "output: [{name: b}, {name: b}]\n", "output: Value error, ['b'] listed more than once", id="output twice"
    ),
    pytest.param(
        "dynamic_batching: {}\nsequence_batching: {}\n",
        "sequence_batching: Value error, choose one of dynamic_batching and sequence_batching",
        id="two schedulers",
    ),
    pytest.param(
        "response_cache: {enable: true}\nsequence_batching: {}\n",
        "response_cache.enable: Value error, needs a model without sequence_batching",
        id="response cache on a stateful model",
    ),
    pytest.param(
        "dynamic_batching: {priority_levels: 2, default_priority_level: 3}\n",
        "dynamic_batching.default_priority_level: Value error, must be in 1..2 when priority_levels is 2",
        id="default priority out of the levels",
    ),
    pytest.param(
        _ensemble("  - {model_name: m, input_map: {x: z}, output_map: {y: y}}\n"),
        "ensemble_scheduling.step.0.input_map: Value error, step 0 (m) reads ['z'], which no input or step provides",
        id="ensemble step reads nothing",
    ),
    pytest.param(
        _ensemble(
            "  - {model_name: m, input_map: {x: x}, output_map: {y: y}}\n"
            "  - {model_name: n, input_map: {x: x}, output_map: {y: y}}\n"
        ),
        "ensemble_scheduling.step.1.output_map: Value error, step 1 writes tensor 'y', which step 0 already provides",
        id="ensemble tensor written twice",
    ),
    pytest.param(
        _ensemble("  - {model_name: m, input_map: {x: x}, output_map: {y: t}}\n"),
        "output: Value error, ensemble outputs ['y'] are not written by any step",
        id="ensemble output unwritten",
    ),
    pytest.param(
        _ensemble(
            "  - {model_name: m, input_map: {x: b}, output_map: {y: a}}\n"
            "  - {model_name: n, input_map: {x: a}, output_map: {y: b, z: y}}\n"
        ),
        "ensemble_scheduling.step: Value error, steps 0 (m), 1 (n) wait on each other's outputs (a cycle)",
        id="ensemble cycle",
    ),
    pytest.param(
        _ensemble("  - {model_name: m, input_map: {x: x}, output_map: {y: y}}\n", "dynamic_batching: {}\n"),
        "dynamic_batching: Value error, an ensemble takes no dynamic_batching",
        id="ensemble with a scheduler",
    ),
    pytest.param(
        ENSEMBLE_TENSORS,
        "ensemble_scheduling: Value error, platform: ensemble needs ensemble_scheduling (its steps)",
        id="ensemble without steps",
    ),
    pytest.param(
        "ensemble_scheduling:\n  step:\n  - {model_name: m, input_map: {x: x}, output_map: {y: y}}\n",
        "platform: Value error, ensemble_scheduling is for platform: ensemble",
        id="steps without an ensemble",
    ),
    pytest.param(
        "platform: ensemble\ninput: [{name: x, data_type: TYPE_FP32}]\noutput: [{name: y, data_type: TYPE_FP32, "
        "dims: [1]}]\nensemble_scheduling:\n  step:\n  - {model_name: m, input_map: {x: x}, output_map: {y: y}}\n",
        "input.0: Value error, ensemble tensors ['x'] need data_type and dims",
        id="ensemble tensor untyped",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_MODEL_CONFIGS)
def test_a_bad_model_config_is_refused_naming_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_model_config(path)
    assert f"{path}: {expected}" in str(refused.value)
    assert "(top level)" not in str(refused.value)


def test_a_metadata_file_refuses_a_duplicate_key_too(tmp_path: Path) -> None:
    from infergate.configfile import read_yaml

    path = tmp_path / "metadata.yaml"
    path.write_text("owner: a\nlabels:\n  team: x\n  team: y\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"labels\.team: duplicate key on line 4 \(first on line 3\)"):
        read_yaml(path)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("instance_group: {count: auto}\n", id="count auto"),
        pytest.param("instance_group: {count: 2}\ndevice_execution: {io_binding: auto}\n", id="count 2"),
        pytest.param("routing: {weights: {1: 1, 2: 3.5}}\n", id="int keys, int and float weights"),
        pytest.param("monitoring: {drift: {threshold: 1, window: 100}}\n", id="int for a float"),
        pytest.param("metadata: {created: 2026-11-30}\n", id="a date"),
        pytest.param("base: &b {max_queue_size: 4}\ndynamic_batching:\n  <<: *b\n  max_queue_size: 8\n", id="merge"),
    ],
)
def test_values_of_the_right_type_still_load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    if text.startswith("base:"):  # an anchor needs a key of its own: check the loader only, not the model
        from infergate.configfile import read_yaml

        path.write_text(text, encoding="utf-8")
        assert read_yaml(path)["dynamic_batching"] == {"max_queue_size": 8}
        return
    path.write_text(text, encoding="utf-8")
    load_model_config(path)


# (the file's text, the command-line overrides, where the error is blamed: "file" or the command line,
# the fragment after it)
BAD_SERVER_CONFIGS = [
    pytest.param("port: 9000\nport: 9001\n", {}, "file", "port: duplicate key on line 2 (first on line 1)", id="dup"),
    pytest.param("workers: yes\n", {}, "file", "workers: Input should be a valid integer", id="bool workers"),
    pytest.param('port: "9000"\n', {}, "file", "port: Input should be a valid integer", id="string port"),
    pytest.param("workers: 2.0\n", {}, "file", "workers: Input should be a valid integer", id="float workers"),
    pytest.param(
        "health_port: 8001\n",
        {},
        "file",
        "health_port: Value error, 8001 is the serving port too; give the health service a port of its own",
        id="health port is the serving port",
    ),
    pytest.param(
        "workers: 2\nhealth_port: 0\n",
        {},
        "file",
        "health_port: Value error, 0 (any free port) with workers > 1 gives each worker a different one",
        id="health port 0 with workers",
    ),
    pytest.param(
        "workers: 2\nshared_memory: {system: {enabled: true}}\n",
        {},
        "file",
        "shared_memory.system.enabled: Value error, needs workers: 1",
        id="shared memory with workers",
    ),
    pytest.param(
        "log_level: info\n",
        {"port": 99999},
        "<command line>",
        "port: Input should be less than or equal to 65535",
        id="a bad flag with a good file",
    ),
    pytest.param(
        "log_level: info\n",
        {"telemetry": {"metrics_port": 99999, "traces": None}},
        "<command line>",
        "telemetry.metrics_port: Input should be less than or equal to 65535",
        id="a bad nested flag",
    ),
    pytest.param(
        "port: 70000\n",
        {"port": 9000},
        "file",
        "port: Input should be less than or equal to 65535",
        id="a bad file value a flag overrides",
    ),
    pytest.param(
        "shared_memory: {system: {enabled: true}}\n",
        {"workers": 2},
        "<command line>",
        "shared_memory.system.enabled: Value error, needs workers: 1",
        id="a flag that conflicts with the file",
    ),
    pytest.param(
        "reuse_port: true\n",
        {},
        "file",
        "reuse_port: set only by the --workers supervisor for its worker processes",
        id="reuse_port in the file",
    ),
    pytest.param(
        "reuse_port: true\n",
        {"reuse_port": True},
        "file",
        "reuse_port: set only by the --workers supervisor for its worker processes",
        id="reuse_port in the file and the flag",
    ),
]


@pytest.mark.parametrize(("text", "overrides", "blamed", "expected"), BAD_SERVER_CONFIGS)
def test_a_bad_server_config_is_refused_naming_its_source_and_field(
    tmp_path: Path, text: str, overrides: dict[str, Any], blamed: str, expected: str
) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_server_config(path, overrides)
    message = str(refused.value)
    source = str(path) if blamed == "file" else blamed
    assert f"{source}: {expected}" in message
    assert "(top level)" not in message
    if blamed != "file":
        assert str(path) not in message


def test_a_flag_may_settle_a_conflict_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("health_port: 8001\n", encoding="utf-8")  # the serving port's default, until --port moves it
    config = load_server_config(path, {"port": 9000})
    assert (config.port, config.health_port) == (9000, 8001)


def test_reuse_port_comes_from_the_supervisors_flag(tmp_path: Path) -> None:
    assert load_server_config(None, {"reuse_port": True}).reuse_port is True
    path = tmp_path / "server.yaml"
    path.write_text("workers: 1\n", encoding="utf-8")
    assert load_server_config(path, {"reuse_port": True}).reuse_port is True
    assert load_server_config(path, {"reuse_port": None}).reuse_port is False


def test_the_helm_values_schema_refuses_reuse_port() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "helm" / "infergate" / "values.schema.json").read_text(encoding="utf-8"))
    server = schema["properties"]["serverConfig"]
    jsonschema.validate({"workers": 2}, server)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"reuse_port": True}, server)


# --------------------------------------------------------------------------- end to end


def _infergate(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "infergate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_serve_blames_a_bad_port_flag_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("log_level: info\n", encoding="utf-8")
    done = _infergate("serve", "--config", str(path), "--model-repository", str(tmp_path), "--port", "99999")
    assert done.returncode == 2, done.stderr
    assert "<command line>: port: Input should be less than or equal to 65535" in done.stderr
    assert str(path) not in done.stderr


def test_check_reports_a_duplicate_key_with_file_field_and_lines(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(b"not a graph")
    path = model / "config.yaml"
    path.write_text("max_batch_size: 8\ndynamic_batching: {}\nmax_batch_size: 4\n", encoding="utf-8")
    done = _infergate("check", "--model-repository", str(tmp_path / "repo"), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{path}: max_batch_size: duplicate key on line 3 (first on line 1)" in done.stdout


# --------------------------------------------------------------------------- protobuf's JSON


def test_triton_json_and_config_pbtxt_may_write_integers_as_strings_and_nothing_else() -> None:
    from infergate.models.config import model_config_from_data
    from infergate.models.overrides import config_from_json

    data = {"max_batch_size": "16", "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "4"]}]}
    config = config_from_json("m", json.dumps(data))  # protobuf's JSON writes int64 as strings
    assert (config.max_batch_size, config.input[0].dims) == (16, [-1, 4])
    # config.yaml's validation, which the JSON reaches once its integers are integers, takes no strings
    with pytest.raises(ConfigError, match=r"override: max_batch_size: Input should be a valid integer"):
        model_config_from_data(data, "override")
    for bad in ({"max_batch_size": True}, {"max_batch_size": "16.0"}, {"max_batch_size": 16.0}):
        with pytest.raises(ConfigError, match="override: max_batch_size: Input should be a valid integer"):
            model_config_from_data(bad, "override")
    with pytest.raises(ConfigError, match=r"override: metadata\.owner: Input should be a valid string"):
        model_config_from_data({"metadata": {"owner": 7}}, "override")


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ('telemetry: {sample_ratio: "0.5"}\n', "telemetry.sample_ratio", "Input should be a valid number"),
        ('shutdown_grace_seconds: "7.5"\n', "shutdown_grace_seconds", "Input should be a valid number"),
        ('telemetry: {sample_ratio: "1e-05"}\n', "telemetry.sample_ratio", "Input should be a valid number"),
        ("telemetry: {sample_ratio: true}\n", "telemetry.sample_ratio", "Input should be a valid number"),
        ('workers: "2"\n', "workers", "Input should be a valid integer"),
    ],
    ids=["0.5", "7.5", "1e-05", "true", "workers 2"],
)
def test_a_server_file_refuses_a_quoted_number(tmp_path: Path, text: str, field: str, says: str) -> None:
    """The chart renders --set fractions as numbers (tests/test_chart_values.py): no quoted number is taken."""
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_server_config(path, {})
    assert f"{path}: {field}: {says}" in str(refused.value)


def test_a_float_in_exponent_form_is_a_float_as_helm_writes_small_ones(tmp_path: Path) -> None:
    """Helm's toYaml writes 0.00001 as 1e-05: a float in YAML 1.2, a string to PyYAML's YAML 1.1 rules."""
    path = tmp_path / "server.yaml"
    path.write_text("telemetry: {sample_ratio: 1e-05}\nshutdown_grace_seconds: 1.5e+01\n", encoding="utf-8")
    config = load_server_config(path, {})
    assert (config.telemetry.sample_ratio, config.shutdown_grace_seconds) == (1e-05, 15.0)
    path = tmp_path / "config.yaml"
    path.write_text("routing: {shadow: {version: 2, fraction: 1e-05}}\n", encoding="utf-8")
    routing = load_model_config(path).routing
    assert routing is not None and routing.shadow is not None and routing.shadow.fraction == 1e-05


def test_text_shaped_like_an_unsigned_exponent_stays_text(tmp_path: Path) -> None:
    """Go writes every float with a signed exponent; 8e12345 (a short commit hash) or 1e3 in metadata is text."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "metadata: {source_run: 20241e5, tags: [v1, 1e3], labels: {git_commit: 8e12345}}\n", encoding="utf-8"
    )
    metadata = load_model_config(path).metadata
    assert (metadata.source_run, metadata.tags, metadata.labels) == (
        "20241e5",
        ["v1", "1e3"],
        {"git_commit": "8e12345"},
    )


def test_routing_weights_may_quote_their_version_numbers_as_helm_renders_map_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text('routing: {weights: {"1": 90, "2": 10}}\n', encoding="utf-8")
    routing = load_model_config(path).routing
    assert routing is not None and routing.weights == {1: 90.0, 2: 10.0}
    path.write_text("routing: {weights: {true: 90}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"routing\.weights\.\S+\.\[key\]: Input should be a valid integer"):
        load_model_config(path)
