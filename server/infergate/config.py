"""The server's configuration: ``infergate serve --config FILE`` and the command-line flags.

A frozen pydantic model that refuses unknown keys, validated once at load;
:func:`load_server_config` raises :class:`ConfigError` naming the file and the
field path. Each model's own ``config.yaml`` is :mod:`infergate.models.config`.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from infergate.configfile import (
    ConfigError,
    FieldError,
    FilePath,
    Strict,
    error_loc,
    explain,
    is_cross_field,
    read_yaml,
    validate,
    where,
)
from infergate.eventloop import EventLoopChoice
from infergate.security.config import AuthConfig, LimitsConfig, TlsConfig

__all__ = [
    "ConfigError",
    "ConnectionsConfig",
    "LoggingConfig",
    "ResponseCacheConfig",
    "ServerConfig",
    "SharedMemoryConfig",
    "SystemSharedMemoryConfig",
    "TelemetryConfig",
    "load_server_config",
]


class TelemetryConfig(Strict):
    """Traces and metrics (see docs/observability.md); exporters come from the OTEL_* variables."""

    traces: bool = False  # spans per RPC, queue wait and batch; exported per OTEL_TRACES_EXPORTER
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0  # parent-based: a caller's decision wins
    trace_health: bool = False  # also trace grpc.health and reflection calls
    metrics: bool = False  # implied by metrics_port; OTLP push when OTEL_METRICS_EXPORTER=otlp
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None  # Prometheus scrape endpoint
    metrics_host: str = "127.0.0.1"
    # Also serve Triton's nv_inference_* counters on the Prometheus endpoint (telemetry/triton.py).
    triton_metrics: bool = True


class LoggingConfig(Strict):
    """How log lines are written; ``log_level`` stays a top-level key."""

    format: Literal["text", "json"] = "text"


class SystemSharedMemoryConfig(Strict):
    """Triton's system shared-memory extension (serving/shared_memory.py, docs/security.md).

    Off by default: when on, any caller that may reach the port can make the
    server open, read and write files under /dev/shm by name (Triton's own
    ``--allow-client-shm`` is off by default too).

    Each registered region holds an open file: ``max_regions`` must leave
    :data:`FILES_FOR_THE_REST` of the process's open-file limit (RLIMIT_NOFILE's
    soft limit, ``ulimit -n``) to connections and the server's own files, or
    registrations would take the descriptors new connections need.
    """

    enabled: bool = False
    max_regions: Annotated[int, Field(ge=1, le=4096)] = 64  # registered at once
    max_bytes: Annotated[int, Field(ge=1)] = 1 << 30  # registered at once, all regions together

    @model_validator(mode="after")
    def _regions_within_the_open_file_limit(self) -> SystemSharedMemoryConfig:
        limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if not self.enabled or limit == resource.RLIM_INFINITY or self.max_regions + FILES_FOR_THE_REST <= limit:
            return self
        room = limit - FILES_FOR_THE_REST
        lower = f", or lower max_regions to {room}" if room >= 1 else ""
        raise FieldError(
            "max_regions",
            f"{self.max_regions} regions hold an open file each, and {FILES_FOR_THE_REST} more stay for "
            f"connections and the server's own files: that passes this process's open-file limit of {limit} "
            f"(RLIMIT_NOFILE; raise it with ulimit -n or systemd's LimitNOFILE{lower})",
        )


# Open files kept for everything but shared-memory regions: connections, models, logs, the runtime's own.
FILES_FOR_THE_REST = 256


Seconds = Annotated[float, Field(ge=0.001, le=7 * 86_400)]  # gRPC takes whole milliseconds in a C int


class ConnectionsConfig(Strict):
    """How long a client connection lives (docs/deploy.md, "Balancing gRPC calls").

    A gRPC client keeps one connection, and a Service or ``--workers`` spreads
    connections, not calls: pods added by a scale-out, or a restarted worker,
    get nothing from clients already connected. With ``max_age_seconds`` each
    connection is told to go (GOAWAY) after that long, give or take 10%; the
    client opens a new one, which may land elsewhere. Calls in flight get
    ``max_age_grace_seconds`` to finish before the connection is closed, and a
    stream still open then ends with UNAVAILABLE.

    A client whose host died or hung leaves its connection open, and its
    stream (an inference call slot, a sequence) with it: TCP alone may not
    notice for hours. The server pings each connection that has calls open
    every ``keepalive_time_seconds`` and closes it when a ping is unanswered
    for ``keepalive_timeout_seconds``, which cancels its calls. (gRPC's own
    default is two hours.)
    """

    max_age_seconds: Seconds | None = None  # grpc.max_connection_age_ms; unset: connections live on
    max_age_grace_seconds: Annotated[float, Field(ge=0, le=7 * 86_400)] = 30.0  # grpc.max_connection_age_grace_ms
    max_idle_seconds: Seconds | None = None  # grpc.max_connection_idle_ms: close one without calls this long
    keepalive_time_seconds: Seconds = 60.0  # grpc.keepalive_time_ms
    keepalive_timeout_seconds: Seconds = 20.0  # grpc.keepalive_timeout_ms

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server options for these settings (none for what is unset)."""
        options = [
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_seconds)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_seconds)),
            # gRPC 1.85 waits for a keepalive ping's ack for its general ping timeout (a minute), not
            # for keepalive_timeout_ms alone (tested: a frozen client was never dropped without this).
            ("grpc.http2.ping_timeout_ms", _ms(self.keepalive_timeout_seconds)),
        ]
        if self.max_age_seconds is not None:
            options.append(("grpc.max_connection_age_ms", _ms(self.max_age_seconds)))
            options.append(("grpc.max_connection_age_grace_ms", _ms(self.max_age_grace_seconds)))
        if self.max_idle_seconds is not None:
            options.append(("grpc.max_connection_idle_ms", _ms(self.max_idle_seconds)))
        return options


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class ResponseCacheConfig(Strict):
    """The one response cache that models with ``response_cache: {enable: true}`` share
    (models/response_cache.py); 0 turns it off for every model."""

    max_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024


class SharedMemoryConfig(Strict):
    """Tensors passed through shared memory instead of the request (CUDA: not implemented)."""

    system: SystemSharedMemoryConfig = SystemSharedMemoryConfig()


class ServerConfig(Strict):
    """Server options, from ``--config FILE`` (YAML) and command-line flags."""

    model_repository: FilePath | None = None
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
    # Set for the workers of --workers N (the supervisor's --reuse-port): share the port instead of refusing
    # to. Not a user setting: a configuration file that sets it is refused (load_server_config).
    reuse_port: bool = False
    # The asyncio event loop (infergate/eventloop.py): auto is uvloop when installed, else the standard one.
    event_loop: EventLoopChoice = "auto"
    # Triton's model control modes: load at start only, also watch the repository, or only through the API.
    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    repository_poll_seconds: Annotated[float, Field(gt=0, le=86_400)] = 15.0
    # explicit mode: models loaded at start (Triton's --load-model); "*" loads every model.
    load_models: list[str] = []
    # grpc.health.v1 alone on a second, plaintext port without auth (serving/health_port.py): for
    # probes that cannot speak TLS or send a token (the kubelet's). Bound on health_host (default: host).
    health_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    health_host: str | None = None
    telemetry: TelemetryConfig = TelemetryConfig()
    logging: LoggingConfig = LoggingConfig()
    # The audit trail (infergate.audit): appended to this file; unset, it goes to the server log.
    audit_log: FilePath | None = None
    # Security and hardening (security_config.py, docs/security.md).
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    response_cache: ResponseCacheConfig = ResponseCacheConfig()
    shared_memory: SharedMemoryConfig = SharedMemoryConfig()

    @model_validator(mode="after")
    def _health_port_of_its_own(self) -> ServerConfig:
        health = self.health_port
        if health is not None and health != 0 and health == self.port:
            # One server fails to bind it twice; --workers share both ports (SO_REUSEPORT), so the kernel
            # would hand some inference connections to health-only servers.
            raise FieldError(
                "health_port", f"{health} is the serving port too; give the health service a port of its own"
            )
        if health == 0 and self.workers > 1:
            raise FieldError("health_port", "0 (any free port) with workers > 1 gives each worker a different one, "
                             "which no probe can name; choose a port")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _shared_memory_in_one_process(self) -> ServerConfig:
        # Each worker would hold its own regions, and a client's calls may reach any of them.
        if self.shared_memory.system.enabled and self.workers > 1:
            raise FieldError(
                ("shared_memory", "system", "enabled"),
                "needs workers: 1 (each of the --workers processes would hold its own registered regions)",
            )
        return self


# Set by the --workers supervisor for the processes it starts (--reuse-port), never by a file: a single
# server that shared its port would let another process take part of its connections unnoticed.
_SUPERVISOR_ONLY = ("reuse_port",)

COMMAND_LINE = "<command line>"


def load_server_config(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read ``path`` (if given) and apply command-line ``overrides`` (None values ignored).

    The file is validated alone first, so that its errors name it; then with the
    overrides, whose errors name ``<command line>``. A check across fields that the
    file alone fails (``health_port`` is the default ``port``) may be settled by
    a flag (``--port``).
    """
    if path is None:
        return validate(ServerConfig, _merged({}, overrides), COMMAND_LINE)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    for key in _SUPERVISOR_ONLY:
        if key in data:
            raise ConfigError(
                f"{path}: {key}: set only by the --workers supervisor for its worker processes, not in a "
                "configuration file (workers: N shares the port between N processes)"
            )
    file_alone_valid = True
    try:
        ServerConfig.model_validate(data)
    except ValidationError as exc:
        if not all(is_cross_field(item) for item in exc.errors()):
            raise explain(path, exc) from None
        file_alone_valid = False  # only checks across fields, which the flags may settle
    try:
        return ServerConfig.model_validate(_merged(data, overrides))
    except ValidationError as exc:
        flags = _set_paths(overrides)
        lines = []
        for item in exc.errors():
            loc = error_loc(item)
            by_flag = file_alone_valid or any(loc[: len(flag)] == flag for flag in flags)
            lines.append(f"{COMMAND_LINE if by_flag else path}: {where(loc)}: {item['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _set_paths(overrides: dict[str, Any], parent: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The field paths that the non-None ``overrides`` set."""
    paths: list[tuple[str, ...]] = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            paths += _set_paths(value, (*parent, key))
        elif value is not None:
            paths.append((*parent, key))
    return paths


def _merged(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the non-None ``overrides``; a nested block of flags overrides single keys, at any
    depth, and the file keeps the rest (a block that is not a mapping is left for validation to refuse)."""
    out = dict(data)
    for key, value in overrides.items():
        if isinstance(value, dict):
            base = out.get(key) or {}
            if isinstance(base, dict):
                merged = _merged(base, value)
                if merged != base:
                    out[key] = merged
        elif value is not None:
            out[key] = value
    return out
