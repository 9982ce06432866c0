"""Answers that cover one worker only say so: initial metadata ``infergate-worker: INDEX/COUNT``.

Under ``--workers N`` each worker keeps its own ModelStatistics and its own
routers (canary progress, shadow comparisons), so ModelStatistics and
RoutingStatus describe the worker that got the connection. Triton's messages
have no field for that; response metadata leaves them exactly as tritonclient
parses them, and any gRPC client can read it (``grpcurl -v`` prints it). The
pod-wide totals are on the supervisor's Prometheus endpoint.

Only servers started as workers install this interceptor; other methods pass
through untouched.
"""

from __future__ import annotations

from typing import Any

import grpc

from infergate.serving.interceptors import (
    HandlerCache,
    SelectingInterceptor,
    StreamBehaviour,
    UnaryBehaviour,
    wrap_handler,
)

__all__ = ["PER_WORKER_METHODS", "WORKER_HEADER", "WorkerScopeInterceptor"]

WORKER_HEADER = "infergate-worker"
PER_WORKER_METHODS = frozenset(
    {"/inference.GRPCInferenceService/ModelStatistics", "/infergate.admin.InferGateAdmin/RoutingStatus"}
)


class WorkerScopeInterceptor(SelectingInterceptor):
    """Adds ``infergate-worker: INDEX/COUNT`` to the answers of :data:`PER_WORKER_METHODS`."""

    def __init__(self, index: int, count: int):
        self._metadata = ((WORKER_HEADER, f"{index}/{count}"),)
        self._wrapped = HandlerCache(self._wrap)

    def select(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._wrapped(handler) if method in PER_WORKER_METHODS else handler

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        metadata = self._metadata

        def unary(behaviour: UnaryBehaviour) -> UnaryBehaviour:
            async def marked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.send_initial_metadata(metadata)
                return await behaviour(request, context)

            return marked

        def stream(behaviour: StreamBehaviour) -> StreamBehaviour:
            return behaviour  # no per-worker method streams

        return wrap_handler(handler, unary=unary, stream=stream)
