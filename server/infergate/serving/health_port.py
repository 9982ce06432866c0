"""grpc.health.v1 alone on a second, plaintext port (``health_port``), for probes that cannot speak TLS.

The kubelet's gRPC probes connect in plaintext and send no token, so with TLS (or
mTLS) on the serving port they always fail. This port answers only
``grpc.health.v1.Health`` (Check and Watch), from the same ``HealthServicer`` as
the serving port, so both report the same status at every moment, draining
included. No inference, admin or reflection service is registered here, and no
interceptor runs: there is nothing to authenticate.

Bind it where only the prober can reach it when that matters (the pod's own
address in Kubernetes, loopback on a host); it reveals only SERVING or NOT_SERVING.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from infergate.netaddr import host_port

__all__ = ["HealthPort"]


class HealthPort:
    """A plaintext gRPC server with only ``servicer`` on it; started and stopped by the composition root."""

    def __init__(self, servicer: health.aio.HealthServicer, *, reuse_port: bool = False):
        self._server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_receive_message_length", 64 * 1024),  # health requests are a service name
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self._server)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0 picks a free port) and serve; returns the bound port."""
        address = host_port(host, port)
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address} (health port)")
        await self._server.start()
        return self.port

    async def stop(self, grace: float) -> None:
        await self._server.stop(grace)
