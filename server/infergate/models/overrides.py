"""RepositoryModelLoad's overrides: a model config as JSON, and the model's files in the request.

Triton's model repository extension lets a load request carry:

* ``config``: a string parameter holding a JSON model config, used instead of
  the one in the repository for this load. infergate reads it exactly as it
  reads config.yaml (same keys, same checks, errors naming the field), after
  translating what Triton's protobuf JSON writes differently (below).
* ``file:<path>``: bytes parameters that together replace the model directory,
  e.g. ``file:1/model.onnx``. They need ``config`` too (Triton's rule), must
  stay inside the model directory, and must include at least one
  ``<version>/<default_model_filename>``.

Any other parameter is refused, as Triton does.

Triton's JSON (``ModelConfig`` from model_config.proto) and config.yaml (a
model's config.pbtxt is translated the same way: ``config_files.py``):

======================================  ============================================
Triton JSON                             config.yaml
======================================  ============================================
``name``, ``platform``, ``backend``     must be the model's name / ``onnxruntime_onnx`` /
                                        ``onnxruntime``; then dropped (``platform: ensemble``
                                        stays, with no backend)
an integer of Triton's proto written as  the integer: protobuf's JSON writes int64 so (``dims: ["4"]``,
a string (``"16"``, ``"-1"``)           ``model_version: "-1"``) and Triton's parser takes it for any
                                        integer field (its example sends ``max_batch_size: "16"``);
                                        config.yaml's own keys take integers only (``proto_json.py``)
``instance_group: [{count, kind}]``     ``instance_group: {count: <sum>}`` (``auto`` when no
                                        group gives one); KIND_GPU (one GPU: ``gpus: [n]`` or none)
                                        adds ``execution_providers: [cuda]``
``optimization.execution_accelerators``  ``execution_providers``: GPU ``tensorrt`` (its parameters
                                        as onnxruntime's ``trt_*`` options), then ``cuda``; CPU
                                        ``openvino``, then ``cpu``
``optimization.graph.level``            ``session_options.graph_optimization_level``: -1 basic,
                                        1 extended, 2 disable, 0 all (the onnxruntime backend's)
``dynamic_batching.default_queue_policy``  its ``max_queue_size`` and
  ``{max_queue_size, default_timeout_microseconds}``  ``default_timeout_microseconds`` move up into
                                        ``dynamic_batching``
``parameters`` of the onnxruntime backend  ``session_options``: ``intra_op_thread_count``,
                                        ``inter_op_thread_count``, ``execution_mode`` (0, 1)
``parameters`` ModelConfig answers with  ``metadata`` (``owner``, ``tags``, ``label.KEY``…;
                                        ``sha256``, the served file's digest, is dropped)
``sequence_batching``, ``model_warmup``,  the same
``input``, ``output``, ``version_policy``,
``default_model_filename``
lowerCamelCase keys (``maxBatchSize``)  refused, naming the snake_case key to use
======================================  ============================================

Seam: ``parse_load_parameters(model, request.parameters)`` in RepositoryModelLoad
(before anything is unloaded); then ``stage_files(override, directory)`` when the
override carries files, and the repository loads the version(s) from that
directory with ``override.config`` instead of reading config.yaml.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from infergate.configfile import ConfigError
from infergate.errors import InferGateError, InvalidArgument
from infergate.models.config import PROVIDERS, ExecutionProvider, ModelConfig, SessionOptions, model_config_from_data
from infergate.models.governance import metadata_from_parameters
from infergate.models.proto_json import integers_from_strings

__all__ = [
    "CONFIG_PARAMETER",
    "FILE_PREFIX",
    "LoadOverride",
    "PollFailed",
    "graph_optimization",
    "parse_load_parameters",
    "placement",
    "session_parameters",
    "stage_files",
]

CONFIG_PARAMETER = "config"
FILE_PREFIX = "file:"
NAME_MAX = 255  # bytes in one path component on Linux filesystems

_PLATFORM = "onnxruntime_onnx"
_ENSEMBLE = "ensemble"
_BACKEND = "onnxruntime"


class PollFailed(InferGateError):
    """Triton's "failed to poll from model repository" (INTERNAL): files that cannot be laid out on disk.

    Triton answers INTERNAL here and its own example client checks for it, so
    infergate does the same; the message says what was wrong with the file.
    """


@dataclass(frozen=True)
class LoadOverride:
    """What a load request replaces: the config (None: config.yaml) and the files (empty: the repository's)."""

    config: ModelConfig | None = None
    files: Mapping[str, bytes] = field(default_factory=dict)  # relative POSIX path -> content


def parse_load_parameters(model: str, parameters: Mapping[str, Any]) -> LoadOverride:
    """Validate RepositoryModelLoad's ``parameters`` (``ModelRepositoryParameter`` messages).

    Raises InvalidArgument (or PollFailed, see there) whose message starts with
    Triton's ``failed to load '<model>'`` and says what was wrong.
    """
    config: ModelConfig | None = None
    files: dict[str, bytes] = {}
    for name, param in parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if name == CONFIG_PARAMETER:
            if kind != "string_param":
                raise InvalidArgument("Config parameter 'config' must have string type for its value")
            config = config_from_json(model, param.string_param)
        elif name.startswith(FILE_PREFIX):
            if kind != "bytes_param":
                raise InvalidArgument(f"File parameter '{name}' must have bytes type for its value")
            files[_file_path(model, name[len(FILE_PREFIX) :])] = param.bytes_param
        else:
            raise InvalidArgument(f"failed to load '{model}': Unrecognized load parameter '{name}' with type '{kind}'")
    if files:
        if config is None:
            raise InvalidArgument(
                f"failed to load '{model}': file overrides need a 'config' parameter too "
                "(the model configuration of the override model directory)"
            )
        _check_has_a_version(model, files, config)
    return LoadOverride(config, files)


def config_from_json(model: str, text: str) -> ModelConfig:
    """A ``config`` parameter as a ModelConfig, checked exactly like config.yaml."""
    source = f"failed to load '{model}': Invalid config override"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source}: the JSON must be an object, not {type(data).__name__}")
    try:
        translated = from_triton_json(model, data)
    except ValueError as exc:
        raise InvalidArgument(f"{source}: {exc}") from None
    if isinstance(translated.get("monitoring"), dict) and "payload_log" in translated["monitoring"]:
        # It names a file of the server that the writer appends to, rotates and deletes: an operator's
        # choice, in config.yaml on the server, never a caller's over the API.
        raise InvalidArgument(
            f"{source}: monitoring.payload_log names a file on the server; set it in the model's config.yaml, "
            "not in a load request"
        )
    try:
        return model_config_from_data(translated, source)
    except ConfigError as exc:
        raise InvalidArgument(str(exc)) from None


def from_triton_json(model: str, data: dict[str, Any]) -> dict[str, Any]:
    """Translate the parts of Triton's JSON that config.yaml writes differently (see the module table)."""
    out = integers_from_strings(data)
    checks: list[tuple[str, str]] = [("name", model)]
    if out.get("platform") == _ENSEMBLE:  # kept: it is config.yaml's too; an ensemble has no backend
        if out.pop("backend", "") != "":
            raise ValueError("backend: an ensemble has none (leave it out)")
    else:
        checks += [("platform", _PLATFORM), ("backend", _BACKEND)]
    for key, expected in checks:
        if key in out and out.pop(key) != expected:
            hint = f" or {_ENSEMBLE!r}" if key == "platform" else ""
            raise ValueError(f"{key}: must be {expected!r}{hint} (or left out)")
    kind, device = "auto", None
    if isinstance(out.get("instance_group"), list):
        out["instance_group"], kind, device = _instance_group(out["instance_group"])
    optimization = out.pop("optimization", None)
    providers = _execution_providers(kind, device, optimization)
    if providers is not None:
        if "execution_providers" in out:
            raise ValueError("a KIND_GPU instance_group or an accelerator, and execution_providers: give one of them")
        out["execution_providers"] = providers
    if isinstance(out.get("sequence_batching"), dict):
        out["sequence_batching"] = _control_kinds(out["sequence_batching"])
    options, metadata = _parameters(out.pop("parameters")) if "parameters" in out else ({}, {})
    level = _graph_level(optimization)
    if level is not None:
        options["graph_optimization_level"] = level
    for key, value in (("session_options", options), ("metadata", metadata)):
        if value and key in out:
            raise ValueError(f"parameters or optimization.graph: give {key} either Triton's way or as {key}")
        if value:
            out[key] = value
    batching = out.get("dynamic_batching")
    if isinstance(batching, dict) and isinstance(batching.get("default_queue_policy"), dict):
        out["dynamic_batching"] = _flatten_queue_policy(batching)
    camel = sorted(k for k in out if _CAMEL.search(k))
    if camel:
        hints = ", ".join(f"{k} -> {_snake(k)}" for k in camel)
        raise ValueError(f"write keys in snake_case as config.yaml does ({hints})")
    return out


_CAMEL = re.compile(r"[a-z][A-Z]")


def _snake(key: str) -> str:
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()


def _instance_group(groups: list[Any]) -> tuple[dict[str, int | str], str, int | None]:
    """Triton's instance groups as config.yaml's ``instance_group``, with where they run: ``cpu``,
    ``gpu`` (and the GPU named, if any) or ``auto`` (KIND_AUTO: on a GPU when the model asks for one)."""
    count = 0
    devices: set[int] = set()
    kinds: set[str] = set()
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            raise ValueError(f"instance_group.{i}: must be a mapping")
        kind = group.get("kind", "KIND_AUTO")
        if kind not in _KINDS:
            raise ValueError(f"instance_group.{i}.kind: {kind} is not taken; choose devices with execution_providers")
        extra = sorted(set(group) - {"count", "kind", "name", "gpus"})
        if extra:
            raise ValueError(f"instance_group.{i}: {extra} are not taken")
        gpus = [int(g) for g in group.get("gpus", [])]
        if gpus and kind != "KIND_GPU":
            raise ValueError(f"instance_group.{i}.gpus: only a KIND_GPU group names GPUs")
        if len(gpus) > 1:
            raise ValueError(
                f"instance_group.{i}.gpus: {gpus}: infergate runs a model on one GPU (docs/gpu.md: one per model)"
            )
        kinds.add(_KINDS[kind])
        devices.update(gpus)
        count += int(group.get("count", 1))
    if {"cpu", "gpu"} <= kinds or len(devices) > 1:
        raise ValueError("instance_group: infergate runs a model's instances on one device; these groups name several")
    kind = "gpu" if "gpu" in kinds else "cpu" if "cpu" in kinds else "auto"
    # No count anywhere: the server chooses, as Triton's onnxruntime backend does (config.py, ``auto``).
    counted = count if any("count" in group for group in groups) else "auto"
    return {"count": counted}, kind, next(iter(devices), None)


_KINDS = {"KIND_CPU": "cpu", "KIND_AUTO": "auto", "KIND_GPU": "gpu"}


def _execution_providers(kind: str, device: int | None, optimization: Any) -> list[dict[str, Any]] | None:
    """The execution providers that Triton's onnxruntime backend would use for these instances and
    accelerators (None: config.yaml's default, the CPU). On a GPU: CUDA, after TensorRT when that is
    the accelerator, and no CPU fallback (a GPU model does not load without a GPU, as in Triton)."""
    gpu, cpu = _accelerators(optimization)
    cuda: dict[str, Any] = {"name": "cuda"} if device is None else {"name": "cuda", "options": {"device_id": device}}
    where = "optimization.execution_accelerators"
    if gpu and cpu:
        raise ValueError(f"{where}: GPU and CPU accelerators; infergate runs a model on one device")
    if gpu:
        if kind == "cpu":
            raise ValueError(f"{where}.gpu_execution_accelerator: the instance_group is KIND_CPU")
        return [_tensorrt(gpu, device), cuda]
    if cpu:
        if kind == "gpu":
            raise ValueError(f"{where}.cpu_execution_accelerator: the instance_group is KIND_GPU")
        return [_openvino(cpu), {"name": "cpu"}]
    return [cuda] if kind == "gpu" else None


def _accelerators(optimization: Any) -> tuple[list[Any], list[Any]]:
    """``optimization``'s GPU and CPU accelerators (it may hold nothing else)."""
    if optimization is None:
        return [], []
    if not isinstance(optimization, dict):
        raise ValueError("optimization: must be a mapping")
    others = sorted(set(optimization) - {"execution_accelerators", "graph"})
    if others:
        raise ValueError(f"optimization: {others} not taken (execution_accelerators and graph are)")
    accelerators = optimization.get("execution_accelerators") or {}
    if not isinstance(accelerators, dict):
        raise ValueError("optimization.execution_accelerators: must be a mapping")
    return list(accelerators.get("gpu_execution_accelerator", [])), list(
        accelerators.get("cpu_execution_accelerator", [])
    )


# The onnxruntime backend's optimization.graph.level: -1 basic, 1 extended, 2 none, 0 (its default) all.
_GRAPH_LEVELS = {-1: "basic", 0: "all", 1: "extended", 2: "disable"}


def _graph_level(optimization: Any) -> str | None:
    """``optimization.graph.level`` as ``session_options.graph_optimization_level`` (None: not given).
    Triton's backend takes any other number as the default; infergate refuses it."""
    graph = optimization.get("graph") if isinstance(optimization, dict) else None
    if graph is None:
        return None
    level = graph.get("level", 0) if isinstance(graph, dict) else None
    try:
        return _GRAPH_LEVELS[int(level)]  # type: ignore[arg-type]  # Triton's JSON may write it as a string
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"optimization.graph.level: {level!r} not taken (-1 basic, 1 extended, 2 none, 0 all)"
        ) from None


def graph_optimization(options: SessionOptions) -> dict[str, Any]:
    """``session_options.graph_optimization_level`` as Triton's ``optimization.graph`` (empty for all,
    the default of both): what ModelConfig answers with."""
    level = next(k for k, v in _GRAPH_LEVELS.items() if v == options.graph_optimization_level)
    return {"graph": {"level": level}} if level else {}


def _one_accelerator(accelerators: list[Any], kind: str, name: str) -> dict[str, str]:
    """The parameters of the one accelerator ``name`` in ``accelerators``; refuses anything else."""
    where = f"optimization.execution_accelerators.{kind}_execution_accelerator"
    if len(accelerators) != 1 or not isinstance(accelerators[0], dict) or accelerators[0].get("name") != name:
        given = [a.get("name") if isinstance(a, dict) else a for a in accelerators]
        raise ValueError(f"{where}: {given} not taken (infergate takes one, {name!r})")
    parameters = accelerators[0].get("parameters", {})
    if not isinstance(parameters, dict) or not all(isinstance(v, str) for v in parameters.values()):
        raise ValueError(f"{where}.0.parameters: must map names to strings")
    return parameters


def _tensorrt(accelerators: list[Any], device: int | None) -> dict[str, Any]:
    """Triton's TensorRT accelerator as onnxruntime's TensorRT execution provider and its options."""
    options: dict[str, Any] = {} if device is None else {"device_id": device}
    for key, value in _one_accelerator(accelerators, "gpu", "tensorrt").items():
        if key == "precision_mode":
            if value not in _PRECISIONS:
                raise ValueError(
                    "optimization.execution_accelerators.gpu_execution_accelerator.0.parameters.precision_mode: "
                    f"{value!r} not taken ({', '.join(_PRECISIONS)})"
                )
            options.update(_PRECISIONS[value])
        elif key in _TENSORRT_RENAMED:
            options[_TENSORRT_RENAMED[key]] = value
        elif key.startswith("trt_"):  # onnxruntime's own names (trt_engine_cache_path…); it refuses unknown ones
            options[key] = _trt_switch(key, value)
        else:
            raise ValueError(
                f"optimization.execution_accelerators.gpu_execution_accelerator.0.parameters.{key}: not taken"
            )
    return {"name": "tensorrt", "options": options}


# onnxruntime's TensorRT options that are switches: its Python bindings take only "True"/"true" or
# "False"/"false" for them and refuse the "1" and "0" Triton's configs write (onnxruntime_pybind_state.cc).
_TRT_SWITCHES = frozenset({
    "trt_int8_use_native_calibration_table", "trt_dump_subgraphs", "trt_force_sequential_engine_build",
    "trt_layer_norm_fp32_fallback", "trt_force_timing_cache", "trt_detailed_build_log",
})  # fmt: skip


def _trt_switch(key: str, value: str) -> str:
    """A Triton TensorRT parameter as onnxruntime takes it: a switch's "1"/"0" as "True"/"False"."""
    if key.endswith("_enable") or key in _TRT_SWITCHES:
        if value.lower() in ("1", "true"):
            return "True"
        if value.lower() in ("0", "false"):
            return "False"
    return value


_PRECISIONS: dict[str, dict[str, str]] = {
    "FP32": {},
    "FP16": {"trt_fp16_enable": "True"},
    "INT8": {"trt_int8_enable": "True"},
}
# Triton's names for onnxruntime's TensorRT options.
_TENSORRT_RENAMED = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}


def _openvino(accelerators: list[Any]) -> dict[str, Any]:
    parameters = _one_accelerator(accelerators, "cpu", "openvino")
    if parameters:
        raise ValueError(
            f"optimization.execution_accelerators.cpu_execution_accelerator.0.parameters: {sorted(parameters)} "
            "not taken (give OpenVINO's options in config.yaml's execution_providers)"
        )
    return {"name": "openvino"}


def placement(providers: list[ExecutionProvider], running: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Where a model runs, as Triton writes it: an instance group's ``kind`` and ``gpus``, and the
    ``optimization`` naming its accelerator. The inverse of the instance groups and accelerators above,
    so that the JSON ModelConfig answers with loads back onto the same device. ``running`` is the
    session's first onnxruntime provider (what it runs on, after any fallback)."""
    options = next((p.options for p in providers if PROVIDERS[p.name] == running), {})
    device = int(options.get("device_id", 0))
    if running == PROVIDERS["cuda"]:
        return {"kind": "KIND_GPU", "gpus": [device]}, {}
    if running == PROVIDERS["tensorrt"]:
        tensorrt = {"name": "tensorrt", "parameters": _tensorrt_parameters(options)}
        return {"kind": "KIND_GPU", "gpus": [device]}, {
            "execution_accelerators": {"gpu_execution_accelerator": [tensorrt]}
        }
    if running == PROVIDERS["openvino"]:
        return {"kind": "KIND_CPU"}, {"execution_accelerators": {"cpu_execution_accelerator": [{"name": "openvino"}]}}
    # The CPU, and providers Triton's configuration has no words for (ROCm, oneDNN, CoreML).
    return {"kind": "KIND_CPU"}, {}


def _tensorrt_parameters(options: dict[str, str | int | float | bool]) -> dict[str, str]:
    """onnxruntime's TensorRT options as Triton's accelerator parameters (the inverse of ``_tensorrt``)."""
    on = {key for key, value in options.items() if str(value).lower() in ("1", "true")}
    renamed = {ours: theirs for theirs, ours in _TENSORRT_RENAMED.items()}
    parameters = {
        "precision_mode": "INT8" if "trt_int8_enable" in on else "FP16" if "trt_fp16_enable" in on else "FP32"
    }
    for key, value in options.items():
        if key in ("device_id", "trt_fp16_enable", "trt_int8_enable"):
            continue
        parameters[renamed.get(key, key)] = str(int(value)) if isinstance(value, bool) else str(value)
    return parameters


def _control_kinds(batching: dict[str, Any]) -> dict[str, Any]:
    """Protobuf's JSON leaves out an enum field at its first value: a control with no ``kind`` is
    Triton's CONTROL_SEQUENCE_START (as tritonclient's JSON and a config.pbtxt parsed here write it)."""
    inputs = batching.get("control_input")
    if not isinstance(inputs, list):
        return batching
    filled = []
    for entry in inputs:
        if isinstance(entry, dict) and isinstance(entry.get("control"), list):
            controls = [{"kind": _FIRST_CONTROL, **c} if isinstance(c, dict) else c for c in entry["control"]]
            entry = {**entry, "control": controls}
        filled.append(entry)
    return {**batching, "control_input": filled}


_FIRST_CONTROL = "CONTROL_SEQUENCE_START"  # value 0 of Triton's Control.Kind


def session_parameters(options: SessionOptions) -> dict[str, str]:
    """``session_options`` as the onnxruntime backend's parameters (those set to other than their
    default): what ModelConfig answers with, so that its JSON loads back with the same options."""
    params = {name: str(getattr(options, key)) for name, key in _THREAD_PARAMETERS.items() if getattr(options, key)}
    if options.execution_mode != "sequential":
        params["execution_mode"] = next(k for k, v in _EXECUTION_MODES.items() if v == options.execution_mode)
    return params


# The onnxruntime backend's model parameters, as session_options.
_THREAD_PARAMETERS = {"intra_op_thread_count": "intra_op_num_threads", "inter_op_thread_count": "inter_op_num_threads"}
_EXECUTION_MODES = {"0": "sequential", "1": "parallel"}


def _parameters(parameters: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``parameters`` ({name: {string_value}}) as config.yaml's ``session_options`` (the onnxruntime
    backend's) and ``metadata`` (infergate's governance metadata, which ModelConfig answers with: so
    tritonclient's JSON of a model loads back; see ``governance.metadata_from_parameters``)."""
    if not isinstance(parameters, dict):
        raise ValueError("parameters: must be a mapping of names to {string_value: ...}")
    options: dict[str, Any] = {}
    rest: dict[str, str] = {}
    for name, parameter in parameters.items():
        value = parameter.get("string_value", "") if isinstance(parameter, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"parameters.{name}: must be {{string_value: ...}}")
        if name in _THREAD_PARAMETERS and value.isdigit():
            options[_THREAD_PARAMETERS[name]] = int(value)
        elif name == "execution_mode" and value in _EXECUTION_MODES:
            options["execution_mode"] = _EXECUTION_MODES[value]
        else:
            rest[name] = value
    metadata, others = metadata_from_parameters(rest)
    if others:
        taken = ", ".join([*_THREAD_PARAMETERS, "execution_mode"])
        raise ValueError(
            f"parameters.{others[0]}: not taken (infergate takes onnxruntime's {taken}, as session_options, "
            "and its own metadata)"
        )
    return options, metadata


def _flatten_queue_policy(batching: dict[str, Any]) -> dict[str, Any]:
    out = dict(batching)
    policy = dict(out.pop("default_queue_policy"))
    for key in ("max_queue_size", "default_timeout_microseconds"):
        if key in policy:
            out[key] = policy.pop(key)
    # What infergate always does; anything else it cannot honour.
    if policy.pop("allow_timeout_override", True) is not True or policy.pop("timeout_action", "REJECT") != "REJECT":
        raise ValueError("dynamic_batching.default_queue_policy: infergate always rejects timed-out requests")
    if policy:
        raise ValueError(f"dynamic_batching.default_queue_policy: {sorted(policy)} are not taken")
    return out


def _file_path(model: str, relative: str) -> str:
    """A ``file:`` parameter's path, refused unless it is relative and stays inside the model directory."""
    path = PurePosixPath(relative)
    long = [part for part in path.parts if len(part.encode()) > NAME_MAX]
    if long:
        raise PollFailed(
            f"failed to load '{model}', failed to poll from model repository: file override "
            f"'{relative[:40]}...' has a path component of {len(long[0].encode())} bytes (the limit is {NAME_MAX})"
        )
    if not relative or path.is_absolute() or ".." in path.parts or "\\" in relative or "\x00" in relative:
        raise InvalidArgument(
            f"failed to load '{model}': Invalid file parameter '{FILE_PREFIX}{relative}': "
            "it must be a relative path that stays within the model directory"
        )
    return path.as_posix()


def _check_has_a_version(model: str, files: Mapping[str, bytes], config: ModelConfig) -> None:
    filename = config.default_model_filename
    versions = [p for p in files if (parts := PurePosixPath(p).parts) and len(parts) == 2 and parts[1] == filename]
    if not any(PurePosixPath(p).parts[0].isascii() and PurePosixPath(p).parts[0].isdecimal() for p in versions):
        raise InvalidArgument(
            f"failed to load '{model}': the file overrides hold no '<version>/{filename}' (got {sorted(files)[:5]})"
        )


def stage_files(override: LoadOverride, directory: Path) -> Path:
    """Write the override's files under ``directory`` (a fresh, empty model directory) and return it.

    Blocking: call it from a thread. The paths were checked by
    :func:`parse_load_parameters`; the loader takes ``override.config`` as the config.
    """
    for relative, content in override.files.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return directory
