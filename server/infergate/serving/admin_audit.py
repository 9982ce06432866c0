"""The admin audit interceptor: every admin write (model load and unload, any control RPC) is audited.

Always on, whether or not auth is: each call of an admin write method writes
one ``admin`` event to the :class:`~infergate.audit.AuditLog` once it has
ended, allowed or refused: the method, the model the request names, the
caller (the token's subject and client id when auth is on, else
``anonymous``) and the outcome as a gRPC status name. Which methods are admin
writes is the auth table's ``audit`` flag (:func:`infergate.security.interceptor.rule_for`):
RepositoryModelLoad, RepositoryModelUnload, and any method that table does not
list. Admin reads (RoutingStatus, DriftStatus) and everything else pass
untouched: this interceptor looks only at the method name and hands their
handler back as it got it, so inference calls pay nothing for it.

It sits before the auth interceptor (see :class:`~infergate.serving.interceptors.CallPipeline`)
so that the calls auth refuses are audited too; the caller auth verified is
read from :func:`~infergate.security.auth.current_principal`, which auth sets in
the call's task before the handler runs. A call refused as unauthenticated is
written as ``anonymous`` with no model: its request is never read.
"""

from __future__ import annotations

import functools
from typing import Any

import grpc

from infergate.audit import AuditLog
from infergate.security.auth import current_principal
from infergate.security.interceptor import rule_for
from infergate.serving.interceptors import (
    Finish,
    MethodHandlerCache,
    SelectingInterceptor,
    call_status,
    observe_handler,
)

__all__ = ["AdminAudit", "call_outcome"]

MAX_NAME_CHARS = 256  # of a model name or version a client sent, as written to the audit log


class AdminAudit(SelectingInterceptor):
    """Writes one ``admin`` audit event per admin write call (see the module docstring)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._wrapped = MethodHandlerCache(
            lambda path: functools.partial(self._audited, method=path.rsplit("/", 1)[-1])
        )

    def select(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not rule_for(method).audit:
            return handler
        return self._wrapped(method, handler)

    def _audited(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        def start(request: Any, context: grpc.aio.ServicerContext) -> Finish:
            return lambda error, _: self._write(method, request, context, error)

        return observe_handler(handler, start)

    def _write(self, method: str, request: Any, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        principal = current_principal()
        self._audit.admin_call(
            method,
            call_outcome(context, error),
            model=_named(request, "model_name", "name"),
            version=_named(request, "model_version", "version"),
            principal=principal.subject if principal is not None else None,
            client_id=principal.client_id if principal is not None else None,
        )


def call_outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The gRPC status name a call ended with; an exception no translation handled is ``INTERNAL``
    (what the client was told, see ``serving/status.py``)."""
    status = call_status(context, error)
    return "INTERNAL" if status is grpc.StatusCode.UNKNOWN else status.name


def _named(request: Any, *fields: str) -> str:
    """The first non-empty string field of ``request`` (a message, or raw bytes auth never parsed), bounded."""
    for name in fields:
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            return value if len(value) <= MAX_NAME_CHARS else value[:MAX_NAME_CHARS] + "…"
    return ""
