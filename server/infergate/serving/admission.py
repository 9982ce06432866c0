"""Admission: how many inference calls the server takes on at once, and when it stops taking them.

The first interceptor a call meets. An inference call (ModelInfer, and a
ModelStreamInfer stream as one call) is admitted while fewer than ``limit``
are in progress; beyond that it is refused at once with UNAVAILABLE, before
its request is read, routed, decoded or queued — so the CPU goes to the calls
the server will answer. When the server drains (:meth:`close`), every new
inference call is refused the same way, and :meth:`drained` says when the
admitted ones are all answered; only then does the server close its port.

Why a fixed limit and not an adaptive one (Envoy's gradient controller
lowers the limit when latency rises over the minimum seen): on a shared
machine the latency swings with the neighbours' load, which would drag such
a limit around; a fixed limit sized from a measurement (docs/deploy.md,
BENCHMARKS.md) keeps every admitted call's wait bounded by
``limit / throughput``, and the model queues behind it keep their own bounds.
Other methods (health, metadata, model control) are never limited: probes
must answer under overload.

Why count in the interceptor rather than in the handler: a burst of calls
runs every interceptor before any handler starts, so counting at the
handler would admit the whole burst. The count is released when the call's
task ends, whatever became of the call.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from infergate.errors import Unavailable
from infergate.serving.status import abort_with

__all__ = ["INFERENCE_METHODS", "Admission"]

INFERENCE_METHODS = frozenset(
    {"/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelStreamInfer"}
)

_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"

OnRefusal = Callable[[str], None]  # gets "overloaded" or "draining" for every refused call


class Admission(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """A server-wide limit on inference calls in progress; refuses the excess and, when closed, everything."""

    def __init__(self, limit: int, on_refusal: OnRefusal | None = None):
        if limit < 1:
            raise ValueError("the limit on inference calls in progress must be at least 1")
        self.limit = limit
        self.in_progress = 0
        self.streams = 0  # ModelStreamInfer calls among them
        self._closing = False
        self.closing = asyncio.Event()  # set by close(): open streams stop reading (serving/stream.py)
        self._idle = asyncio.Event()
        self._on_refusal = on_refusal
        overloaded = Unavailable(
            f"the server is overloaded: {limit} inference calls are in progress (its limit); retry with backoff"
        )
        draining = Unavailable("the server is shutting down and takes no new calls; retry on another replica")
        self._refuse_overloaded = _refusal_handlers(overloaded)
        self._refuse_draining = _refusal_handlers(draining)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self.admit(details.method)
        return refusal if refusal is not None else await continuation(details)

    def admit(self, method: str) -> grpc.RpcMethodHandler | None:
        """Count an inference call in (released when its task ends), or return the handler that
        refuses it; None for every other method. Called in the call's own task."""
        if method not in INFERENCE_METHODS:
            return None
        if self._closing:
            return self._refuse("draining", self._refuse_draining, method)
        if self.in_progress >= self.limit:
            return self._refuse("overloaded", self._refuse_overloaded, method)
        task = asyncio.current_task()
        assert task is not None  # interceptors run in the call's own task
        self.in_progress += 1
        if method == _STREAM:
            self.streams += 1
            task.add_done_callback(self._release_stream)
        else:
            task.add_done_callback(self._release)
        return None

    def calls_in_progress(self) -> int:
        """Inference calls admitted and not ended; ``sys.maxsize`` while a stream is open (it may send
        any number of requests). The batchers read it to tell when no request can be on its way
        (models/batcher.py, gathering)."""
        return sys.maxsize if self.streams else self.in_progress

    def _refuse(self, reason: str, handlers: dict[str, grpc.RpcMethodHandler], method: str) -> grpc.RpcMethodHandler:
        if self._on_refusal is not None:
            self._on_refusal(reason)
        return handlers[method]

    def _release_stream(self, task: object) -> None:
        self.streams -= 1
        self._release(task)

    def _release(self, _: object) -> None:
        self.in_progress -= 1
        if self._closing and self.in_progress == 0:
            self._idle.set()

    def close(self) -> None:
        """Refuse every new inference call from now on; open streams answer what they read and end."""
        self._closing = True
        self.closing.set()
        if self.in_progress == 0:
            self._idle.set()

    async def drained(self) -> None:
        """Return once :meth:`close` was called and every admitted inference call has ended."""
        await self._idle.wait()


def _refusal_handlers(error: Unavailable) -> dict[str, grpc.RpcMethodHandler]:
    """One prebuilt handler per inference method that answers ``error`` without reading the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort_with(context, error, "admission")

    return {
        "/inference.GRPCInferenceService/ModelInfer": grpc.unary_unary_rpc_method_handler(refuse),
        "/inference.GRPCInferenceService/ModelStreamInfer": grpc.stream_stream_rpc_method_handler(refuse),
    }
