"""gRPC server interceptors, composed in one place: :func:`build_interceptors`.

Order (a call passes them first to last before reaching its servicer):

1. :class:`AuthInterceptor` (when ``auth.enabled``): exempt methods pass
   untouched; every other call must carry ``authorization: Bearer <JWT>``. A
   refused token never reaches the servicer (UNAUTHENTICATED, the request is
   not even deserialised). An accepted one wraps the handler so that the
   principal is the handler's :func:`~infergate.auth.current_principal`, the
   method's permission (``METHOD_RULES``) is checked against the request's
   model, RepositoryIndex answers are filtered to the caller's models, and
   every admin call writes one ``infergate.audit`` line.

0. The observers (telemetry's tracing and metrics interceptor) come first, so
   that refused calls are traced and counted too. Every refusal's short
   reason (``expired``, ``permission_denied``…) goes to ``on_refusal`` (the
   refusal counter).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import grpc

from infergate._proto import grpc_service_pb2 as pb
from infergate.config import ServerConfig
from infergate.errors import InferGateError
from infergate.security.auth import (
    AuthError,
    Principal,
    TokenVerifier,
    bearer_token,
    require,
    reset_principal,
    use_principal,
    visible_models,
)
from infergate.security.keys import KeyStore

__all__ = ["METHOD_RULES", "AuthInterceptor", "Rule", "build_interceptors", "filter_repository_index", "rule_for"]

OnRefusal = Callable[[str], None]  # gets the short reason of every refused call

log = logging.getLogger(__name__)
audit_log = logging.getLogger("infergate.audit")


@dataclass(frozen=True)
class Rule:
    """What a method needs: ``permission`` None means any authenticated caller."""

    permission: str | None
    model_field: str | None = None  # request field naming the model the permission applies to
    audit: bool = False
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
    # The operator API: reading the routing state is for operators, but it changes nothing, so it is not audited.
    "/infergate.admin.InferGateAdmin/RoutingStatus": Rule("admin", "name"),
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


async def _abort(context: grpc.aio.ServicerContext, error: InferGateError) -> None:
    await context.abort(grpc.StatusCode[error.status.name], error.message)


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _audit(method: str, principal: Principal | None, request: Any, outcome: str) -> None:
    audit_log.info(
        json.dumps(
            {
                "event": "admin",
                "method": _short(method),
                "subject": principal.subject if principal else None,
                "client_id": principal.client_id if principal else None,
                "model": getattr(request, "model_name", None) or getattr(request, "name", None),
                "version": getattr(request, "model_version", None) or getattr(request, "version", None) or None,
                "outcome": outcome,
            },
            ensure_ascii=False,
        )
    )


def _outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
    return "INTERNAL"


def _rebuild(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """``handler`` with another behaviour of the same kind (unary/stream in and out)."""
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    factory = factories[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _inner(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    kinds = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }
    behaviour: Callable[..., Any] = kinds[(handler.request_streaming, handler.response_streaming)]
    return behaviour


def _refusal_handler(handler: grpc.RpcMethodHandler, error: AuthError) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers ``error`` without reading the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await _abort(context, error)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _abort(context, error)
        yield  # pragma: no cover  (makes this an async generator, as streaming responses need)

    refused = _rebuild(handler, refuse_stream if handler.response_streaming else refuse)
    return refused._replace(request_deserializer=None)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Authenticates every non-exempt call and authorizes it per method and model."""

    def __init__(self, verifier: TokenVerifier, exempt: list[str], on_refusal: OnRefusal | None = None) -> None:
        self._verifier = verifier
        self._on_refusal = on_refusal
        self._exempt = tuple(exempt)
        # Per method name; only registered methods get here (unknown ones have no handler), so it stays small.
        self._exempt_by_method: dict[str, bool] = {}

    def _is_exempt(self, method: str) -> bool:
        exempt = self._exempt_by_method.get(method)
        if exempt is None:
            exempt = self._exempt_by_method[method] = any(fnmatchcase(method, p) for p in self._exempt)
        return exempt

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or self._is_exempt(method):
            return handler
        rule = rule_for(method)
        try:
            principal = await self._verifier.verify(bearer_token(handler_call_details.invocation_metadata))
        except AuthError as error:
            log.info("refused %s: %s", _short(method), error.reason)
            if self._on_refusal is not None:
                self._on_refusal(error.reason)
            if rule.audit:
                _audit(method, None, None, "UNAUTHENTICATED")
            return _refusal_handler(handler, error)
        return _rebuild(handler, _Authorized(method, rule, principal, handler, self._on_refusal).behaviour)


class _Authorized:
    """The behaviours of one authenticated call: set the principal, check, filter, audit."""

    def __init__(
        self,
        method: str,
        rule: Rule,
        principal: Principal,
        handler: grpc.RpcMethodHandler,
        on_refusal: OnRefusal | None = None,
    ) -> None:
        self.method, self.rule, self.principal = method, rule, principal
        self.on_refusal = on_refusal
        self.inner = _inner(handler)
        self.streaming_requests = handler.request_streaming
        self.behaviour = self.streaming_responses if handler.response_streaming else self.unary_response

    def check(self, request: Any) -> None:
        rule = self.rule
        if rule.permission is None:
            return
        model = getattr(request, rule.model_field, None) if rule.model_field else None
        try:
            require(self.principal, rule.permission, model, _short(self.method))
        except AuthError as error:
            if self.on_refusal is not None:
                self.on_refusal(error.reason)
            raise

    async def _checked(self, requests: AsyncIterator[Any], denied: list[AuthError]) -> AsyncIterator[Any]:
        """Pass requests on until one is not allowed; then end the stream and remember why."""
        async for request in requests:
            try:
                self.check(request)
            except AuthError as error:
                denied.append(error)
                return
            yield request

    async def _checked_call(self, request: Any, context: grpc.aio.ServicerContext, denied: list[AuthError]) -> Any:
        """The inner behaviour's result (a response or a response iterator), after the checks."""
        if self.streaming_requests:
            return self.inner(self._checked(request, denied), context)
        try:
            self.check(request)
        except AuthError as refusal:
            await _abort(context, refusal)
        return self.inner(request, context)

    async def unary_response(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = use_principal(self.principal)
        error: BaseException | None = None
        try:
            denied: list[AuthError] = []
            response = await (await self._checked_call(request, context, denied))
            if denied:
                await _abort(context, denied[0])
            if self.rule.filter_index:
                response = filter_repository_index(self.principal, response)
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self.rule.audit:
                message = None if self.streaming_requests else request
                _audit(self.method, self.principal, message, _outcome(context, error))
            reset_principal(token)

    async def streaming_responses(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # An async generator's body runs in the RPC's own task, which ends with the call: no reset needed.
        use_principal(self.principal)
        denied: list[AuthError] = []
        async for response in await self._checked_call(request, context, denied):
            yield response
        if denied:
            await _abort(context, denied[0])


def build_interceptors(
    config: ServerConfig,
    keys: KeyStore | None,
    observers: Sequence[grpc.aio.ServerInterceptor] = (),
    on_refusal: OnRefusal | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """Every server interceptor, in order (see the module docstring): observers first, then auth."""
    interceptors: list[grpc.aio.ServerInterceptor] = list(observers)
    if config.auth.enabled:
        if keys is None:
            raise ValueError("auth is enabled but no key store was given")
        verifier = TokenVerifier(config.auth, keys)
        interceptors.append(AuthInterceptor(verifier, config.auth.exempt_methods, on_refusal))
    return interceptors
