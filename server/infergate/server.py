"""The composition root: builds the gRPC server and owns its lifecycle.

Start: bind the port (liveness answers at once), load the models in
background threads, then report SERVING; in poll mode a task owned here
rescans the repository every ``repository_poll_seconds``. Stop (SIGTERM,
Ctrl-C): health goes NOT_SERVING, polling stops, the port stops accepting,
queued and running requests finish within the grace period, shadow calls are
dropped, then batchers drain and sessions close — in that order.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate._proto import model_config_pb2 as mc
from infergate.config import ServerConfig
from infergate.repository.loader import ModelRepository
from infergate.routing.shadow import ShadowQueue
from infergate.security.interceptor import build_interceptors
from infergate.security.keys import KeyStore, build_key_store
from infergate.security.tls import server_credentials
from infergate.serving.admin import ADMIN_SERVICE_NAME, AdminServicer
from infergate.serving.health_port import HealthPort
from infergate.serving.servicer import InferenceServicer, ServerState
from infergate.telemetry import Telemetry, check_exporters
from infergate.telemetry.logs import HEALTH, LISTENING, METRICS, announcement

__all__ = ["SERVICE_NAME", "InferGateServer", "check_startable"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool holding every served service: ours live in a private pool (see _proto)."""
    pool = descriptor_pool.DescriptorPool()
    files: list[FileDescriptor] = [
        mc.DESCRIPTOR,
        pb.DESCRIPTOR,
        apb.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    ]
    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool


class InferGateServer:
    """An infergate server over one model repository."""

    def __init__(self, config: ServerConfig, telemetry: Telemetry | None = None):
        if config.model_repository is None:
            raise ValueError("a model repository is required")
        self.config = config
        self.telemetry = telemetry or Telemetry.from_config(config.telemetry, access_log=config.log_level == "debug")
        self.repository = ModelRepository(
            Path(config.model_repository),
            self.telemetry.observer,
            drain_timeout=config.shutdown_grace_seconds,
            explicit=config.model_control_mode == "explicit",
        )
        limits = config.limits
        self.state = ServerState(
            model_control_mode=config.model_control_mode,
            max_elements=limits.max_elements_per_tensor,
            max_rows=limits.max_batch_rows,
            max_inputs=limits.max_inputs_per_request,
        )
        metrics = self.telemetry.metrics
        self.shadows = ShadowQueue(recorder=metrics.record_shadow if metrics is not None else None)
        if metrics is not None:
            metrics.watch_canaries(self._canaries)
        self._poller: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()
        self._keys: KeyStore | None = build_key_store(config.auth) if config.auth.enabled else None
        self._server = grpc.aio.server(
            interceptors=build_interceptors(
                config, self._keys, self.telemetry.interceptors(), metrics.record_auth_refusal if metrics else None
            ),
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.max_send_message_length", config.max_send_message_bytes),
                ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
                # Share the port only among --workers; never by accident with another server.
                ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.repository, self.state, self.shadows), self._server
        )
        apb_grpc.add_InferGateAdminServicer_to_server(AdminServicer(self.repository), self._server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._health_port = (
            HealthPort(self._health, reuse_port=config.reuse_port) if config.health_port is not None else None
        )
        services = (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self._server, pool=_reflection_pool())
        self.port = 0
        self.health_port: int | None = None

    async def start(self) -> int:
        """Bind and start serving; models load afterwards (see ``load_models``). Returns the port."""
        self.repository.discover()
        if self._keys is not None:
            await self._keys.refresh()  # a JWKS URL's first fetch (off the loop); failures are logged
        address = f"{self.config.host}:{self.config.port}"
        tls = self.config.tls
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, server_credentials(tls))
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._health_port is not None and self.config.health_port is not None:
            host = self.config.health_host or self.config.host
            self.health_port = await self._health_port.start(host, self.config.health_port)
            log.info("health on %s:%d (plaintext, grpc.health.v1 only)", host, self.health_port)
        self.shadows.start()
        self.telemetry.start()
        await self._server.start()
        log.info("listening on %s:%d%s", self.config.host, self.port, " (TLS)" if tls else "")
        return self.port

    async def load_models(self) -> bool:
        """Load the models; report SERVING when all loaded (or, not strict, when done).

        Explicit mode loads only ``load_models`` ("*": all) and is ready without models.
        """
        await self.repository.load_all(self._startup_models())
        failed = self.repository.not_ready() if self.config.model_control_mode != "explicit" else []
        ready = not failed or not self.config.strict_readiness
        self.state.ready = ready
        if ready:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "%d model(s) ready%s; server %s",
            len(self.repository.entries) - len(failed),
            f", failed: {', '.join(failed)}" if failed else "",
            "ready" if ready else "NOT ready (strict readiness)",
        )
        if self.config.model_control_mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository poll")
        return ready

    def _canaries(self) -> list[tuple[str, int, float, str]]:
        """Each model's canary as the metrics report it; called on a metrics reader's thread."""
        out = []
        for name, entry in list(self.repository.entries.items()):
            canary = entry.router.canary if entry.router is not None else None
            if canary is not None:
                out.append((name, canary.version, canary.weight, canary.state))
        return out

    def _startup_models(self) -> list[str] | None:
        if self.config.model_control_mode != "explicit" or "*" in self.config.load_models:
            return None
        return self.config.load_models

    async def _poll(self) -> None:
        """Rescan the repository now and then; a failing scan is logged and retried next time."""
        while True:
            await asyncio.sleep(self.config.repository_poll_seconds)
            try:
                await self.repository.rescan()
            except Exception:
                log.exception("repository poll failed")

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self._health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, stop accepting, finish in-flight work, close models."""
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        log.info("draining (grace %.1fs)", grace)
        self.state.draining = True
        await self._health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.config.shutdown_delay_seconds > 0:
            # Closing the port at once cancelled a few calls arriving under load
            # (tests/test_rolling_restart.py); meanwhile health watchers move away.
            log.info("NOT_SERVING; still serving for %.1fs", self.config.shutdown_delay_seconds)
            await asyncio.sleep(self.config.shutdown_delay_seconds)
        await self._server.stop(grace)
        if self._health_port is not None:
            await self._health_port.stop(0)  # probes saw NOT_SERVING for the whole drain
        await self.shadows.aclose()
        await self.repository.aclose(timeout=grace)
        if self._keys is not None:
            self._keys.close()
        await asyncio.to_thread(self.telemetry.shutdown)  # flushes spans still queued for export
        log.info("stopped")


def check_startable(config: ServerConfig) -> None:
    """Raise ConfigError for what ``InferGateServer(config)`` would refuse: keys, certificates, exporters.

    For ``--workers``: the supervisor checks once, so a bad file is reported once, not by every worker.
    """
    if config.auth.enabled:
        build_key_store(config.auth).close()
    if config.tls is not None:
        server_credentials(config.tls)
    check_exporters(config.telemetry)


async def run_until_signalled(server: InferGateServer, stop: asyncio.Event) -> None:
    """Start, load, serve until ``stop`` is set, then drain."""
    await server.start()
    fmt = server.config.logging.format
    address = f"{server.config.host}:{server.port}"
    print(announcement(LISTENING + address, fmt, address=address), flush=True)
    if server.telemetry.metrics_port is not None:
        url = f"http://{server.config.telemetry.metrics_host}:{server.telemetry.metrics_port}/metrics"
        print(announcement(METRICS + url, fmt, url=url), flush=True)
    if server.health_port is not None:
        health_address = f"{server.config.health_host or server.config.host}:{server.health_port}"
        print(announcement(HEALTH + health_address, fmt, address=health_address), flush=True)
    loader = asyncio.create_task(server.load_models())
    await stop.wait()
    if not loader.done():
        loader.cancel()
    await server.stop()
