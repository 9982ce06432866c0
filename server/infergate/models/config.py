"""A model's ``config.yaml``: batching, instances, providers, session options, versions, routing.

A frozen pydantic model that refuses unknown keys, validated once at load.
Keys follow Triton's model configuration names wherever the concept exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from infergate.configfile import ConfigError, Strict, read_yaml, validate
from infergate.routing.config import Routing

__all__ = [
    "PROVIDERS",
    "DeviceExecution",
    "DynamicBatching",
    "ExecutionProvider",
    "InstanceGroup",
    "LatestPolicy",
    "ModelConfig",
    "SessionOptions",
    "SpecificPolicy",
    "VersionPolicy",
    "Warmup",
    "load_model_config",
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


class InstanceGroup(Strict):
    """How many sessions run batches of this model in parallel."""

    count: Annotated[int, Field(ge=1, le=64)] = 1


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
    """Runs the model on zero inputs at load, so the first request pays no warm-up."""

    batch_sizes: list[Annotated[int, Field(ge=1)]] = [1]
    iterations: Annotated[int, Field(ge=0, le=1000)] = 1


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


class ModelConfig(Strict):
    """A model's ``config.yaml``. Everything is optional; the ONNX graph supplies the rest."""

    # None: 64 when every input and output has a symbolic first dimension, else 0.
    # 0: the model does not batch and requests carry its full shape.
    max_batch_size: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
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

    def without_routing(self) -> ModelConfig:
        """The part of the config that decides how versions load (routing changes need no reload)."""
        return self.model_copy(update={"routing": None})


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a model's config.yaml; a missing file means all defaults."""
    if not path.exists():
        return ModelConfig()
    config = validate(ModelConfig, read_yaml(path), path)
    _check_preferred_sizes(config, path)
    _check_cuda_graphs(config, path)
    return config


def _check_preferred_sizes(config: ModelConfig, path: Path) -> None:
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


def _check_cuda_graphs(config: ModelConfig, path: Path) -> None:
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
