"""grpc.health.v1's servicer, with Watch streams that do not cut each other off.

grpcio-health-checking's aio ``HealthServicer`` keeps one ``asyncio.Condition`` per watched service
and deletes it when *any* Watch of that service ends. The watches still waiting on that condition
then never hear of a later change: a client watching "" could miss NOT_SERVING at shutdown because
another client (a probe, a load balancer) stopped watching first (``test_lifecycle.py`` has both
kinds of watcher). This subclass counts each service's watches and puts the condition back while
any remain; the rest is the library's.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from grpc_health.v1 import health, health_pb2

__all__ = ["HealthServicer"]


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc-health ships no types
    def __init__(self) -> None:
        super().__init__()
        self._watches: Counter[str] = Counter()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]  # the one the library's Watch waits on (a defaultdict)
        self._watches[service] += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches[service] -= 1
            if self._watches[service]:
                self._server_watchers[service] = condition  # the library dropped it with this watch
            else:
                del self._watches[service]
