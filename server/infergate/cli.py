"""The ``infergate`` command: ``serve``, ``check``, ``batch``, ``profile``, ``config``, ``demo-repository``
and ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal, NoReturn

from infergate import __version__
from infergate.config import ConfigError, ServerConfig, load_server_config
from infergate.eventloop import EVENT_LOOPS
from infergate.eventloop import run as run_on_loop
from infergate.monitoring.profiling import add_profile_command, profile_main
from infergate.offline import command as offline_command
from infergate.security.config import exposure_warning
from infergate.telemetry import configure_logging
from infergate.telemetry.logs import LogControl, announcement
from infergate.unsent import wait_until_delivered
from infergate.workers import WorkerRole, supervise

__all__ = ["main"]

LogFormat = Literal["text", "json"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infergate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"infergate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over gRPC")
    serve.add_argument("--model-repository", type=Path, help="DIR holding <model>/<version>/model.onnx")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port", "--grpc-port", type=int, help="gRPC port (default 8001; 0 picks a free one; Triton's --grpc-port)"
    )
    serve.add_argument("--config", type=Path, help="server configuration file (YAML)")
    serve.add_argument("--shutdown-grace-seconds", type=float, help="time in-flight requests get on SIGTERM")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"], help="log line format (default text)")
    serve.add_argument("--audit-log", type=Path, metavar="FILE", help="append audit events here (default: the log)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default off)")
    serve.add_argument("--traces", action="store_true", default=None, help="trace requests (exporter: OTEL_*)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    serve.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        help="the asyncio event loop (default auto: uvloop when installed)",
    )
    serve.add_argument(
        "--model-control-mode",
        choices=["none", "poll", "explicit"],
        help="none: load at start; poll: also watch the repository; explicit: load/unload only through the API",
    )
    serve.add_argument("--repository-poll-secs", type=float, help="poll mode: seconds between scans (default 15)")
    serve.add_argument(
        "--load-model", action="append", help="explicit mode: a model to load at start (repeatable; '*' for all)"
    )
    serve.add_argument(
        "--strict-readiness",
        type=_true_or_false,
        metavar="{true,false}",
        help="ServerReady (and health) only once every model loaded (default true, as Triton's)",
    )
    serve.add_argument(
        "--health-port",
        type=int,
        help="also serve grpc.health.v1, plaintext and without auth, on this port (for probes when TLS is on)",
    )
    serve.add_argument("--health-host", help="address of the --health-port (default: --host)")
    serve.add_argument(
        "--allow-client-shm",
        action="store_true",
        default=None,
        help="let clients on this host pass tensors through system shared memory (/dev/shm; Triton's flag)",
    )
    # Set by the --workers supervisor for each worker it starts.
    serve.add_argument("--reuse-port", action="store_true", default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--control-socket", type=Path, help=argparse.SUPPRESS)

    demo = commands.add_parser("demo-repository", help="write the demo models (built locally) to DIR")
    demo.add_argument("directory", type=Path)

    add_profile_command(commands)  # infergate.monitoring.profiling

    check = commands.add_parser(
        "check",
        help="validate a model repository as the server would load it, without serving (a CI/CD gate)",
        description="Exit 0 when the repository would serve cleanly, 1 otherwise (with a table of findings), "
        "2 on a bad command line. See docs/ci-gate.md.",
    )
    check.add_argument("--model-repository", type=Path, required=True, help="DIR holding <model>/<version>/")
    check.add_argument("--config", type=Path, help="the server configuration file to check too")
    check.add_argument("--model", action="extend", nargs="+", metavar="NAME", help="only these models")
    check.add_argument("--smoke", action="store_true", help="also run one inference per version, checked for NaN/Inf")
    check.add_argument("--format", choices=["text", "json"], default="text", help="json: for pipelines")

    config = commands.add_parser(
        "config",
        help="print a model's configuration as config.yaml (say, to move a Triton config.pbtxt to one)",
        description="Read DIR/<model>'s config.yaml or config.pbtxt as the server does and print it as "
        "config.yaml, every default left out. Exit 1 when it does not validate. See docs/triton.md.",
    )
    config.add_argument("model_directory", type=Path, metavar="MODEL_DIR", help="the model's directory")

    offline_command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo-repository":
        return _demo_repository(args.directory)
    if args.command == "profile":
        return profile_main(args)
    if args.command == "check":
        return _check(args)
    if args.command == "config":
        return _print_config(args.model_directory)
    if args.command == "batch":
        configure_logging("warning", "text")
        return offline_command.main(args)
    return _serve(args)


def _check(args: argparse.Namespace) -> int:
    from .check import check_repository

    if not args.model_repository.is_dir():
        print(f"infergate: {args.model_repository} is not a directory", file=sys.stderr)
        return 2
    configure_logging("warning", "text")  # the findings go to stdout; library warnings to stderr
    report = asyncio.run(check_repository(args.model_repository, args.config, args.model, args.smoke))
    print(report.as_json() if args.format == "json" else report.as_table())
    return 0 if report.ok else 1


def _print_config(directory: Path) -> int:
    import yaml

    from .models.config_files import read_model_config

    if not directory.is_dir():
        print(f"infergate: {directory} is not a directory", file=sys.stderr)
        return 2
    try:
        config = read_model_config(directory)
    except ConfigError as exc:
        print(f"infergate: {exc}", file=sys.stderr)
        return 1
    settings = config.model_dump(mode="json", exclude_defaults=True)
    print(f"# {directory.name}/config.yaml")
    print(yaml.safe_dump(settings, sort_keys=False) if settings else "{}", end="")
    return 0


def _demo_repository(directory: Path) -> int:
    from .demo import write_demo_repository  # onnx.helper is needed only here

    names = write_demo_repository(directory)
    print(f"wrote {len(names)} demo models to {directory}: {', '.join(names)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    fmt: LogFormat = args.log_format or "text"  # until the config file says otherwise
    try:
        config = _load_config(args)
    except ConfigError as exc:
        return _fail(str(exc), fmt, 2)
    fmt = config.logging.format
    if config.model_repository is None:
        return _fail("--model-repository (or model_repository in --config) is required", fmt, 2)
    logs = configure_logging(config.log_level, fmt)
    if (warning := exposure_warning(config.host, config.auth)) is not None:
        _say(warning, fmt, logging.WARNING)
    try:
        if config.workers > 1:
            from infergate.startable import check_startable  # only serve reads keys and certificates

            check_startable(config)  # once here, not once per worker
            telemetry = config.telemetry
            return asyncio.run(
                supervise(
                    config.host,
                    config.port,
                    config.workers,
                    _worker_args(args),
                    grace=config.shutdown_delay_seconds + config.shutdown_grace_seconds,
                    metrics_address=(
                        (telemetry.metrics_host, telemetry.metrics_port) if telemetry.metrics_port is not None else None
                    ),
                    log_format=fmt,
                )
            )
        run_on_loop(_serve_async(config, logs, _worker_role(args)), config.event_loop)
    except ConfigError as exc:  # keys and certificates are read when the server is built
        logs.close()  # the lines logged so far come first (a thread writes them), then why it stopped
        return _fail(str(exc), fmt, 2)
    except (OSError, RuntimeError) as exc:
        logs.close()
        return _fail(str(exc), fmt, 1)
    return 0


def _true_or_false(text: str) -> bool:
    """A boolean flag's value as Triton's command line writes it (``--strict-readiness=false``)."""
    value = text.lower()
    if value not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: true or false")
    return value in ("true", "1")


def _load_config(args: argparse.Namespace) -> ServerConfig:
    return load_server_config(
        args.config,
        {
            "model_repository": args.model_repository,
            "host": args.host,
            "port": args.port,
            "shutdown_grace_seconds": args.shutdown_grace_seconds,
            "log_level": args.log_level,
            "workers": args.workers,
            "event_loop": args.event_loop,
            "reuse_port": args.reuse_port,
            "model_control_mode": args.model_control_mode,
            "repository_poll_seconds": args.repository_poll_secs,
            "load_models": args.load_model,
            "audit_log": args.audit_log,
            "health_port": args.health_port,
            "health_host": args.health_host,
            "strict_readiness": args.strict_readiness,
            "telemetry": {
                "metrics_port": args.metrics_port,
                # A worker's own endpoint is private: the supervisor merges it into the one it serves.
                "metrics_host": "127.0.0.1" if args.control_socket is not None else None,
                "traces": args.traces,
            },
            "logging": {"format": args.log_format},
            "shared_memory": {"system": {"enabled": args.allow_client_shm}},
        },
    )


def _say(message: str, fmt: LogFormat, level: int) -> None:
    """One line on stderr: ``infergate: message``, or a JSON object when logs are JSON."""
    text = f"infergate: {message}" if fmt == "text" else message
    print(announcement(text, fmt, level), file=sys.stderr, flush=True)


def _fail(message: str, fmt: LogFormat, code: int) -> int:
    """Report why the server cannot run, once, and return the exit status."""
    _say(message, fmt, logging.ERROR)
    return code


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The serve flags a worker of --workers N gets (port and workers are the supervisor's)."""
    flags = {
        "--model-repository": args.model_repository,
        "--config": args.config,
        "--host": args.host,
        "--shutdown-grace-seconds": args.shutdown_grace_seconds,
        "--log-level": args.log_level,
        "--model-control-mode": args.model_control_mode,
        "--repository-poll-secs": args.repository_poll_secs,
        "--log-format": args.log_format,
        "--audit-log": args.audit_log,
        "--health-port": args.health_port,
        "--health-host": args.health_host,
        "--event-loop": args.event_loop,
        "--strict-readiness": args.strict_readiness,
    }
    out = [item for flag, value in flags.items() if value is not None for item in (flag, str(value))]
    out += [item for model in args.load_model or () for item in ("--load-model", model)]
    if args.traces:
        out.append("--traces")
    return [*out, "--workers", "1"]


def _worker_role(args: argparse.Namespace) -> WorkerRole | None:
    if args.control_socket is None:
        return None
    return WorkerRole(args.worker_index or 0, args.worker_count or 1, args.control_socket)


async def _serve_async(config: ServerConfig, logs: LogControl, worker: WorkerRole | None = None) -> None:
    from infergate.server import InferGateServer, run_until_signalled  # only serve needs it: check starts faster

    # grpc.aio objects belong to the running loop; the process is the server alone, so its heap may freeze.
    # The process's logging is the server's too: LogSettings may change it.
    server = InferGateServer(config, worker=worker, freeze_heap=True, logs=logs)
    stop = asyncio.Event()
    signalled: list[float] = []
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not signalled:
            signalled.append(time.monotonic())
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await run_until_signalled(server, stop, close_port=False, load_first=worker is not None)
    # The answers are in the kernel's hands, not yet all in the clients' (unsent.py); within the grace.
    await wait_until_delivered(signalled[0] + config.shutdown_delay_seconds + config.shutdown_grace_seconds)
    _exit_leaving_connections()


def _exit_leaving_connections() -> NoReturn:
    """End the process once it has drained, without shutting gRPC's server down.

    Why: by now every call the server admitted has been answered (and every
    byte of the answers acknowledged by its client, unless the grace ran out:
    unsent.py), and new ones have been refused with UNAVAILABLE. But calls still in flight to the
    process (sent, not yet taken by the server) are cut off by gRPC's own
    shutdown with CANCELLED, which clients must not retry. When the process
    simply ends, the kernel closes its connections and those calls fail with
    UNAVAILABLE, which clients retry (docs/deploy.md, tests/faults/).
    """
    logging.shutdown()  # writes the log lines still queued for the writer thread (telemetry/logs.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
