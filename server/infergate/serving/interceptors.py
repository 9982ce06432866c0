"""The server's interceptors, composed in one place (:class:`CallPipeline`), and the one helper
that wraps a method handler's behaviour (:func:`wrap_handler`).

Order (a call passes them first to last before reaching its servicer):

0. admission (``admission.py``): an inference call over the server's limit,
   or any once the server drains, is refused before anything else runs;
1. the observers — telemetry's RPC span, metrics and access log — so that
   calls a later stage refuses are traced and counted too;
2. the admin audit (``admin_audit.py``): every admin write (model load,
   unload) is audited however it ends, so it comes before the two that may
   refuse it; it returns every other method's handler untouched;
3. :class:`MalformedRequests`, so that a request that does not parse gets
   INVALID_ARGUMENT naming the method (gRPC's own answer is UNKNOWN and a
   Python class name);
4. the auth interceptor (``security/interceptor.py``) when ``auth.enabled``.

gRPC sees one interceptor, :class:`CallPipeline`. Given several, grpc.aio
runs each as two coroutines per call (its ``intercept_service`` and the
continuation to the next); the pipeline asks each stage synchronously
instead (:class:`HandlerStage`) and keeps the handler they compose, so a
ModelInfer pays one coroutine and one dictionary lookup for all of them.
Each stage is still an interceptor of its own (``intercept_service``), for
whoever wants one alone.

Interceptors build nothing per call: gRPC hands every call of a method the
same handler object, so each interceptor wraps a handler once and keeps the
result (:class:`HandlerCache`; :class:`MethodHandlerCache` keeps one per
method, for wrappers that depend on the method); what differs per call (the
caller, a refusal) travels in context variables, which belong to the call's
own task.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from infergate.errors import InvalidArgument
from infergate.serving.status import abort_with

__all__ = [
    "CallPipeline",
    "Finish",
    "HandlerCache",
    "HandlerStage",
    "MalformedRequests",
    "MethodHandlerCache",
    "SelectingInterceptor",
    "StreamBehaviour",
    "UnaryBehaviour",
    "call_status",
    "observe_handler",
    "wrap_handler",
]

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


Deserializer = Callable[[bytes], Any]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    *,
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    stream: Callable[[StreamBehaviour], StreamBehaviour],
    deserialize: bool = True,
    deserializer: Deserializer | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped, for all four kinds of method.

    ``unary`` wraps behaviours that answer once (unary-unary, stream-unary),
    ``stream`` those that answer with a stream (unary-stream, stream-stream)
    as an async generator. A streaming behaviour written as a coroutine that
    answers through ``context.write`` (grpc_health's Watch is one) is awaited
    like a unary one, so ``unary`` wraps it. A streaming request arrives as an
    async iterator in place of the message.
    Without ``deserialize`` the behaviour gets the raw request bytes (never
    read); ``deserializer`` replaces the handler's own.
    """
    kind = (handler.request_streaming, handler.response_streaming)
    behaviour = behaviour_of(handler)
    generator = handler.response_streaming and inspect.isasyncgenfunction(behaviour)
    wrapped = stream(behaviour) if generator else unary(behaviour)
    return _FACTORIES[kind](
        wrapped,
        request_deserializer=(deserializer or handler.request_deserializer) if deserialize else None,
        response_serializer=handler.response_serializer,
    )


Finish = Callable[[BaseException | None, Any], None]  # (the error, or None; the unary response, or None)
Start = Callable[[Any, grpc.aio.ServicerContext], Finish]  # a call starts: its request (or request iterator)


def observe_handler(handler: grpc.RpcMethodHandler, start: Start) -> grpc.RpcMethodHandler:
    """``handler`` whose every call reports its start and, once it has ended, its end.

    ``start(request, context)`` runs as the call begins and returns what to
    call when it ends: ``finish(error, response)`` with the exception it ended
    with (None when it answered) and, for a unary response, the response.
    """

    def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            finish = start(request, context)
            try:
                response = await inner(request, context)
            except BaseException as exc:
                finish(exc, None)
                raise
            finish(None, response)
            return response

        return observed

    def stream(inner: StreamBehaviour) -> StreamBehaviour:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            finish = start(request, context)
            error: BaseException | None = None
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(error, None)

        return observed

    return wrap_handler(handler, unary=unary, stream=stream)


def call_status(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: the one its handler set or aborted with; DEADLINE_EXCEEDED or
    CANCELLED when gRPC cancelled it (at its deadline, or when its client went away); else
    OK (answered) or UNKNOWN (an exception no translation handled)."""
    code = context.code()
    if code is None and error is None:
        return grpc.StatusCode.OK  # the common case first: answered, nothing set
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


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


Wrapper = Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler]


class MethodHandlerCache:
    """A :class:`HandlerCache` per method path: ``wrapper_for(path)`` makes a method's wrapper once.

    Only registered methods reach an interceptor with a handler, so it stays small.
    """

    def __init__(self, wrapper_for: Callable[[str], Wrapper]):
        self._wrapper_for = wrapper_for
        self._by_method: dict[str, HandlerCache] = {}
        # Per method, the handler it last got and what that became: asked on every call (by the pipeline,
        # and by auth), where one lookup and an identity check cost half of the two caches' lookups.
        self._last: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def __call__(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        last = self._last.get(path)
        if last is not None and last[0] is handler:
            return last[1]
        cache = self._by_method.get(path)
        if cache is None:
            cache = self._by_method[path] = HandlerCache(self._wrapper_for(path))
        wrapped = cache(handler)
        self._last[path] = (handler, wrapped)
        return wrapped


class _Malformed:
    """What a request that does not parse becomes, so that its handler can say so."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


class _MalformedRequest(InvalidArgument):
    """A streamed request that does not parse: ends the stream, from the call's own task."""


def _tolerant(deserialize: Deserializer) -> Deserializer:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom deserializer raises
            return _Malformed(exc)

    return parse


class HandlerStage(Protocol):
    """A stage whose handler for a call depends on nothing but the method and the handler it wraps."""

    def select(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler: ...


class SelectingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """An interceptor made of one :class:`HandlerStage`: ``select`` is all a subclass writes."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return None if handler is None else self.select(details.method, handler)

    @abc.abstractmethod
    def select(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler this stage serves ``method``'s calls with, given the one it wraps."""


class MalformedRequests(SelectingInterceptor):
    """A request message that does not parse ends its call with INVALID_ARGUMENT naming the method."""

    def __init__(self) -> None:
        self._wrapped = MethodHandlerCache(
            lambda path: functools.partial(_refusing_malformed, method=path.rsplit("/", 1)[-1])
        )

    def select(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        return self._wrapped(method, handler)


def _refusing_malformed(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    message = getattr(getattr(handler.request_deserializer, "__self__", None), "DESCRIPTOR", None)
    expected = f"a valid {message.full_name} message" if message is not None else "a valid request message"

    def refusal(malformed: _Malformed) -> _MalformedRequest:
        return _MalformedRequest(f"{method}: the request is not {expected} ({malformed.error})")

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        # Raises rather than aborts: whoever reads a stream's requests may be a task of the servicer's own
        # (stream.py's reader) while the call's task writes an answer, and only the call's task may end the
        # call. The refusal reaches it through the servicer (which ends the call with it) or through here.
        async for request in requests:
            if isinstance(request, _Malformed):
                raise refusal(request)
            yield request

    def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if handler.request_streaming:
                try:
                    return await inner(checked(request), context)
                except _MalformedRequest as malformed:
                    await abort_with(context, malformed, method)
            if isinstance(request, _Malformed):
                await abort_with(context, refusal(request), method)
            return await inner(request, context)

        return guarded

    def stream(inner: StreamBehaviour) -> StreamBehaviour:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if handler.request_streaming:
                request = checked(request)
            elif isinstance(request, _Malformed):
                await abort_with(context, refusal(request), method)
            try:
                async for response in inner(request, context):
                    yield response
            except _MalformedRequest as malformed:
                await abort_with(context, malformed, method)

        return guarded

    return wrap_handler(handler, unary=unary, stream=stream, deserializer=_tolerant(handler.request_deserializer))


class Gate(Protocol):
    """The first stage (``admission.py``): a refusing handler for a call it does not take, else None."""

    def admit(self, method: str) -> grpc.RpcMethodHandler | None: ...


class Authenticator(Protocol):
    """The last stage (``security/interceptor.py``): the handler that serves, or refuses, this caller."""

    def authorize_now(
        self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler | None:
        """The handler, or None when the caller's token must first be verified (:meth:`authorize`)."""
        ...

    async def authorize(
        self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        """For a call :meth:`authorize_now` answered None for: verify the token, then choose."""
        ...


class CallPipeline(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """The one interceptor the server installs: every stage, in the order of the module docstring."""

    def __init__(
        self,
        gate: Gate,
        observers: Sequence[HandlerStage],
        admin_audit: HandlerStage,
        auth: Authenticator | None,
    ):
        self._gate = gate
        self._auth = auth
        # Applied innermost first: the first observer wraps everything after it.
        self._stages: tuple[HandlerStage, ...] = (MalformedRequests(), admin_audit, *reversed(observers))
        self._composed = MethodHandlerCache(lambda path: functools.partial(self._compose, method=path))
        self._outermost: HandlerStage | None = None

    def observe_also(self, stage: HandlerStage | None) -> None:
        """Put ``stage`` outside every other stage (None: take it away again), for the calls that
        start from now on: the access log while LogSettings asks for verbose lines on a server that
        started without one. The handlers composed so far are dropped, and composed again as calls come."""
        if stage is self._outermost:
            return
        stages = self._stages[:-1] if self._outermost is not None else self._stages
        self._stages = (*stages, stage) if stage is not None else stages
        self._outermost = stage
        self._composed = MethodHandlerCache(lambda path: functools.partial(self._compose, method=path))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        refusal = self._gate.admit(method)
        if refusal is not None:
            return refusal
        handler = await continuation(details)
        if handler is None:
            return None
        if self._auth is not None:
            handler = self._auth.authorize_now(details, handler) or await self._auth.authorize(details, handler)
        return self._composed(method, handler)

    def _compose(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        for stage in self._stages:
            handler = stage.select(method, handler)
        return handler
