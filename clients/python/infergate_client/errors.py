"""The client's exceptions, and the one place a ``grpc.RpcError`` becomes one of them.

::

    InferGateError                 every error this package raises; .code, .details
    ├── InvalidArgument            INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION: fix the request;
    │                              code None: the SDK could not encode it, nothing was sent
    ├── NotFound                   NOT_FOUND: no such model or version
    ├── Unauthenticated            UNAUTHENTICATED: missing, bad or expired token
    ├── PermissionDenied           PERMISSION_DENIED: the token may not call this
    ├── Unavailable                UNAVAILABLE: server down, draining, queue full (retried)
    ├── DeadlineExceeded           DEADLINE_EXCEEDED: the call's deadline passed (never retried)
    ├── ResourceExhausted          RESOURCE_EXHAUSTED: too large or rate limited
    ├── Unimplemented              UNIMPLEMENTED: the server lacks this RPC
    ├── Cancelled                  CANCELLED
    ├── ServerError                INTERNAL, UNKNOWN, DATA_LOSS, ABORTED, ALREADY_EXISTS
    └── InferenceFailed            one request of a stream failed (the stream has no status code)

``code`` is the ``grpc.StatusCode`` (``None`` for ``InferenceFailed`` and for an
``InvalidArgument`` raised before sending), ``details`` the server's message (or
the SDK's), and ``__cause__`` the original exception.

Mistakes in the client's own arguments are not ``InferGateError``: they raise
where the argument is given, ``TypeError`` for a value of the wrong type
(``timeout="5"``) and ``ValueError`` for one that cannot be used (a malformed
address, ``timeout=0``).
"""

from __future__ import annotations

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "InferGateError",
    "InferenceFailed",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]


class InferGateError(Exception):
    """Base of every error of this package."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        label = code.name if code is not None else type(self).__name__
        super().__init__(f"{label}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(InferGateError):
    """The request was wrong (datatype, shape, unknown input...): retrying cannot help.

    ``code`` is None when the SDK refused it before sending (no inputs, a dtype with
    no V2 datatype, a parameter of another type); ``__cause__`` then is the
    ``TypeError`` or ``ValueError`` that said why.
    """


class NotFound(InferGateError):
    """No such model or version."""


class Unauthenticated(InferGateError):
    """The server wants a (valid) bearer token."""


class PermissionDenied(InferGateError):
    """The token is valid but may not make this call."""


class Unavailable(InferGateError):
    """The server cannot take the call now; the client retries these within its budget."""


class DeadlineExceeded(InferGateError):
    """The call's deadline passed."""


class ResourceExhausted(InferGateError):
    """A message was too large, or a limit was reached."""


class Unimplemented(InferGateError):
    """The server does not implement this RPC."""


class Cancelled(InferGateError):
    """The call was cancelled."""


class ServerError(InferGateError):
    """The server failed (INTERNAL, UNKNOWN...) or answered something unexpected."""


class InferenceFailed(InferGateError):
    """One request of a stream failed; ``request_id`` names it when the request had an id."""

    def __init__(self, details: str, request_id: str = "") -> None:
        super().__init__(details)
        self.request_id = request_id


_BY_CODE: dict[grpc.StatusCode, type[InferGateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError) -> InferGateError:
    """The package's exception for ``error`` (raise it ``from error`` to keep the cause).

    Works for sync and asyncio errors alike: both are ``grpc.Call`` objects with
    ``code()`` and ``details()``.
    """
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = (details_of() if callable(details_of) else None) or str(error)
    return _BY_CODE.get(code, ServerError)(details, code)
