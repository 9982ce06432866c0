"""The auth interceptor: every non-exempt call is authenticated, then authorized per method and model.

A call without a valid ``authorization: Bearer <JWT>`` gets UNAUTHENTICATED
before its request is even deserialised. An accepted call runs with its
principal as :func:`~infergate.security.auth.current_principal` (a context
variable set here, in the call's own task), the method's permission
(``METHOD_RULES``) is checked against the model each request message names,
RepositoryIndex answers are filtered to the caller's models. A stream outlives
the check of its token: its next request ends it when the token has expired
(``expired``) or when a JWKS fetch has withdrawn the key that verified it
(``key_withdrawn``). Every refusal's short reason (``expired``,
``permission_denied``…) goes to ``on_refusal`` (the refusal counter). Admin
writes (``Rule.audit``) are audited, allowed or refused, by
:class:`~infergate.serving.admin_audit.AdminAudit`, which runs before this
interceptor and whether or not auth is on.

Nothing is built per call: each method's authorized and refusing handlers are
built once (:class:`~infergate.serving.interceptors.HandlerCache`); the
refusal of one call travels to its handler in a context variable.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate.security.auth import (
    AuthError,
    Expired,
    KeyWithdrawn,
    Principal,
    TokenVerifier,
    authorization,
    current_principal,
    require,
    token_of,
    use_principal,
    visible_models,
)
from infergate.security.keys import KeyStore
from infergate.serving.interceptors import (
    HandlerCache,
    MethodHandlerCache,
    StreamBehaviour,
    UnaryBehaviour,
    wrap_handler,
)
from infergate.serving.status import abort_with

__all__ = ["METHOD_RULES", "AuthInterceptor", "Rule", "filter_repository_index", "rule_for"]

OnRefusal = Callable[[str], None]  # gets the short reason of every refused call
TOKENS_REMEMBERED = 4096  # authorization header values whose token is kept (the verifier caches as many)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """What a method needs: ``permission`` None means any authenticated caller."""

    permission: str | None
    model_field: str | None = None  # request field naming the model the permission applies to
    audit: bool = False  # an admin write: every call is audited (serving/admin_audit.py), auth on or off
    filter_index: bool = False


_INFERENCE = "/inference.GRPCInferenceService/"
_ANY = Rule(None)

METHOD_RULES: dict[str, Rule] = {
    _INFERENCE + "ModelInfer": Rule("infer", "model_name"),
    _INFERENCE + "ModelStreamInfer": Rule("infer", "model_name"),  # checked on every message
    _INFERENCE + "ModelMetadata": Rule("metadata", "name"),
    _INFERENCE + "ModelConfig": Rule("metadata", "name"),
    _INFERENCE + "ModelStatistics": Rule("metadata", "name"),
    _INFERENCE + "ModelReady": Rule("metadata", "name"),
    _INFERENCE + "ServerMetadata": _ANY,
    _INFERENCE + "ServerLive": _ANY,
    _INFERENCE + "ServerReady": _ANY,
    _INFERENCE + "RepositoryIndex": Rule(None, filter_index=True),
    _INFERENCE + "RepositoryModelLoad": Rule("admin", "model_name", audit=True),
    _INFERENCE + "RepositoryModelUnload": Rule("admin", "model_name", audit=True),
    # Shared memory: a region is host memory the server maps and writes, so its own permission; audited
    # when it changes. (A ModelInfer that names a region needs it too: serving/shm_tensors.py.)
    _INFERENCE + "SystemSharedMemoryRegister": Rule("shared_memory", audit=True),
    _INFERENCE + "SystemSharedMemoryUnregister": Rule("shared_memory", audit=True),
    _INFERENCE + "SystemSharedMemoryStatus": Rule("shared_memory"),
    _INFERENCE + "CudaSharedMemoryUnregister": Rule("shared_memory", audit=True),
    _INFERENCE + "CudaSharedMemoryStatus": Rule("shared_memory"),
    # What the server writes to its log, and so what an incident leaves behind: operators only, audited.
    _INFERENCE + "LogSettings": Rule("admin", audit=True),
    # Which calls are traced: an operator's lever, as the log settings are.
    _INFERENCE + "TraceSetting": Rule("admin", "model_name", audit=True),
    # The operator API: reading the routing state is for operators, but it changes nothing, so it is not audited.
    "/infergate.admin.InferGateAdmin/RoutingStatus": Rule("admin", "name"),
    "/infergate.admin.InferGateAdmin/DriftStatus": Rule("admin", "name"),
    "/grpc.health.v1.Health/Check": _ANY,
    "/grpc.health.v1.Health/Watch": _ANY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _ANY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _ANY,
}
# Anything not listed (routing changes and other control RPCs to come) is an admin action.
_UNLISTED = Rule("admin", audit=True)


def rule_for(method: str) -> Rule:
    return METHOD_RULES.get(method, _UNLISTED)


def filter_repository_index(principal: Principal, response: pb.RepositoryIndexResponse) -> pb.RepositoryIndexResponse:
    """Only the models this caller may use (see :func:`infergate.auth.visible_models`)."""
    allowed = set(visible_models(principal, [m.name for m in response.models]))
    return pb.RepositoryIndexResponse(models=[m for m in response.models if m.name in allowed])


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


# The refusal of the call being intercepted, read by the refusing handler (which is shared by every call).
_refusal: contextvars.ContextVar[AuthError] = contextvars.ContextVar("infergate_auth_refusal")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers the call's refusal without reading the request."""

    def unary(_: UnaryBehaviour) -> UnaryBehaviour:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await abort_with(context, _refusal.get(), "auth")

        return refuse

    def stream(_: StreamBehaviour) -> StreamBehaviour:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await abort_with(context, _refusal.get(), "auth")
            yield  # pragma: no cover  (makes this an async generator, as streaming responses need)

        return refuse

    return wrap_handler(handler, unary=unary, stream=stream, deserialize=False)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Authenticates every non-exempt call and authorizes it per method and model."""

    def __init__(self, verifier: TokenVerifier, exempt: list[str], on_refusal: OnRefusal | None = None) -> None:
        self._verifier = verifier
        self._on_refusal = on_refusal
        self._exempt = tuple(exempt)
        # Per method name; only registered methods get here (unknown ones have no handler), so it stays small.
        self._exempt_by_method: dict[str, bool] = {}
        # The token in each authorization header value seen (clients send the same one call after call):
        # taking a header apart again costs a served call more than the cache look-up that follows.
        self._tokens: dict[str | bytes, str] = {}
        self._refusing = HandlerCache(_refusing)
        self._authorized = MethodHandlerCache(
            lambda path: _Authorized(path, rule_for(path), self._on_refusal, verifier.keys).wrap
        )

    def _match_exempt(self, method: str) -> bool:
        """Whether ``method`` matches an exempt pattern, remembered for its next calls."""
        exempt = self._exempt_by_method[method] = any(fnmatchcase(method, p) for p in self._exempt)
        return exempt

    def _token(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The bearer token of the call's one authorization header; MissingToken or MalformedToken."""
        value = authorization(metadata)
        token = self._tokens.get(value)
        if token is None:
            token = token_of(value)
            if len(self._tokens) >= TOKENS_REMEMBERED:  # a client sending new tokens without end
                self._tokens.clear()
            self._tokens[value] = token
        return token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.authorize_now(handler_call_details, handler) or await self.authorize(handler_call_details, handler)

    def authorize_now(
        self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler | None:
        """The call's handler when it needs no verification to choose: an exempt method, a missing
        or malformed header, a token verified before (cached); None when :meth:`authorize` must verify.
        Synchronous, so that the common case, a caller whose token was seen, costs no coroutine;
        and written flat, since every frame it enters costs a served call microseconds with cold caches."""
        method: str = details.method
        exempt = self._exempt_by_method.get(method)
        if exempt is None:
            exempt = self._match_exempt(method)
        if exempt:
            return handler
        try:
            principal = self._verifier.cached(self._token(details.invocation_metadata))
        except AuthError as error:
            return self._refuse(method, handler, error)
        if principal is None:
            return None
        use_principal(principal)  # this call's task: the handler and the tasks it starts see it
        return self._authorized(method, handler)

    async def authorize(
        self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        """For a call :meth:`authorize_now` could not choose for (a token not in the cache): verify
        the token, then the handler that serves this caller, or the one that refuses it."""
        method: str = details.method
        try:
            principal = await self._verifier.verify(self._token(details.invocation_metadata))
        except AuthError as error:
            return self._refuse(method, handler, error)
        use_principal(principal)
        return self._authorized(method, handler)

    def _refuse(self, method: str, handler: grpc.RpcMethodHandler, error: AuthError) -> grpc.RpcMethodHandler:
        log.info("refused %s: %s", _short(method), error.reason)
        if self._on_refusal is not None:
            self._on_refusal(error.reason)
        _refusal.set(error)
        return self._refusing(handler)


class _Authorized:
    """The checks of one method's authenticated calls: permission per request, index filter."""

    def __init__(self, method: str, rule: Rule, on_refusal: OnRefusal | None, keys: KeyStore) -> None:
        self.method, self.rule = method, rule
        self.on_refusal = on_refusal
        self.keys = keys  # a stream's token's key hold must stay in its `holds` (see _checked)
        self._action = _short(method)

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming_requests = handler.request_streaming

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            if streaming_requests:
                # A partial, not a coroutine that awaits this one: one coroutine less per call
                # (gRPC sees through a partial to the coroutine function it wraps).
                return functools.partial(self.request_stream, inner)
            return self.checked_unary(inner)

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            # An async generator function: gRPC tells streaming behaviours apart by that.
            async def authorized(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in self.streaming_responses(inner, streaming_requests, request, context):
                    yield response

            return authorized

        return wrap_handler(handler, unary=unary, stream=stream)

    def checked_unary(self, inner: UnaryBehaviour) -> UnaryBehaviour:
        """The behaviour of a unary call (ModelInfer and most others): checked, then ``inner``.

        A coroutine function of its own rather than a partial: gRPC asks each call's behaviour
        whether it is a coroutine function, which costs twice as much for a partial.
        """
        check, action, filter_index = self.check, self._action, self.rule.filter_index

        async def authorized(request: Any, context: grpc.aio.ServicerContext) -> Any:
            principal = current_principal()
            assert principal is not None  # set by intercept_service in this call's task
            try:
                check(principal, request)
            except AuthError as refusal:
                await abort_with(context, refusal, action)
            response = await inner(request, context)
            return filter_repository_index(principal, response) if filter_index else response

        return authorized

    def check(self, principal: Principal, request: Any) -> None:
        rule = self.rule
        if rule.permission is None:
            return
        model = getattr(request, rule.model_field, None) if rule.model_field else None
        try:
            require(principal, rule.permission, model, self._action)
        except AuthError as error:
            if self.on_refusal is not None:
                self.on_refusal(error.reason)
            raise

    async def _checked(
        self, principal: Principal, requests: AsyncIterator[Any], denied: list[AuthError]
    ) -> AsyncIterator[Any]:
        """Pass requests on until one is not allowed, the stream's token expired, or the JWKS no longer
        publishes a key that verifies it as it was verified (any key with its public key for a token
        without a kid; one with its kid too for a token that names one); then end the stream and remember
        why (the token was verified when the stream opened: a stream lives longer). The token's key hold
        is looked up in the store's current set, an identity look-up; a key that is never withdrawn
        (None) costs one comparison."""
        keys, key = self.keys, principal.key
        async for request in requests:
            try:
                if time.time() >= principal.valid_until:
                    raise Expired("token expired while its stream was open; open a new stream with a new token")
                if key is not None and key not in keys.holds:
                    raise KeyWithdrawn(
                        "the key that signed this stream's token was withdrawn from the key set;"
                        " open a new stream with a new token"
                    )
                self.check(principal, request)
            except AuthError as error:
                if self.on_refusal is not None and isinstance(error, Expired | KeyWithdrawn):  # check() counts its own
                    self.on_refusal(error.reason)
                denied.append(error)
                return
            yield request

    async def request_stream(self, inner: UnaryBehaviour, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """A stream of requests answered once: each request is checked as it arrives."""
        principal = current_principal()
        assert principal is not None  # set by intercept_service in this call's task
        denied: list[AuthError] = []
        response = await inner(self._checked(principal, requests, denied), context)
        if denied:
            await abort_with(context, denied[0], self._action)
        return filter_repository_index(principal, response) if self.rule.filter_index else response

    async def streaming_responses(
        self, inner: StreamBehaviour, streaming_requests: bool, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        principal = current_principal()
        assert principal is not None  # set by intercept_service in this call's task
        denied: list[AuthError] = []
        if streaming_requests:
            request = self._checked(principal, request, denied)
        else:
            try:
                self.check(principal, request)
            except AuthError as refusal:
                await abort_with(context, refusal, self._action)
        async for response in inner(request, context):
            yield response
        if denied:
            await abort_with(context, denied[0], self._action)
