"""The server's interceptors, composed in one place (:func:`build_interceptors`), and the one helper
that wraps a method handler's behaviour (:func:`wrap_handler`).

Order (a call passes them first to last before reaching its servicer):

1. the observers — telemetry's RPC span, metrics and access log — so that
   calls a later interceptor refuses are traced and counted too;
2. the auth interceptor (``security/interceptor.py``) when ``auth.enabled``.

Interceptors build nothing per call: gRPC hands every call of a method the
same handler object, so each interceptor wraps a handler once and keeps the
result (:class:`HandlerCache`); what differs per call (the caller, a refusal)
travels in context variables, which belong to the call's own task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

__all__ = ["HandlerCache", "StreamBehaviour", "UnaryBehaviour", "build_interceptors", "wrap_handler"]

UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The one behaviour a handler has, whatever its kind."""
    behaviour: Callable[..., Any] = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[(handler.request_streaming, handler.response_streaming)]
    return behaviour


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    *,
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    stream: Callable[[StreamBehaviour], StreamBehaviour],
    deserialize: bool = True,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped, for all four kinds of method.

    ``unary`` wraps behaviours that answer once (unary-unary, stream-unary),
    ``stream`` those that answer with a stream (unary-stream, stream-stream).
    A streaming request arrives as an async iterator in place of the message.
    Without ``deserialize`` the behaviour gets the raw request bytes (never read).
    """
    kind = (handler.request_streaming, handler.response_streaming)
    behaviour = behaviour_of(handler)
    wrapped = stream(behaviour) if handler.response_streaming else unary(behaviour)
    return _FACTORIES[kind](
        wrapped,
        request_deserializer=handler.request_deserializer if deserialize else None,
        response_serializer=handler.response_serializer,
    )


class HandlerCache:
    """Wrapped handlers by the handler they wrap (one per method, so it stays small).

    Bounded anyway: a handler that is not the same object call after call (an
    interceptor further in that builds one per call) would otherwise pin them all.
    """

    def __init__(self, build: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler], limit: int = 1024):
        self._build = build
        self._limit = limit
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    def __call__(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            wrapped = self._build(handler)
            if len(self._wrapped) < self._limit:
                self._wrapped[handler] = wrapped
        return wrapped

    def __len__(self) -> int:
        return len(self._wrapped)


def build_interceptors(
    observers: Sequence[grpc.aio.ServerInterceptor], auth: grpc.aio.ServerInterceptor | None
) -> list[grpc.aio.ServerInterceptor]:
    """Every server interceptor, in order (see the module docstring)."""
    return [*observers, *([auth] if auth is not None else [])]
