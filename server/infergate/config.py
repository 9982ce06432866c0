"""Configuration: the server's options and each model's ``config.yaml``.

Both are frozen pydantic models that refuse unknown keys, validated once at
load. :func:`load_model_config` and :func:`load_server_config` raise
:class:`ConfigError` whose message names the file and the field path, e.g.
``models/mlp/config.yaml: dynamic_batching.max_queue_size: Input should be
greater than or equal to 1``. Model keys follow Triton's model configuration
names wherever the concept exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .security_config import AuthConfig, LimitsConfig, TlsConfig

__all__ = [
    "PROVIDERS",
    "ConfigError",
    "DynamicBatching",
    "ExecutionProvider",
    "InstanceGroup",
    "LoggingConfig",
    "ModelConfig",
    "Routing",
    "ServerConfig",
    "SessionOptions",
    "TelemetryConfig",
    "VersionPolicy",
    "Warmup",
    "load_model_config",
    "load_server_config",
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


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DynamicBatching(_Strict):
    """Triton's ``dynamic_batching`` block."""

    max_queue_delay_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    preferred_batch_size: list[Annotated[int, Field(ge=1)]] = []
    # Bounded by default: a full queue refuses fast (UNAVAILABLE) instead of growing.
    max_queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    default_timeout_microseconds: Annotated[int, Field(ge=0)] = 0  # 0: no server-side timeout
    # infergate's own: start batches no more often than this (full ones at once); see batcher.py.
    min_batch_interval_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 0


class InstanceGroup(_Strict):
    """How many sessions run batches of this model in parallel."""

    count: Annotated[int, Field(ge=1, le=64)] = 1


class ExecutionProvider(_Strict):
    """One onnxruntime execution provider; the list is tried in order."""

    name: Literal["cpu", "cuda", "tensorrt", "rocm", "openvino", "dnnl", "coreml"]
    options: dict[str, str | int | float | bool] = {}


class SessionOptions(_Strict):
    """onnxruntime session options."""

    intra_op_num_threads: Annotated[int, Field(ge=0, le=1024)] = 0  # 0: onnxruntime decides
    inter_op_num_threads: Annotated[int, Field(ge=0, le=1024)] = 0
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    # Spinning intra-op threads burn cores that the event loop and the network need.
    allow_spinning: bool = False


class Warmup(_Strict):
    """Runs the model on zero inputs at load, so the first request pays no warm-up."""

    batch_sizes: list[Annotated[int, Field(ge=1)]] = [1]
    iterations: Annotated[int, Field(ge=0, le=1000)] = 1


class LatestPolicy(_Strict):
    num_versions: Annotated[int, Field(ge=1, le=1000)] = 1


class SpecificPolicy(_Strict):
    versions: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class VersionPolicy(_Strict):
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


class StickyRouting(_Strict):
    """Where the key that pins a caller to one version comes from: a gRPC metadata header or a request parameter."""

    header: Annotated[str, Field(min_length=1, pattern=r"^[a-z0-9_.-]+$")] | None = None
    parameter: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> StickyRouting:
        if (self.header is None) == (self.parameter is None):
            raise ValueError("set exactly one of header, parameter")
        return self


class ShadowRouting(_Strict):
    """Mirror a fraction of routed requests to ``version``; its answers are compared, never returned."""

    version: Annotated[int, Field(ge=0)]
    fraction: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Shadow calls waiting to run; when full, new ones are dropped (and counted).
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 64
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    # Shadow calls of this model may be running at most this share of the time; beyond it copies are dropped.
    max_busy_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1


class CanaryRouting(_Strict):
    """Give ``version`` a share of traffic that grows step by step while it stays within limits."""

    version: Annotated[int, Field(ge=0)]
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(min_length=1)  # percent of traffic
    # Canary requests observed at each step before it is judged.
    step_requests: Annotated[int, Field(ge=20, le=10_000_000)] = 200
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Canary p99 latency may be at most this multiple of the primary's over the same step.
    max_p99_ratio: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 2.0

    @model_validator(mode="after")
    def _increasing(self) -> CanaryRouting:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must increase")
        return self


class Routing(_Strict):
    """How requests that name no version are spread over the loaded versions."""

    weights: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}
    sticky: StickyRouting | None = None
    shadow: ShadowRouting | None = None
    canary: CanaryRouting | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Routing:
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("weights must sum to a positive total")
        shadow, canary = self.shadow, self.canary
        if shadow is not None and self.weights.get(shadow.version, 0) > 0:
            raise ValueError(f"shadow.version {shadow.version} also takes traffic in weights: it would shadow itself")
        if canary is not None and self.weights.get(canary.version, 0) > 0:
            raise ValueError(f"canary.version {canary.version} also has a weight; canary traffic comes from its steps")
        if shadow is not None and canary is not None and shadow.version == canary.version:
            raise ValueError(f"version {shadow.version} cannot be both the shadow and the canary")
        return self

    def versions(self) -> dict[str, int]:
        """Every version the routing names, by the field that names it."""
        named = {f"weights.{v}": v for v in self.weights}
        if self.shadow is not None:
            named["shadow.version"] = self.shadow.version
        if self.canary is not None:
            named["canary.version"] = self.canary.version
        return named

    def side_versions(self) -> set[int]:
        """The shadow and canary versions: they get their own share of traffic, never the default one."""
        return {side.version for side in (self.shadow, self.canary) if side is not None}


class ModelConfig(_Strict):
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
    default_model_filename: str = "model.onnx"
    version_policy: VersionPolicy = VersionPolicy()
    routing: Routing | None = None

    def without_routing(self) -> ModelConfig:
        """The part of the config that decides how versions load (routing changes need no reload)."""
        return self.model_copy(update={"routing": None})


class TelemetryConfig(_Strict):
    """Traces and metrics (see docs/observability.md); exporters come from the OTEL_* variables."""

    traces: bool = False  # spans per RPC, queue wait and batch; exported per OTEL_TRACES_EXPORTER
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0  # parent-based: a caller's decision wins
    trace_health: bool = False  # also trace grpc.health and reflection calls
    metrics: bool = False  # implied by metrics_port; OTLP push when OTEL_METRICS_EXPORTER=otlp
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None  # Prometheus scrape endpoint
    metrics_host: str = "127.0.0.1"


class LoggingConfig(_Strict):
    """How log lines are written; ``log_level`` stays a top-level key."""

    format: Literal["text", "json"] = "text"


class ServerConfig(_Strict):
    """Server options, from ``--config FILE`` (YAML) and command-line flags."""

    model_repository: Path | None = None
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8001
    # Queued and running requests get this long to finish after SIGTERM.
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # Before that, keep serving this long with health NOT_SERVING, so clients that watch
    # health (client-side health checking) move new calls elsewhere before the port closes.
    shutdown_delay_seconds: Annotated[float, Field(ge=0, le=600)] = 0.0
    # Health is SERVING only when every model loaded (Triton's --strict-readiness).
    strict_readiness: bool = True
    max_receive_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    max_send_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Processes sharing the port (SO_REUSEPORT), each with its own loop and batchers.
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    # Set for the workers of --workers N: share the port instead of refusing to.
    reuse_port: bool = False
    # Triton's model control modes: load at start only, also watch the repository, or only through the API.
    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    repository_poll_seconds: Annotated[float, Field(gt=0, le=86_400)] = 15.0
    # explicit mode: models loaded at start (Triton's --load-model); "*" loads every model.
    load_models: list[str] = []
    telemetry: TelemetryConfig = TelemetryConfig()
    logging: LoggingConfig = LoggingConfig()
    # Security and hardening (security_config.py, docs/security.md).
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None
    limits: LimitsConfig = LimitsConfig()


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _explain(path: Path, error: ValidationError) -> ConfigError:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{path}: {where}: {item['msg']}")
    return ConfigError("\n".join(lines))


def _validate(kind: type[M], data: Any, path: Path) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc) from None


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a model's config.yaml; a missing file means all defaults."""
    if not path.exists():
        return ModelConfig()
    config = _validate(ModelConfig, _read_yaml(path), path)
    _check_preferred_sizes(config, path)
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


def load_server_config(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read ``path`` (if given) and apply command-line ``overrides`` (None values ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data.update(loaded or {})
    for key, value in overrides.items():
        if isinstance(value, dict):  # a nested block: flags override single keys, the file keeps the rest
            given = {k: v for k, v in value.items() if v is not None}
            base = data.get(key) or {}
            if given and isinstance(base, dict):  # not a mapping: left for validation to refuse
                data[key] = {**base, **given}
        elif value is not None:
            data[key] = value
    return _validate(ServerConfig, data, path or Path("<command line>"))
