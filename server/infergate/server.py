"""The composition root: builds the gRPC server and owns its lifecycle.

Start: bind the port (liveness answers at once), load every model in the
background threads, then report SERVING. Stop (SIGTERM, Ctrl-C): health goes
NOT_SERVING, the port stops accepting, queued and running requests finish
within the grace period, then batchers drain and sessions close — in that order.
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

from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from ._proto import model_config_pb2 as mc
from .config import ServerConfig
from .repository import ModelRepository
from .servicer import InferenceServicer, ServerState

__all__ = ["SERVICE_NAME", "InferGateServer"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool holding every served service: ours live in a private pool (see _proto)."""
    pool = descriptor_pool.DescriptorPool()
    files: list[FileDescriptor] = [mc.DESCRIPTOR, pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool


class InferGateServer:
    """An infergate server over one model repository."""

    def __init__(self, config: ServerConfig):
        if config.model_repository is None:
            raise ValueError("a model repository is required")
        self.config = config
        self.repository = ModelRepository(Path(config.model_repository))
        self.state = ServerState()
        self._health = health.aio.HealthServicer()
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.max_send_message_length", config.max_send_message_bytes),
                # Share the port only among --workers; never by accident with another server.
                ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.repository, self.state), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server, pool=_reflection_pool()
        )
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; models load afterwards (see ``load_models``). Returns the port."""
        self.repository.discover()
        address = f"{self.config.host}:{self.config.port}"
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        log.info("listening on %s:%d", self.config.host, self.port)
        return self.port

    async def load_models(self) -> bool:
        """Load every model; report SERVING when all loaded (or, not strict, when done)."""
        await self.repository.load_all()
        failed = self.repository.not_ready()
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
        return ready

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self._health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, stop accepting, finish in-flight work, close models."""
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        log.info("draining (grace %.1fs)", grace)
        self.state.draining = True
        await self._health.enter_graceful_shutdown()
        if self.config.shutdown_delay_seconds > 0:
            # Closing the port at once cancelled a few calls arriving under load
            # (tests/test_rolling_restart.py); meanwhile health watchers move away.
            log.info("NOT_SERVING; still serving for %.1fs", self.config.shutdown_delay_seconds)
            await asyncio.sleep(self.config.shutdown_delay_seconds)
        await self._server.stop(grace)
        await self.repository.aclose(timeout=grace)
        log.info("stopped")


async def run_until_signalled(server: InferGateServer, stop: asyncio.Event) -> None:
    """Start, load, serve until ``stop`` is set, then drain."""
    await server.start()
    print(f"infergate listening on {server.config.host}:{server.port}", flush=True)
    loader = asyncio.create_task(server.load_models())
    await stop.wait()
    if not loader.done():
        loader.cancel()
    await server.stop()
