"""A model's ``config.yaml``: batching, instances, providers, session options, versions, routing, monitoring.

A frozen pydantic model that refuses unknown keys, validated once at load.
Keys follow Triton's model configuration names wherever the concept exists.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, field_validator, model_validator

from infergate.configfile import ConfigError, FieldError, Strict, read_yaml, validate
from infergate.monitoring.config import Monitoring
from infergate.routing.config import Routing

__all__ = [
    "PROVIDERS",
    "SEQUENCE_ID_PARAMETER",
    "ControlInput",
    "DeviceExecution",
    "DynamicBatching",
    "EnsembleScheduling",
    "EnsembleStep",
    "ExecutionProvider",
    "InitialState",
    "InputConfig",
    "InstanceGroup",
    "LatestPolicy",
    "Metadata",
    "ModelConfig",
    "OutputConfig",
    "SequenceBatching",
    "SequenceControl",
    "SequenceDirect",
    "SequenceOldest",
    "SequenceState",
    "SessionOptions",
    "SpecificPolicy",
    "TritonType",
    "VersionPolicy",
    "Warmup",
    "WarmupInput",
    "WarmupSample",
    "dependency_layers",
    "ensemble_plan",
    "load_model_config",
    "model_config_from_data",
]


# Our short provider names and onnxruntime's.
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


class DynamicBatching(Strict):
    """Triton's ``dynamic_batching`` block."""

    max_queue_delay_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    preferred_batch_size: list[Annotated[int, Field(ge=1)]] = []
    # Bounded by default: a full queue refuses fast (UNAVAILABLE) instead of growing.
    max_queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    default_timeout_microseconds: Annotated[int, Field(ge=0)] = 0  # 0: no server-side timeout
    # infergate's own: start batches no more often than this (full ones at once); see batcher.py.
    min_batch_interval_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    # infergate's own: when a request finds an instance idle, let the requests that arrive in the next
    # event-loop turns join its batch (fast at every load without a fixed delay; see batcher.py).
    gather: bool = True
    # Triton's priorities: 1 is the highest; requests of a higher priority are batched first and shed last.
    priority_levels: Annotated[int, Field(ge=0, le=64)] = 0  # 0: no priorities
    default_priority_level: Annotated[int, Field(ge=0, le=64)] = 0  # for requests that send none

    @model_validator(mode="after")
    def _priorities(self) -> DynamicBatching:
        levels, default = self.priority_levels, self.default_priority_level
        if levels and not 1 <= default <= levels:
            raise FieldError("default_priority_level", f"must be in 1..{levels} when priority_levels is {levels}")
        if not levels and default:
            raise FieldError("default_priority_level", "is set but priority_levels is 0")
        return self


MAX_INSTANCES = 64


class InstanceGroup(Strict):
    """How many sessions run batches of this model in parallel, and where a tiny model's batches run."""

    # auto: as Triton's onnxruntime backend with a group that gives no count, two instances of a model on
    # the CPU, each with half the CPUs as intra-op threads, unless its batches run on the event loop, it is
    # stateful or it binds its inputs (one); one on any other device. The second instance starts a batch
    # only once half a full batch waits (batcher.py, parallel_at_half).
    count: int | Literal["auto"] = "auto"
    # infergate's own: with one CPU instance, a model whose largest batch runs in at most this many µs
    # (measured at load) runs its batches on the event loop, where the hop to a thread and back costs more
    # than the model; a batch that ever takes four times as long sends it back to its thread. 0: never.
    inline_max_microseconds: Annotated[int, Field(ge=0, le=10_000)] = 100

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, value: object) -> object:
        if value == "auto" or (type(value) is int and 1 <= value <= MAX_INSTANCES):
            return value
        raise ValueError(f"expected a number of instances from 1 to {MAX_INSTANCES}, or auto; got {value!r}")


class ExecutionProvider(Strict):
    """One onnxruntime execution provider; the list is tried in order."""

    name: Literal["cpu", "cuda", "tensorrt", "rocm", "openvino", "dnnl", "coreml"]
    options: dict[str, str | int | float | bool] = {}


class SessionOptions(Strict):
    """onnxruntime session options."""

    intra_op_num_threads: Annotated[int, Field(ge=0, le=1024)] = 0  # 0: onnxruntime decides
    inter_op_num_threads: Annotated[int, Field(ge=0, le=1024)] = 0
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    # Spinning intra-op threads burn cores that the event loop and the network need.
    allow_spinning: bool = False


class DeviceExecution(Strict):
    """How a batch reaches the execution provider's device: IO binding and CUDA graphs (docs/gpu.md)."""

    # auto: bind when the session runs on cuda or tensorrt; true: always (also on the CPU); false: never.
    io_binding: bool | Literal["auto"] = "auto"
    # One CUDA graph captured per size at load; a batch is padded up to the next captured size.
    cuda_graph_batch_sizes: list[Annotated[int, Field(ge=1, le=1_000_000)]] = []

    @field_validator("io_binding", mode="before")
    @classmethod
    def _choice(cls, value: object) -> object:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f"expected true, false or auto, got {value!r}")

    @field_validator("cuda_graph_batch_sizes")
    @classmethod
    def _distinct(cls, sizes: list[int]) -> list[int]:
        repeated = sorted({s for s in sizes if sizes.count(s) > 1})
        if repeated:
            raise ValueError(f"sizes {repeated} are listed more than once")
        return sorted(sizes)

    @property
    def graphs(self) -> bool:
        return bool(self.cuda_graph_batch_sizes)


class Warmup(Strict):
    """Runs the model at load on zeros of each input's datatype, so the first request pays no warm-up.

    ``model_warmup`` (Triton's samples), when given, runs instead.
    """

    batch_sizes: list[Annotated[int, Field(ge=1)]] = [1]
    iterations: Annotated[int, Field(ge=0, le=1000)] = 1


# Triton's datatype names (model_config.proto); TYPE_STRING is the protocol's BYTES.
TritonType = Literal[
    "TYPE_BOOL",
    "TYPE_UINT8",
    "TYPE_UINT16",
    "TYPE_UINT32",
    "TYPE_UINT64",
    "TYPE_INT8",
    "TYPE_INT16",
    "TYPE_INT32",
    "TYPE_INT64",
    "TYPE_FP16",
    "TYPE_FP32",
    "TYPE_FP64",
    "TYPE_STRING",
]
Dim = Annotated[int, Field(ge=-1)]  # -1: variable
FixedDim = Annotated[int, Field(ge=0)]


def _exactly_one(model: Strict, names: tuple[str, ...]) -> None:
    chosen = [n for n in names if getattr(model, n) is not None]
    if len(chosen) != 1:
        raise ValueError(f"set exactly one of {', '.join(names)} (got {', '.join(chosen) or 'none'})")


class WarmupInput(Strict):
    """Triton's ``ModelWarmup.Input``: one input of a warm-up sample (``dims`` without the batch)."""

    data_type: TritonType
    dims: list[FixedDim]
    zero_data: bool | None = None
    random_data: bool | None = None
    input_data_file: str | None = None  # raw, row-major, under <model>/warmup/

    @model_validator(mode="after")
    def _one_source(self) -> WarmupInput:
        _exactly_one(self, ("zero_data", "random_data", "input_data_file"))
        return self


class WarmupSample(Strict):
    """Triton's ``ModelWarmup``: a named request run at load; ``inputs`` must name every model input."""

    name: str = Field(min_length=1)
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    inputs: dict[str, WarmupInput] = Field(min_length=1)
    count: Annotated[int, Field(ge=0, le=1000)] = 0  # runs; 0 means once, as in Triton


class InputConfig(Strict):
    """Triton's ``input`` entry: what the graph cannot say (``format``); types and dims are checked against it."""

    name: str = Field(min_length=1)
    data_type: TritonType | None = None
    dims: list[Dim] | None = None  # without the batch dimension
    format: Literal["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"] = "FORMAT_NONE"


class OutputConfig(Strict):
    """Triton's ``output`` entry; ``label_filename`` (in the model directory) labels classification results."""

    name: str = Field(min_length=1)
    data_type: TritonType | None = None
    dims: list[Dim] | None = None  # without the batch dimension
    label_filename: str | None = None


ControlKind = Literal[
    "CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_READY", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_CORRID"
]
# The datatypes a CORRID control may carry (Triton: 32-bit ones get the id's low 32 bits).
CORRID_TYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")


class SequenceControl(Strict):
    """Triton's ``Control``: START/READY/END take one ``*_false_true`` pair; CORRID takes a ``data_type``."""

    kind: ControlKind
    int32_false_true: list[int] | None = None
    fp32_false_true: list[float] | None = None
    bool_false_true: list[bool] | None = None
    data_type: TritonType | None = None

    @model_validator(mode="after")
    def _values_fit_the_kind(self) -> SequenceControl:
        pairs = ("int32_false_true", "fp32_false_true", "bool_false_true")
        if self.kind == "CONTROL_SEQUENCE_CORRID":
            given = [n for n in pairs if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{self.kind} takes data_type, not {', '.join(given)}")
            if self.data_type not in CORRID_TYPES:
                raise ValueError(f"{self.kind} needs data_type, one of {', '.join(CORRID_TYPES)}")
            return self
        if self.data_type is not None:
            raise ValueError(f"{self.kind} takes one of {', '.join(pairs)}, not data_type")
        _exactly_one(self, pairs)
        values = self.int32_false_true or self.fp32_false_true or self.bool_false_true or []
        if len(values) != 2:
            raise ValueError(f"{self.kind}: give exactly 2 values, the false one then the true one")
        return self


class ControlInput(Strict):
    """A model input the sequence batcher fills: one control per input."""

    name: str = Field(min_length=1)
    control: list[SequenceControl] = Field(min_length=1, max_length=1)


class InitialState(Strict):
    """Triton's ``InitialState``: zeros, or row-major data from ``<model>/initial_state/<data_file>``."""

    data_type: TritonType
    dims: list[FixedDim]
    zero_data: bool | None = None
    data_file: str | None = None
    name: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> InitialState:
        _exactly_one(self, ("zero_data", "data_file"))
        return self


class SequenceState(Strict):
    """An implicit state: ``output_name`` of one request feeds ``input_name`` of the sequence's next."""

    input_name: str = Field(min_length=1)
    output_name: str = Field(min_length=1)
    data_type: TritonType
    dims: list[Dim] = Field(min_length=1)  # without the batch dimension
    initial_state: list[InitialState] = Field(default_factory=list, max_length=1)

    @model_validator(mode="after")
    def _initial_state_fits(self) -> SequenceState:
        for initial in self.initial_state:
            if initial.data_type != self.data_type:
                raise ValueError(f"initial_state data_type {initial.data_type} differs from {self.data_type}")
            fits = len(initial.dims) == len(self.dims) and all(
                d == -1 or d == i for d, i in zip(self.dims, initial.dims, strict=True)
            )
            if not fits:
                raise ValueError(f"initial_state dims {initial.dims} do not fit dims {self.dims}")
        return self


class SequenceDirect(Strict):
    """Triton's direct strategy: each sequence holds one batch slot until it ends or idles out."""

    max_queue_delay_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    minimum_slot_utilization: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class SequenceOldest(Strict):
    """Triton's oldest strategy: up to ``max_candidate_sequences`` (0: max_batch_size) batched oldest first."""

    max_candidate_sequences: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    preferred_batch_size: list[Annotated[int, Field(ge=1)]] = []
    max_queue_delay_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    preserve_ordering: bool = False  # each sequence's requests already run in order


class SequenceBatching(Strict):
    """Triton's ``sequence_batching`` for stateful models (see ``infergate.models.sequence``)."""

    # 0 means Triton's default, 1 s.
    max_sequence_idle_microseconds: Annotated[int, Field(ge=0, le=3_600_000_000)] = 1_000_000
    control_input: list[ControlInput] = []
    state: list[SequenceState] = []
    direct: SequenceDirect | None = None
    oldest: SequenceOldest | None = None
    # infergate's own: start requests waiting for a free slot beyond this are refused (UNAVAILABLE).
    max_backlog_sequences: Annotated[int, Field(ge=0, le=1_000_000)] = 1024

    @model_validator(mode="after")
    def _consistent(self) -> SequenceBatching:
        if self.direct is not None and self.oldest is not None:
            raise ValueError("choose one strategy: direct or oldest")
        kinds = [c.control[0].kind for c in self.control_input]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given for more than one control input")
        names = [c.name for c in self.control_input] + [s.input_name for s in self.state]
        reused = sorted({n for n in names if names.count(n) > 1})
        if reused:
            raise ValueError(f"inputs {reused} are used by more than one control or state")
        outputs = [s.output_name for s in self.state]
        if len(set(outputs)) != len(outputs):
            raise ValueError("two states share an output_name")
        return self

    @property
    def idle_seconds(self) -> float:
        return (self.max_sequence_idle_microseconds or 1_000_000) / 1e6

    def control(self, kind: str) -> tuple[str, SequenceControl] | None:
        """The input that carries control ``kind`` and its settings, if the model takes it."""
        for entry in self.control_input:
            if entry.control[0].kind == kind:
                return entry.name, entry.control[0]
        return None


class ResponseCache(Strict):
    """Triton's ``response_cache``: answer a request seen before from the server's cache
    (models/response_cache.py). Only for a model whose answer depends on its inputs alone."""

    enable: bool = False


class EnsembleStep(Strict):
    """Triton's ``ensemble_scheduling.step``: run ``model_name`` on ensemble tensors.

    ``input_map`` maps each input of the step's model to the ensemble tensor it
    reads; ``output_map`` maps outputs of the step's model to the ensemble
    tensors they become. ``model_version`` -1 lets the step model's router choose.
    """

    model_name: str = Field(min_length=1)
    model_version: Annotated[int, Field(ge=-1)] = -1
    input_map: dict[Annotated[str, Field(min_length=1)], Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    output_map: dict[Annotated[str, Field(min_length=1)], Annotated[str, Field(min_length=1)]] = Field(min_length=1)


class EnsembleScheduling(Strict):
    """Triton's ``ensemble_scheduling``: the steps of a pipeline of models (``platform: ensemble``)."""

    step: list[EnsembleStep] = Field(min_length=1, max_length=64)


class LatestPolicy(Strict):
    num_versions: Annotated[int, Field(ge=1, le=1000)] = 1


class SpecificPolicy(Strict):
    versions: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class VersionPolicy(Strict):
    """Triton's ``version_policy``: exactly one of ``latest``, ``all``, ``specific``."""

    latest: LatestPolicy | None = None
    all: dict[str, Any] | None = None  # Triton writes it as an empty mapping: ``all: {}``
    specific: SpecificPolicy | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        chosen = [name for name in ("latest", "all", "specific") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one of latest, all, specific (got {', '.join(chosen)})")
        if self.all:
            raise ValueError("all takes no options: write `all: {}`")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those on disk, oldest first."""
        ordered = sorted(available)
        if self.all is not None:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in set(self.specific.versions)]
        latest = self.latest or LatestPolicy()
        return ordered[-latest.num_versions :]


def _iso_date(value: Any) -> Any:
    """YAML reads ``2026-11-30`` as a date (and a timestamp as a datetime): keep it as ISO text."""
    return value.isoformat() if isinstance(value, date) else value


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SHA256SUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # text mode's two spaces, or binary mode's " *"


def _digests(value: Any) -> Any:
    """``sha256``: one digest (of the model file), or ``sha256sum``'s lines ``DIGEST  FILE``, one per file the
    version loads (governance.py); kept as lower-case digests, and lines with two spaces and plain names."""
    if isinstance(value, int | float):  # an all-digit digest unquoted in YAML
        raise ValueError("YAML read the digest as a number: put it in quotes")
    if not isinstance(value, str):
        return value
    if _SHA256.fullmatch(text := value.strip()):
        return text.lower()
    lines: dict[str, str] = {}
    for line in filter(None, (line.strip() for line in text.splitlines())):
        match = _SHA256SUM_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"expected a SHA-256 digest (64 hex digits), or sha256sum's lines; got {line!r}")
        name = posixpath.normpath(match[2])
        if name.startswith("/") or name.split("/")[0] == "..":
            raise ValueError(f"{match[2]!r}: name a file of the version's directory, relative to it")
        if name in lines:
            raise ValueError(f"{name!r} is listed twice")
        lines[name] = match[1].lower()
    return "\n".join(f"{digest}  {name}" for name, digest in lines.items())


Text = Annotated[str, Field(min_length=1, max_length=4096)]


class Metadata(Strict):
    """Governance: who made the model, from what, under which terms, and its files' digests.

    The ``metadata:`` block of config.yaml applies to every version; a version's
    ``metadata.yaml`` overrides it field by field (see infergate.models.governance).
    Served as string parameters of the ModelConfig RPC.
    """

    owner: Text | None = None
    description: Text | None = None
    source_run: Text | None = None  # an experiment or training-run id or URL
    training_data: Text | None = None
    license: Text | None = None
    # Served joined with commas, so a tag cannot hold one.
    tags: list[Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^,]+$")]] = []
    created: Annotated[Text, BeforeValidator(_iso_date)] | None = None
    # Of the version's model file, or sha256sum's lines, one per file it loads (its external data too);
    # checked at load (a mismatch: the version does not load).
    sha256: Annotated[str, BeforeValidator(_digests), Field(min_length=1)] | None = None
    labels: dict[Annotated[str, Field(min_length=1, max_length=256)], Annotated[str, Field(max_length=4096)]] = {}


class ModelConfig(Strict):
    """A model's ``config.yaml``. Everything is optional; the ONNX graph supplies the rest."""

    # None: 64 when every input and output has a symbolic first dimension, else 0.
    # 0: the model does not batch and requests carry its full shape.
    max_batch_size: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    # "ensemble": a pipeline of other models (ensemble_scheduling), with no model file of its own.
    platform: Literal["onnxruntime_onnx", "ensemble"] = "onnxruntime_onnx"
    ensemble_scheduling: EnsembleScheduling | None = None
    dynamic_batching: DynamicBatching = DynamicBatching()
    instance_group: InstanceGroup = InstanceGroup()
    execution_providers: list[ExecutionProvider] = Field(
        default_factory=lambda: [ExecutionProvider(name="cpu")], min_length=1
    )
    session_options: SessionOptions = SessionOptions()
    warmup: Warmup = Warmup()
    device_execution: DeviceExecution = DeviceExecution()
    default_model_filename: str = "model.onnx"
    version_policy: VersionPolicy = VersionPolicy()
    routing: Routing | None = None
    # Drift monitoring against a reference profile, and payload logging (infergate.monitoring.config).
    monitoring: Monitoring = Monitoring()
    metadata: Metadata = Metadata()
    # Triton's names: scheduling of stateful models, warm-up samples, and what the graph cannot say about tensors.
    sequence_batching: SequenceBatching | None = None
    response_cache: ResponseCache = ResponseCache()
    model_warmup: list[WarmupSample] = []
    input: list[InputConfig] = []
    output: list[OutputConfig] = []

    @model_validator(mode="after")
    def _one_scheduler(self) -> ModelConfig:
        # Each error names the field it is about (FieldError), not the top level.
        if self.sequence_batching is not None and "dynamic_batching" in self.model_fields_set:
            raise FieldError(
                "sequence_batching", "choose one of dynamic_batching and sequence_batching (Triton's scheduling_choice)"
            )
        if self.sequence_batching is not None and self.response_cache.enable:
            raise FieldError(
                ("response_cache", "enable"),
                "needs a model without sequence_batching: a stateful model's answer "
                "depends on its sequence's state, not on the request alone",
            )
        for kind, entries in (("input", self.input), ("output", self.output)):
            names = [e.name for e in entries]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise FieldError(kind, f"{twice} listed more than once")
        if self.platform == "ensemble" or self.ensemble_scheduling is not None:
            _check_ensemble(self)
        return self

    @property
    def is_ensemble(self) -> bool:
        return self.platform == "ensemble"

    @property
    def step_models(self) -> tuple[str, ...]:
        """The models an ensemble's steps run, each once, in step order (none for another model)."""
        steps = self.ensemble_scheduling.step if self.ensemble_scheduling is not None else []
        return tuple(dict.fromkeys(step.model_name for step in steps))

    def without_routing(self) -> ModelConfig:
        """The part of the config that decides how versions load (routing changes need no reload)."""
        return self.model_copy(update={"routing": None})


# What an ensemble's config may set: the rest belongs to the models its steps run.
_ENSEMBLE_FIELDS = frozenset(
    ("platform", "ensemble_scheduling", "max_batch_size", "input", "output", "version_policy", "metadata")
)


def _check_ensemble(config: ModelConfig) -> None:
    """An ensemble: typed inputs and outputs, and steps that form a pipeline from the one to the other.

    Every tensor a step reads is an ensemble input or written by another step;
    no tensor is written twice (an ensemble input included); every ensemble
    output is written; no step waits on itself through others. Raises FieldError
    naming what is wrong and the field it is about.
    """
    if config.ensemble_scheduling is None:
        raise FieldError("ensemble_scheduling", "platform: ensemble needs ensemble_scheduling (its steps)")
    if config.platform != "ensemble":
        raise FieldError("platform", "ensemble_scheduling is for platform: ensemble")
    other = sorted(config.model_fields_set - _ENSEMBLE_FIELDS)
    if other:
        raise FieldError(other[0], f"an ensemble takes no {', '.join(other)}: set them on the models its steps run")
    if not config.input or not config.output:
        raise FieldError(
            "output" if config.input else "input",
            "an ensemble lists its input and output tensors (it has no graph to read them from)",
        )
    tensors: list[tuple[str, int, InputConfig | OutputConfig]] = [
        *(("input", i, t) for i, t in enumerate(config.input)),
        *(("output", i, t) for i, t in enumerate(config.output)),
    ]
    untyped = [(kind, i, t.name) for kind, i, t in tensors if t.data_type is None or t.dims is None]
    if untyped:
        kind, index, _ = untyped[0]
        raise FieldError((kind, index), f"ensemble tensors {[name for _, _, name in untyped]} need data_type and dims")
    steps = config.ensemble_scheduling.step
    writers: dict[str, int] = {t.name: -1 for t in config.input}  # tensor -> step that writes it (-1: the caller)
    for i, step in enumerate(steps):
        for tensor in step.output_map.values():
            if tensor in writers:
                first = "an ensemble input" if writers[tensor] < 0 else f"step {writers[tensor]}"
                raise FieldError(
                    ("ensemble_scheduling", "step", i, "output_map"),
                    f"step {i} writes tensor {tensor!r}, which {first} already provides",
                )
            writers[tensor] = i
    for i, step in enumerate(steps):
        unknown = sorted(t for t in step.input_map.values() if t not in writers)
        if unknown:
            raise FieldError(
                ("ensemble_scheduling", "step", i, "input_map"),
                f"step {i} ({step.model_name}) reads {unknown}, which no input or step provides",
            )
    unwritten = sorted(t.name for t in config.output if t.name not in writers or writers[t.name] < 0)
    if unwritten:
        raise FieldError("output", f"ensemble outputs {unwritten} are not written by any step")
    try:
        ensemble_plan(steps, writers)
    except ValueError as exc:
        raise FieldError(("ensemble_scheduling", "step"), str(exc)) from None


def ensemble_plan(steps: list[EnsembleStep], writers: dict[str, int] | None = None) -> list[list[int]]:
    """The steps in waves: each wave's steps read only ensemble inputs and earlier waves' outputs.

    Raises ValueError naming the steps that wait on one another.
    """
    if writers is None:
        writers = {t: i for i, step in enumerate(steps) for t in step.output_map.values()}
    needs = {i: {writers.get(t, -1) for t in step.input_map.values()} - {-1} for i, step in enumerate(steps)}
    waves, stuck = dependency_layers(needs)
    if stuck:
        names = ", ".join(f"{i} ({steps[i].model_name})" for i in stuck)
        raise ValueError(f"steps {names} wait on each other's outputs (a cycle)")
    return waves


Node = TypeVar("Node", int, str)


def dependency_layers(needs: Mapping[Node, set[Node]]) -> tuple[list[list[Node]], list[Node]]:
    """``needs`` (each node: the nodes it must come after, all among the keys) in layers, each needing
    only the layers before it; and, sorted, the nodes left when the rest wait on one another (a cycle)."""
    left = dict(needs)
    done: set[Node] = set()
    layers: list[list[Node]] = []
    while layer := sorted(node for node, after in left.items() if after <= done):
        layers.append(layer)
        done.update(layer)
        for node in layer:
            del left[node]
    return layers, sorted(left)


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a model's config.yaml; a missing file means all defaults."""
    if not path.exists():
        return ModelConfig()
    return model_config_from_data(read_yaml(path), path)


def model_config_from_data(data: Any, source: Path | str) -> ModelConfig:
    """Validate parsed config data exactly as config.yaml is; errors start with ``source``.

    Integers are integers: Triton's JSON and a config.pbtxt, which may write them as strings, come
    here through ``overrides.from_triton_json``, which makes them integers first.
    """
    config = validate(ModelConfig, data, source)
    _check_preferred_sizes(config, source)
    _check_sequence_routing(config, source)
    _check_cuda_graphs(config, source)
    return config


# The request parameter that carries a sequence's correlation id: the sticky key of a stateful model.
SEQUENCE_ID_PARAMETER = "sequence_id"


def _check_sequence_routing(config: ModelConfig, path: Path | str) -> None:
    """A stateful model's requests of one sequence must all reach the version that holds its state.

    So a model with ``sequence_batching`` takes no canary (its share moves while
    sequences run) and no shadow (a copy of part of a sequence has no state to
    continue from), and weights that give traffic to more than one version must
    be sticky on the correlation id.
    """
    routing = config.routing
    if config.sequence_batching is None or routing is None:
        return
    why = "a model with sequence_batching keeps each sequence on one version"
    if routing.canary is not None:
        raise ConfigError(f"{path}: routing.canary: {why}, and a canary's growing share would move running ones")
    if routing.shadow is not None:
        raise ConfigError(f"{path}: routing.shadow: {why}; sequence requests are never mirrored to a shadow")
    split = sum(1 for weight in routing.weights.values() if weight > 0) > 1
    sticky = routing.sticky
    if split and (sticky is None or sticky.parameter != SEQUENCE_ID_PARAMETER):
        raise ConfigError(
            f"{path}: routing.sticky: {why}: weights that split traffic between versions need "
            f"`sticky: {{parameter: {SEQUENCE_ID_PARAMETER}}}`"
        )


def _check_preferred_sizes(config: ModelConfig, path: Path | str) -> None:
    """Preferred batch sizes must fit max_batch_size (when it is set; else checked at load)."""
    mbs = config.max_batch_size
    preferred = config.dynamic_batching.preferred_batch_size
    if mbs is None or not preferred:
        return
    where = f"{path}: dynamic_batching.preferred_batch_size"
    if mbs == 0:
        raise ConfigError(f"{where}: set on a model that does not batch (max_batch_size: 0)")
    too_big = [p for p in preferred if p > mbs]
    if too_big:
        raise ConfigError(f"{where}: {too_big} exceed max_batch_size {mbs}")


# Provider options that turn CUDA graphs on by themselves. Replaying a graph needs inputs and outputs at
# the addresses it was captured with, which only device_execution.cuda_graph_batch_sizes arranges.
_GRAPH_OPTIONS = {"cuda": "enable_cuda_graph", "tensorrt": "trt_cuda_graph_enable"}


def _check_cuda_graphs(config: ModelConfig, path: Path | str) -> None:
    """CUDA graphs: asked for through cuda_graph_batch_sizes only, on a batching model that runs on cuda."""
    for i, provider in enumerate(config.execution_providers):
        option = _GRAPH_OPTIONS.get(provider.name)
        if option is not None and str(provider.options.get(option, "")).lower() in ("1", "true"):
            raise ConfigError(
                f"{path}: execution_providers.{i}.options.{option}: set device_execution.cuda_graph_batch_sizes "
                "instead (infergate captures one graph per size, on fixed buffers, and pads batches to them)"
            )
    device = config.device_execution
    if not device.graphs:
        return
    where = f"{path}: device_execution.cuda_graph_batch_sizes"
    if device.io_binding is False:
        raise ConfigError(f"{where}: CUDA graphs run through IO binding; remove io_binding: false")
    if config.execution_providers[0].name != "cuda":
        raise ConfigError(f"{where}: CUDA graphs need `cuda` as the first execution provider")
    mbs = config.max_batch_size
    if mbs == 0:
        raise ConfigError(f"{where}: set on a model that does not batch (max_batch_size: 0)")
    too_big = [s for s in device.cuda_graph_batch_sizes if mbs is not None and s > mbs]
    if too_big:
        raise ConfigError(f"{where}: {too_big} exceed max_batch_size {mbs}")
