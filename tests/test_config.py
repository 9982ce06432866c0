"""Loading a model's config.yaml and the server's options.

A good file gives frozen models with safe defaults; a bad one raises
ConfigError whose message names the file and the dotted path of the field at
fault, so an operator can fix it without reading the code.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import pytest

from infergate.config import ConfigError, ServerConfig, load_server_config
from infergate.models.config import DynamicBatching, ExecutionProvider, ModelConfig, load_model_config


def write(directory: Path, text: str, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- model config: valid


@pytest.mark.parametrize(
    "text",
    ["", "# nothing but a comment\n", "{}\n", "---\n"],
    ids=["empty", "comment", "empty mapping", "bare document"],
)
def test_an_empty_model_config_gives_the_defaults(tmp_path: Path, text: str) -> None:
    assert load_model_config(write(tmp_path, text)) == ModelConfig()


def test_a_missing_model_config_gives_the_defaults(tmp_path: Path) -> None:
    assert load_model_config(tmp_path / "config.yaml") == ModelConfig()


def test_the_model_defaults_are_safe() -> None:
    config = ModelConfig()
    assert config.max_batch_size is None  # decided from the graph
    assert config.dynamic_batching == DynamicBatching(
        max_queue_delay_microseconds=0, preferred_batch_size=[], max_queue_size=1024, default_timeout_microseconds=0
    )
    assert config.instance_group.count == "auto"  # decided at load (runner.py: AUTO_CPU_INSTANCES)
    assert config.execution_providers == [ExecutionProvider(name="cpu")]
    assert config.session_options.allow_spinning is False
    assert config.default_model_filename == "model.onnx"


def test_a_full_model_config_is_read_field_by_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
max_batch_size: 16
dynamic_batching:
  max_queue_delay_microseconds: 500
  preferred_batch_size: [4, 8]
  max_queue_size: 32
  default_timeout_microseconds: 2000000
instance_group:
  count: 2
execution_providers:
  - name: cuda
    options: {device_id: 0}
  - name: cpu
session_options:
  intra_op_num_threads: 2
  graph_optimization_level: basic
warmup:
  batch_sizes: [1, 16]
  iterations: 3
""",
    )
    config = load_model_config(path)
    assert config.max_batch_size == 16
    assert config.dynamic_batching.preferred_batch_size == [4, 8]
    assert config.dynamic_batching.max_queue_size == 32
    assert config.instance_group.count == 2
    assert [p.name for p in config.execution_providers] == ["cuda", "cpu"]
    assert config.execution_providers[0].options == {"device_id": 0}
    assert config.session_options.graph_optimization_level == "basic"
    assert config.warmup.batch_sizes == [1, 16]


def test_device_execution_reads_io_binding_and_sorted_graph_sizes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
max_batch_size: 64
execution_providers:
  - {name: cuda, options: {device_id: 0, use_tf32: 0}}
  - {name: cpu}
device_execution:
  io_binding: true
  cuda_graph_batch_sizes: [64, 1, 8]
""",
    )
    config = load_model_config(path)
    assert config.device_execution.io_binding is True
    assert config.device_execution.cuda_graph_batch_sizes == [1, 8, 64]
    assert ModelConfig().device_execution.io_binding == "auto"
    assert ModelConfig().device_execution.cuda_graph_batch_sizes == []


def test_tensorrt_options_pass_through_untouched(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "execution_providers:\n"
        "  - {name: tensorrt, options: {trt_fp16_enable: true, trt_engine_cache_enable: true, "
        "trt_engine_cache_path: /tmp/trt}}\n"
        "  - {name: cuda}\n",
    )
    options = load_model_config(path).execution_providers[0].options
    assert options == {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": "/tmp/trt"}


# --------------------------------------------------------------------------- model config: refused

# (the file's text, the dotted path of the field at fault)
BAD_MODEL_CONFIGS = [
    pytest.param("max_batch_sise: 4\n", "max_batch_sise", id="typo'd key"),
    pytest.param("max_batch_size: eight\n", "max_batch_size", id="wrong type"),
    pytest.param("max_batch_size: -1\n", "max_batch_size", id="out of range"),
    pytest.param("dynamic_batching:\n  max_queue_sise: 4\n", "dynamic_batching.max_queue_sise", id="nested typo"),
    pytest.param(
        "dynamic_batching:\n  max_queue_size: 0\n", "dynamic_batching.max_queue_size", id="nested out of range"
    ),
    pytest.param("dynamic_batching: 5\n", "dynamic_batching", id="a number for a block"),
    pytest.param("instance_group:\n  count: 0\n", "instance_group.count", id="no instances"),
    pytest.param("execution_providers:\n  - name: gpu\n", "execution_providers.0.name", id="unknown provider"),
    pytest.param("execution_providers: []\n", "execution_providers", id="no providers"),
    pytest.param(
        "session_options:\n  allow_spinning: sometimes\n", "session_options.allow_spinning", id="not a boolean"
    ),
    pytest.param(
        "max_batch_size: 8\ndynamic_batching:\n  preferred_batch_size: [4, 16]\n",
        "dynamic_batching.preferred_batch_size",
        id="preferred size above max_batch_size",
    ),
    pytest.param(
        "max_batch_size: 0\ndynamic_batching:\n  preferred_batch_size: [4]\n",
        "dynamic_batching.preferred_batch_size",
        id="preferred size on a model that does not batch",
    ),
    pytest.param(
        "device_execution:\n  io_binding: sometimes\n", "device_execution.io_binding", id="io_binding not a choice"
    ),
    pytest.param(
        "execution_providers: [{name: cuda}]\ndevice_execution:\n  cuda_graph_batch_sizes: [1, 8, 1]\n",
        "device_execution.cuda_graph_batch_sizes",
        id="graph size repeated",
    ),
    pytest.param(
        "execution_providers: [{name: cuda}]\ndevice_execution:\n  cuda_graph_batch_sizes: [0]\n",
        "device_execution.cuda_graph_batch_sizes.0",
        id="graph size zero",
    ),
    pytest.param(
        "device_execution:\n  cuda_graph_batch_sizes: [1, 8]\n",
        "device_execution.cuda_graph_batch_sizes",
        id="graphs without cuda first",
    ),
    pytest.param(
        "execution_providers: [{name: cuda}]\ndevice_execution: {io_binding: false, cuda_graph_batch_sizes: [1]}\n",
        "device_execution.cuda_graph_batch_sizes",
        id="graphs without io binding",
    ),
    pytest.param(
        "max_batch_size: 8\nexecution_providers: [{name: cuda}]\ndevice_execution: {cuda_graph_batch_sizes: [1, 16]}\n",
        "device_execution.cuda_graph_batch_sizes",
        id="graph size above max_batch_size",
    ),
    pytest.param(
        "max_batch_size: 0\nexecution_providers: [{name: cuda}]\ndevice_execution: {cuda_graph_batch_sizes: [1]}\n",
        "device_execution.cuda_graph_batch_sizes",
        id="graphs on a model that does not batch",
    ),
    pytest.param(
        "execution_providers: [{name: cuda, options: {enable_cuda_graph: true}}]\n",
        "execution_providers.0.options.enable_cuda_graph",
        id="cuda graphs turned on by hand",
    ),
    pytest.param(
        "execution_providers: [{name: tensorrt, options: {trt_cuda_graph_enable: 1}}, {name: cuda}]\n",
        "execution_providers.0.options.trt_cuda_graph_enable",
        id="tensorrt graphs turned on by hand",
    ),
]


@pytest.mark.parametrize(("text", "field"), BAD_MODEL_CONFIGS)
def test_a_bad_model_config_names_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        load_model_config(path)
    message = str(refused.value)
    assert str(path) in message
    assert f"{field}:" in message or f"{field} " in message, message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("- max_batch_size: 4\n", "mapping", id="a list"),
        pytest.param("just words\n", "mapping", id="a string"),
        pytest.param("42\n", "mapping", id="a number"),
        pytest.param("max_batch_size: [\n", "YAML", id="invalid YAML"),
        pytest.param("a: 1\n a: 2\n\tb", "YAML", id="bad indentation"),
    ],
)
def test_a_model_config_that_is_not_a_yaml_mapping_names_the_file(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=says) as refused:
        load_model_config(path)
    assert str(refused.value).startswith(f"{path}:")


def test_a_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- server config


def test_no_file_and_no_overrides_give_the_server_defaults() -> None:
    config = load_server_config(None, {})
    assert config == ServerConfig()
    assert (config.host, config.port, config.strict_readiness) == ("127.0.0.1", 8001, True)


def test_command_line_overrides_win_over_the_file_and_none_overrides_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "host: 0.0.0.0\nport: 9000\nlog_level: debug\n", name="server.yaml")
    config = load_server_config(path, {"port": 9100, "host": None, "log_level": None, "shutdown_grace_seconds": 5})
    assert config.host == "0.0.0.0"  # None: not given on the command line
    assert config.port == 9100
    assert config.log_level == "debug"
    assert config.shutdown_grace_seconds == 5.0


def test_an_empty_server_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_server_config(write(tmp_path, "", name="server.yaml"), {}) == ServerConfig()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("prot: 9000\n", "prot", id="typo'd key"),
        pytest.param("port: 70000\n", "port", id="out of range"),
        pytest.param("strict_readiness: maybe\n", "strict_readiness", id="wrong type"),
        pytest.param("log_level: verbose\n", "log_level", id="unknown choice"),
    ],
)
def test_a_bad_server_file_names_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text, name="server.yaml")
    with pytest.raises(ConfigError) as refused:
        load_server_config(path, {})
    assert f"{path}: {field}:" in str(refused.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("- port: 9000\n", "mapping", id="a list"),
        pytest.param("port: [\n", "YAML", id="invalid YAML"),
    ],
)
def test_a_server_file_that_is_not_a_yaml_mapping_names_the_file(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path, text, name="server.yaml")
    with pytest.raises(ConfigError, match=says) as refused:
        load_server_config(path, {})
    assert str(refused.value).startswith(f"{path}:")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"port": 70000}, "port", id="out of range"),
        pytest.param({"shutdown_grace_seconds": -1}, "shutdown_grace_seconds", id="negative"),
        pytest.param({"no_such_flag": 1}, "no_such_flag", id="unknown option"),
    ],
)
def test_a_bad_override_without_a_file_is_blamed_on_the_command_line(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_server_config(None, overrides)
    assert f"<command line>: {field}:" in str(refused.value)


def test_a_missing_server_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read") as refused:
        load_server_config(path, {})
    assert str(path) in str(refused.value)


# --------------------------------------------------------------------------- server config: shared memory


def test_system_shared_memory_is_off_unless_asked_for() -> None:
    assert load_server_config(None, {}).shared_memory.system.enabled is False


def test_the_shm_flag_turns_it_on_and_the_file_keeps_its_bounds(tmp_path: Path) -> None:
    path = write(tmp_path, "shared_memory:\n  system:\n    max_regions: 3\n", name="server.yaml")
    flag = {"shared_memory": {"system": {"enabled": True}}}
    system = load_server_config(path, flag).shared_memory.system
    assert (system.enabled, system.max_regions) == (True, 3)
    unset = {"shared_memory": {"system": {"enabled": None}}}  # the flag not given
    assert load_server_config(path, unset).shared_memory.system.enabled is False


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        pytest.param({"port": 8001, "health_port": 8001}, "8001 is the serving port too", id="the same port"),
        pytest.param({"workers": 2, "health_port": 0}, "gives each worker a different one", id="any port, workers"),
    ],
)
def test_the_health_port_must_be_one_a_probe_can_reach_and_not_the_serving_port(
    settings: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as refused:
        load_server_config(None, settings)
    assert "health_port" in str(refused.value)
    assert load_server_config(None, {"port": 0, "health_port": 0}).health_port == 0  # two free ports: fine


@pytest.mark.parametrize("past_the_room", [-700, 0, 1, 3000])
def test_max_regions_leaves_room_under_the_open_file_limit_for_connections(tmp_path: Path, past_the_room: int) -> None:
    """Each region holds an open file; 256 of the process's open-file limit stay for connections and
    the server's own files (here under a limit lowered to 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(soft, 1024)
    max_regions = limit - 256 + past_the_room
    path = write(tmp_path, f"shared_memory: {{system: {{enabled: true, max_regions: {max_regions}}}}}\n", "s.yaml")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        if past_the_room <= 0:
            assert load_server_config(path, {}).shared_memory.system.max_regions == max_regions
            return
        with pytest.raises(ConfigError) as refused:
            load_server_config(path, {})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    message = str(refused.value)
    assert message.startswith(f"{path}: shared_memory.system.max_regions: ")
    assert f"open-file limit of {limit} (RLIMIT_NOFILE" in message


def test_shared_memory_is_refused_with_several_workers(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 2\nshared_memory: {system: {enabled: true}}\n", name="server.yaml")
    with pytest.raises(
        ConfigError, match=r"server\.yaml: shared_memory\.system\.enabled: Value error, needs workers: 1"
    ):
        load_server_config(path, {})
