"""The outermost server interceptor: one span, one metric sample and one access-log line per RPC.

The span follows the gRPC semantic conventions (``rpc.system``, ``rpc.service``,
``rpc.method``, ``rpc.grpc.status_code``), takes its parent from the caller's
W3C ``traceparent``/``tracestate`` metadata, and is the current span while the
servicer runs, so the batch hooks and log lines inside the request see it.
Model, version served and request id are read from the request and response
messages (ModelInfer and the other calls that name a model). With auth on, a
traced call also names its caller: ``enduser.id`` (the token's subject, as
OpenTelemetry's conventions name it) and ``infergate.client.id`` when the
token has one; the token itself never reaches a span.

Health and reflection calls pass through untouched unless ``trace_health``.
The interceptor sits outermost, so calls another interceptor refuses are
traced and counted too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from infergate.security.auth import current_principal
from infergate.serving.codec import ROUTE_PARAMETER, SHADOWED_PARAMETER
from infergate.serving.interceptors import (
    Finish,
    MethodHandlerCache,
    SelectingInterceptor,
    call_status,
    observe_handler,
)
from infergate.telemetry.metrics import ServerMetrics
from infergate.telemetry.sampling import TraceSampler

__all__ = ["ACCESS_LOG", "UNTRACED_SERVICES", "TelemetryInterceptor"]

ACCESS_LOG = logging.getLogger("infergate.access")
_W3C = TraceContextTextMapPropagator()  # W3C trace context only: OTEL_PROPAGATORS is not consulted
_TRACE_KEYS = frozenset(("traceparent", "tracestate"))
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                     "grpc.reflection.v1.ServerReflection")  # fmt: skip


class TelemetryInterceptor(SelectingInterceptor):
    """Wraps every handler with a :class:`_Call` record; ``tracer``/``metrics`` None turn that part off."""

    def __init__(
        self,
        tracer: Tracer | None,
        metrics: ServerMetrics | None,
        *,
        trace_health: bool = False,
        sample_ratio: float = 1.0,
        rng: random.Random | None = None,
    ):
        self._tracer = tracer
        self.sampler = TraceSampler(sample_ratio, rng)  # TraceSetting changes it, server-wide and per model
        self._metrics = metrics
        self._trace_health = trace_health
        # Inner handlers are the same objects call after call (one per method), so each is wrapped once.
        self._wrapped = MethodHandlerCache(lambda path: functools.partial(self._wrap, path=path))

    def select(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._wrapped(method, handler)

    def _wrap(self, handler: grpc.RpcMethodHandler, path: str) -> grpc.RpcMethodHandler:
        service, _, method = path.lstrip("/").partition("/")
        if service in UNTRACED_SERVICES and not self._trace_health:
            return handler

        # Each call starts a _Call, which is its own finish: no function of ours between the two.
        start: Callable[[Any, grpc.aio.ServicerContext], Finish] = functools.partial(_Call, self, service, method)
        return observe_handler(handler, start)


@functools.cache
def _naming_fields(message: type) -> tuple[str | None, str | None]:
    """The fields of a request message type that name a model and a version (ModelInfer's
    ``model_name``/``model_version``, the other calls' ``name``/``version``), read once per type:
    asking a message for a field it lacks costs an exception each time. The shared-memory calls'
    ``name`` is a region's, which names no model."""
    descriptor = getattr(message, "DESCRIPTOR", None)
    if "SharedMemory" in str(getattr(descriptor, "name", "")):
        return None, None
    fields = getattr(descriptor, "fields_by_name", None) or {}

    def first(*names: str) -> str | None:
        return next((name for name in names if name in fields), None)

    return first("model_name", "name"), first("model_version", "version")


class _Call:
    """One RPC being served: its span (if tracing), start time and what it named."""

    __slots__ = ("_context", "_owner", "_span", "_started", "_token", "method", "model", "service", "version")

    def __init__(
        self, owner: TelemetryInterceptor, service: str, method: str, request: Any, context: grpc.aio.ServicerContext
    ):
        self._owner = owner
        self._context = context
        self.service, self.method = service, method
        self._started = time.perf_counter()
        self._span: trace.Span | None = None
        self._token: object | None = None
        kind: type = type(request)
        model_field, version_field = _naming_fields(kind)  # a stream's request iterator names none
        self.model = str(getattr(request, model_field)) if model_field is not None else ""
        self.version = str(getattr(request, version_field)) if version_field is not None else ""
        if owner._metrics is not None:
            owner._metrics.request_started(method)
        if owner._tracer is not None:
            metadata = context.invocation_metadata() or ()
            carrier = {k: v for k, v in metadata if k in _TRACE_KEYS and isinstance(v, str)}
            parent = _W3C.extract(carrier) if carrier else None
            if parent is not None and not trace.get_current_span(parent).get_span_context().is_valid:
                parent = None  # a tracestate alone, or a traceparent that does not parse: no caller's decision
            if parent is None and not owner.sampler.sample(self.model):
                return  # a root call outside the sample: no span at all (the caller's decision always counts)
            self._span = owner._tracer.start_span(
                f"{service}/{method}",
                parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            )
            self._token = context_api.attach(trace.set_span_in_context(self._span))
            self._describe(request)

    def _describe(self, request: Any) -> None:
        """The request's model, id and caller on a recording span."""
        if self._span is not None and self._span.is_recording():
            if self.model:
                self._span.set_attribute("infergate.model.name", self.model)
            request_id = getattr(request, "id", "")
            if request_id and isinstance(request_id, str):
                self._span.set_attribute("infergate.request.id", request_id)
            caller = current_principal()  # set by auth before any handler runs; None when auth is off
            if caller is not None:
                self._span.set_attribute("enduser.id", caller.subject)
                if caller.client_id:
                    self._span.set_attribute("infergate.client.id", caller.client_id)

    def saw_response(self, response: Any) -> None:
        version = getattr(response, "model_version", "")
        if version and isinstance(version, str):
            self.version = version  # the version that answered ("1" when the request named "01", or none)
        if self._span is None or not self._span.is_recording():
            return
        parameters = getattr(response, "parameters", None)
        if parameters is not None:
            # The router's decision, as the servicer wrote it into the response (see servicer.py).
            if ROUTE_PARAMETER in parameters:
                self._span.set_attribute("infergate.route", parameters[ROUTE_PARAMETER].string_param)
            if SHADOWED_PARAMETER in parameters:
                self._span.set_attribute("infergate.shadowed", parameters[SHADOWED_PARAMETER].bool_param)

    def finish(self, error: BaseException | None, response: Any) -> None:
        """The call ended: with ``error``, or answered (``response`` is None for a stream)."""
        if response is not None:
            self.saw_response(response)
        # call_status's common case, answered with nothing set, read here: a call fewer per request.
        answered = error is None and self._context.code() is None
        status = grpc.StatusCode.OK if answered else call_status(self._context, error)
        seconds = time.perf_counter() - self._started
        if self._owner._metrics is not None:
            self._owner._metrics.request_finished(self.method, self.model, self.version, status.value[0], seconds)
        if self._span is not None:
            self._finish_span(status, error)
        if ACCESS_LOG.isEnabledFor(logging.DEBUG):
            ACCESS_LOG.debug(
                "%s model=%s version=%s status=%s %.3fms",
                self.method, self.model or "-", self.version or "-", status.name, seconds * 1e3,
                extra={"rpc_method": self.method, "model": self.model, "model_version": self.version,
                       "grpc_status": status.name, "duration_ms": round(seconds * 1e3, 3)},
            )  # fmt: skip
        if self._token is not None:
            context_api.detach(self._token)  # type: ignore[arg-type]

    __call__ = finish  # a _Call is the Finish its start returns (see TelemetryInterceptor._wrap)

    def _finish_span(self, status: grpc.StatusCode, error: BaseException | None) -> None:
        span = self._span
        assert span is not None
        span.set_attribute("rpc.grpc.status_code", status.value[0])
        if self.version:
            span.set_attribute("infergate.model.version", self.version)
        if status is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, status.name))
            if error is not None and not isinstance(error, grpc.aio.AbortError | asyncio.CancelledError):
                span.record_exception(error)  # a bug: the servicer answered INTERNAL, the cause goes here
        span.end()
