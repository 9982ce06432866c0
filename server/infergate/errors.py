"""infergate's error tree.

Every error a client may see is an :class:`InferGateError` subclass that
carries its status. The status is named here without importing grpc, so the
batcher and the router stay transport-free; ``servicer.py`` is the one place
that turns these errors into gRPC status codes.

    InferGateError                 INTERNAL (message safe to show)
    ├── InvalidArgument            INVALID_ARGUMENT
    ├── NotFound                   NOT_FOUND
    ├── Unavailable                UNAVAILABLE
    │   └── QueueFull              UNAVAILABLE
    ├── DeadlineExceeded           DEADLINE_EXCEEDED
    ├── Cancelled                  CANCELLED
    ├── Unimplemented              UNIMPLEMENTED
    ├── ResourceExhausted          RESOURCE_EXHAUSTED (the server ran out of something, e.g. open files)
    ├── ModelExecutionError        INTERNAL (the cause is logged, not sent)
    └── auth.AuthError             (auth.py: UNAUTHENTICATED or PERMISSION_DENIED, one subclass per reason)
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InferGateError",
    "InvalidArgument",
    "ModelExecutionError",
    "NotFound",
    "QueueFull",
    "ResourceExhausted",
    "Status",
    "Unavailable",
    "Unimplemented",
]


class Status(Enum):
    """Status names; each matches a ``grpc.StatusCode`` member of the same name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


class InferGateError(Exception):
    """Base of every error whose message may be shown to a client."""

    status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(InferGateError):
    status = Status.INVALID_ARGUMENT


class NotFound(InferGateError):
    status = Status.NOT_FOUND


class Unavailable(InferGateError):
    status = Status.UNAVAILABLE


class QueueFull(Unavailable):
    """The model's bounded queue refused the request."""


class DeadlineExceeded(InferGateError):
    status = Status.DEADLINE_EXCEEDED


class Cancelled(InferGateError):
    status = Status.CANCELLED


class Unimplemented(InferGateError):
    status = Status.UNIMPLEMENTED


class ResourceExhausted(InferGateError):
    """The server ran out of a resource of its process (open files), not of anything the caller controls."""

    status = Status.RESOURCE_EXHAUSTED


class ModelExecutionError(InferGateError):
    """The runtime failed on a batch; ``__cause__`` holds the runtime's own error."""


class FailedPrecondition(InferGateError):
    """The operation cannot run in the server's present state (e.g. model control mode, a broken model)."""

    status = Status.FAILED_PRECONDITION
