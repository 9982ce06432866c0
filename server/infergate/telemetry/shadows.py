"""Shadow calls' spans: a traced request's shadow call gets a span ``shadow <model>`` of its own.

The span is a root **linked** to the request's span, not its child: the shadow
call runs after the caller had its answer, when the request's trace has ended
(a child outliving its parent would stretch the trace, and the caller's view of
it). It carries the model, the shadow version, ``infergate.shadow.agreed``
(whether every output agreed with the primary's: same shapes and types, same
top-1 class for scores) and ``infergate.shadow.max_abs_diff``; when the call
failed or timed out, status ERROR with the error's type only (a runtime's
message may quote a value from the request). While the call
runs the span is current, so the shadow version's batch span links to it.

Only a sampled request's shadow call is traced (the link needs a span to point
to): sampling the requests samples their shadows.
"""

from __future__ import annotations

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, Tracer

__all__ = ["ShadowTracer"]


class ShadowTracer:
    """:class:`~infergate.routing.shadow.ShadowSpans` over an OpenTelemetry tracer."""

    def __init__(self, tracer: Tracer):
        self._tracer = tracer

    def capture(self) -> SpanContext | None:
        context = trace.get_current_span().get_span_context()
        return context if context.is_valid and context.trace_flags.sampled else None

    def open(self, captured: object, model: str, version: int) -> _ShadowCallSpan:
        assert isinstance(captured, SpanContext)  # what capture() returned
        span = self._tracer.start_span(
            f"shadow {model}",
            Context(),  # a root: the request's trace has ended
            links=[Link(captured)],
            attributes={"infergate.model.name": model, "infergate.model.version": str(version)},
        )
        return _ShadowCallSpan(span, context_api.attach(trace.set_span_in_context(span)))


class _ShadowCallSpan:
    """A shadow call's span, current (in the shadow queue's task) until :meth:`finish`."""

    def __init__(self, span: trace.Span, token: object):
        self._span = span
        self._token = token

    def finish(self, *, agreed: bool | None, max_abs_diff: float | None, error: BaseException | None) -> None:
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        if agreed is not None:
            self._span.set_attribute("infergate.shadow.agreed", agreed)
        if max_abs_diff is not None:
            self._span.set_attribute("infergate.shadow.max_abs_diff", max_abs_diff)
        context_api.detach(self._token)  # type: ignore[arg-type]
        self._span.end()
